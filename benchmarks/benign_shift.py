"""Clean FPR of default-trained detectors under benign shift (JPEG, noise, shifts, resizing); prints JSON.

The protocol of `safetynet quickstart`'s plain guard: the reference CNN, FGSM + PGD-10 datasets of the
first `--n-train` training images, each family fitted on them and calibrated at 5% clean FPR on 20%
held-out sources; then on the first `--n-test` test images the nominal clean FPR, the FPR at the
same threshold on each corruption of `detector.benign_shift`, and AUROC / TPR on the seen attacks
(FGSM, PGD-10) made on those test images (successful ones only). `--augmentation both` fits each
family twice, without and with benign augmentation (the default of `fit_detector`), on the same
classifier and datasets; `--augment-with` restricts the corruptions the augmentation draws from.
With augmentation each family is calibrated by the default rule (at most 5% of the held-out clean
images flagged and at most `--shifted-fpr` of them under each corruption: row "on") and, on the
same fitted detector, by the rule before it (5% of the held-out images each followed by one
randomly corrupted copy, as `fit_detector` did before the per-corruption caps: row "on_mix"), and
by the default rule on each `--calibrate-on` set of clean images instead of the held-out sources
(row "on@DATA:SPLIT:START:STOP"). `--model` loads a classifier instead of training one.

    python benchmarks/benign_shift.py --data digits --epochs 8 --eps 0.3
    python benchmarks/benign_shift.py --data ../shared/data/mnist/mnist_keras_arrays.npz --n-train 5000 --epochs 3
    python benchmarks/benign_shift.py --data ../shared/data/mnist/mnist_keras_arrays.npz --n-train 5000 \
        --model runs/mnist.keras --families ensemble --augmentation on \
        --calibrate-on ../shared/data/mnist/mnist_keras_arrays.npz:test:1000:3000 ../shared/data/mnist/mnist_keras_arrays.npz:test:8000:10000
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from attacks import make_attack  # noqa: E402
from attacks.dataset import ArraySource, generate_dataset, load_adversarial_dataset  # noqa: E402
from detector import benign_shift  # noqa: E402
from detector.benign_shift import BENIGN_SHIFTS, augment_benign, shifted_fprs  # noqa: E402
from detector.calibration import calibrate_threshold  # noqa: E402
from detector.metrics import auroc, correctly_classified, flagged  # noqa: E402
from foundation.models import load_model  # noqa: E402
from training.calibration_images import CalibrationImages  # noqa: E402
from training.classifier import train_classifier  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.detector import calibrate_held_out, fit_detector, split_by_source  # noqa: E402
from timing import emit  # noqa: E402


def _row(detector, x_test: np.ndarray, seen: dict) -> dict:
    """Nominal and shifted clean FPR on the test images, and the seen attacks' AUROC / TPR, at the detector's threshold.
    `seen`: name -> the images each attack turned (`detector.metrics.attack_row`'s positives)."""
    clean = np.asarray(detector.score(x_test), np.float64)
    row = {"threshold": detector.threshold, "calibration": detector.calibration.to_json(),
           "clean_fpr": float(flagged(clean, detector.threshold).mean()),
           "clean_fpr_shifted": shifted_fprs(detector, x_test), "seen": {}}
    for name, turned in seen.items():
        scores = np.asarray(detector.score(turned), np.float64)
        row["seen"][name] = {"auroc": auroc(clean, scores), "tpr": float(flagged(scores, detector.threshold).mean())}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5, help="classifier training epochs")
    parser.add_argument("--families", nargs="+", default=["input", "ensemble"])
    parser.add_argument("--augmentation", choices=("off", "on", "both"), default="both",
                        help="fit without, with, or both (default) with benign augmentation")
    parser.add_argument("--augment-with", nargs="+", choices=list(BENIGN_SHIFTS),
                        help="the corruptions the augmentation draws from (default all)")
    parser.add_argument("--shifted-fpr", type=float, default=0.10, help="cap on each corruption's FPR in calibration")
    parser.add_argument("--model", help="a saved classifier (.keras, loaded with safe_mode) instead of training one")
    parser.add_argument("--calibrate-on", nargs="+", default=[], type=CalibrationImages.parse, metavar="DATA:SPLIT:START:STOP",
                        help="with augmentation, also calibrate each detector on these clean images (one row each)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if any(spec.overlaps(args.data, "test", args.n_test) for spec in args.calibrate_on):
        parser.error("--calibrate-on: the first --n-test test images are the ones evaluated; start after them")
    if args.augment_with:
        benign_shift.AUGMENTATIONS = tuple(args.augment_with)
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.augmentation]

    started = time.perf_counter()
    data = load_dataset(args.data)
    x, y = data.x_train[: args.n_train], data.y_train[: args.n_train]
    classifier = load_model(args.model) if args.model else train_classifier(x, y, data.num_classes, epochs=args.epochs, verbose=0)
    named = {f"on@{spec}": spec.load() for spec in args.calibrate_on}
    x_test = data.x_test[: args.n_test]
    report: dict = {"data": args.data, "model": args.model, "eps": args.eps, "n_train": len(x), "n_test": len(x_test),
                    "augment_with": list(benign_shift.AUGMENTATIONS), "shifted_fpr": args.shifted_fpr, "families": {}}
    attacks = (make_attack("fgsm", eps=args.eps), make_attack("pgd", eps=args.eps, steps=10))
    y_test = data.y_test[: args.n_test]
    results = {a.name: a(classifier, x_test, y_test, batch_size=256) for a in attacks}
    report["seen_success_rate"] = {name: float(result.success.mean()) for name, result in results.items()}
    clean_correct = correctly_classified(classifier, x_test, y_test)
    seen = {name: result.x_adv[result.success & clean_correct] for name, result in results.items()}
    with tempfile.TemporaryDirectory() as scratch:
        datasets = []
        for attack in attacks:
            path = Path(scratch) / attack.name
            generate_dataset(classifier, attack, ArraySource(x, y), path, progress=False,
                             source_info={"data": args.data, "split": "train"})
            datasets.append(load_adversarial_dataset(path))
        # the rule before per-corruption caps: 5% of the held-out images and one random copy of each
        mix = augment_benign(split_by_source(datasets, 0.2, 0).x_clean_held_out, np.random.default_rng([0, 3]))
        for family in args.families:
            for augment in settings:
                detector = fit_detector(datasets, family=family, classifier=classifier, benign_augmentation=augment,
                                        shifted_fpr=args.shifted_fpr, verbose=0)
                rules = {"on": detector.calibration, "on_mix": calibrate_threshold(detector.score(mix), 0.05)} if augment \
                    else {"off": detector.calibration}
                for rule, images in named.items() if augment else ():
                    rules[rule] = calibrate_held_out(detector, images, 0.05, args.shifted_fpr, 0).calibration
                for rule, calibration in rules.items():
                    detector.calibration = calibration
                    key = f"{family}/augmentation_{rule}"
                    report["families"][key] = row = _row(detector, x_test, seen)
                    print(key, row, file=sys.stderr)
    report["seconds"] = time.perf_counter() - started
    emit(report, args.out)


if __name__ == "__main__":
    main()
