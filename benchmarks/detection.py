"""Detection quality per detector family x attack, one calibrated threshold each; prints JSON.

Protocol (README "Detectors"): a reference classifier is trained (or `--model` loaded); FGSM and
PGD datasets are made from `--n-train` training images (`--train-attacks`: other specs, e.g. PGD
with a radius per image); every family is fitted on them (20% of the sources held out to
calibrate its threshold at 5% clean FPR, or on `--calibrate-on` images like those the guard will
serve); then on `--n-test` test images each family is scored on
the seen attacks (FGSM, PGD) and unseen ones (CW-L2, DeepFool), counting only successful adversarial
examples, and its clean FPR on the test images and under each benign corruption (`detector.benign_shift`).
Finally the `input` detector (`--retrain-families`: others too, which are fitted again) is retrained
on DeepFool (`--retrain-on cw`: CW-L2) made from the first `--n-retrain` training images, with
replay, and the held-out TPR of the old and new attacks is reported before and after, with the
retrained detector's rows on the test images (`test_after`: ART's attacks too with `--art`).

`--art` adds IBM ART's CW-L2 and DeepFool as unseen attacks beside ours (benchmarks/art_unseen.py;
ART is never a dependency). `--n-unseen` runs the unseen attacks, ours and ART's, on the first that
many test images only (ART's CW is slow); the clean FPR and the AUROC's negatives stay all `--n-test`.

    python benchmarks/detection.py --data ../shared/data/mnist/mnist_keras_arrays.npz --eps 0.3
    python benchmarks/detection.py --data ../shared/data/cifar10 --eps 8/255 --epochs 15
    python benchmarks/detection.py --data digits --families input --unseen --retrain-on cw
    python benchmarks/detection.py --data ../shared/data/cifar10 --eps 8/255 --model runs/cifar-resnet.keras \
        --unseen cw deepfool pgd:eps=0.5,norm=2,steps=40 --art --n-unseen 200
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
sys.path.insert(1, str(Path(__file__).resolve().parent))

from attacks import make_attack, parse_attack_spec  # noqa: E402
from attacks.dataset import ArraySource, generate_dataset, load_adversarial_dataset  # noqa: E402
from detector import Detector  # noqa: E402
from detector.evaluation import attack_keys, evaluate  # noqa: E402
from detector.metrics import correctly_classified  # noqa: E402
from foundation.models import load_model  # noqa: E402
from training.attack_specs import default_attacks  # noqa: E402
from training.calibration_images import CalibrationImages  # noqa: E402
from training.classifier import accuracy, train_classifier  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.detector import fit_detector  # noqa: E402
from training.retrain import retrain_detector  # noqa: E402
from timing import emit  # noqa: E402

FAMILIES = ("input", "activations", "safetynet", "mahalanobis", "squeeze", "margin", "ensemble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--eps", default="0.3", help="L-inf budget of the seen attacks (fractions like 8/255 work)")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5, help="classifier training epochs")
    parser.add_argument("--model", help="a saved classifier (.keras, loaded with safe_mode) instead of training the reference CNN")
    parser.add_argument("--detector-epochs", type=int, default=10)
    parser.add_argument("--shifted-fpr", type=float, default=0.10,
                        help="cap on each benign corruption's FPR when the threshold is set (fit_detector's default)")
    parser.add_argument("--train-attacks", nargs="+",
                        help="the attacks the families are fitted on, as specs at --eps (default: the seen FGSM and"
                             " PGD-10; e.g. fgsm pgd pgd:eps_min=1/255); the seen rows stay FGSM and PGD-10 at --eps")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--members", nargs="+", help="the ensemble's members (default: fit_detector's for the images)")
    parser.add_argument("--unseen", nargs="*", default=["cw", "deepfool"],
                        help="unseen attacks as specs, e.g. cw deepfool pgd:eps=0.5,norm=2,steps=40")
    parser.add_argument("--n-unseen", type=int, help="unseen attacks on the first this many test images (default all)")
    parser.add_argument("--art", action="store_true", help="also ART's CW-L2 and DeepFool as unseen attacks")
    parser.add_argument("--art-cw-search-steps", type=int, default=5)
    parser.add_argument("--art-cw-iter", type=int, default=50)
    parser.add_argument("--art-cw-const", type=float, default=1.0, help="ART's initial c (its default 0.01)")
    parser.add_argument("--art-cache", type=Path, help="reuse ART's images stored here (same model, images and parameters) or store them")
    parser.add_argument("--no-retrain", action="store_true")
    parser.add_argument("--retrain-on", choices=("deepfool", "cw"), default="deepfool")
    parser.add_argument("--n-retrain", type=int, help="training images the retraining attack runs on (default --n-train)")
    parser.add_argument("--retrain-epochs", type=int, default=5, help="fine-tuning epochs of input (others refit)")
    parser.add_argument("--retrain-families", nargs="+", default=["input"], help="the fitted families to retrain")
    parser.add_argument("--retrain-shifted-fpr", type=float, help="the retrained detectors' benign-corruption cap (default: theirs)")
    parser.add_argument("--calibrate-on", type=CalibrationImages.parse, metavar="DATA:SPLIT:START:STOP",
                        help="set every threshold on these clean images (e.g. test images after --n-test) instead of"
                             " the held-out training sources")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.calibrate_on and args.calibrate_on.overlaps(args.data, "test", args.n_test):
        parser.error("--calibrate-on: the first --n-test test images are the ones evaluated; start after them")
    eps = parse_attack_spec(f"fgsm:eps={args.eps}").eps
    if args.art:
        from art_unseen import art_attacks, art_cw_params, art_rows, require_art

        require_art()

    started = time.perf_counter()
    data = load_dataset(args.data)
    classifier = (load_model(args.model) if args.model else
                  train_classifier(data.x_train, data.y_train, data.num_classes, epochs=args.epochs, verbose=2))
    x_calibration = None if args.calibrate_on is None else args.calibrate_on.load()
    report: dict = {
        "data": args.data, "model": args.model, "eps": eps, "n_train": args.n_train, "n_test": args.n_test,
        "calibrate_on": None if args.calibrate_on is None else str(args.calibrate_on), "shifted_fpr": args.shifted_fpr,
        "classifier_clean_accuracy": accuracy(classifier, data.x_test, data.y_test),
        "families": {}, "fit_seconds": {}, "attack_seconds": {},
    }
    seen = default_attacks(data.input_shape, eps)
    fitted_on = [parse_attack_spec(spec, defaults={"eps": eps}) for spec in args.train_attacks] if args.train_attacks else seen
    report["train_attacks"] = [attack.get_params() for attack in fitted_on]
    x, y = data.x_train[: args.n_train], data.y_train[: args.n_train]
    with tempfile.TemporaryDirectory() as scratch:
        paths = []
        for i, attack in enumerate(fitted_on + ([make_attack(args.retrain_on)] if not args.no_retrain else [])):
            path = Path(scratch) / f"{i}_{attack.name}"
            n = args.n_retrain if i == len(fitted_on) and args.n_retrain else len(x)
            generate_dataset(classifier, attack, ArraySource(x[:n], y[:n]), path, progress=False,
                             source_info={"data": args.data, "split": "train"})
            paths.append(path)
        datasets = [load_adversarial_dataset(p) for p in paths]
        seen_sets = datasets[:len(fitted_on)]

        x_test, y_test = data.x_test[: args.n_test], data.y_test[: args.n_test]
        clean_correct = correctly_classified(classifier, x_test, y_test)
        test_attacks = seen + [parse_attack_spec(spec) for spec in args.unseen]
        results = []
        for i, (key, attack) in enumerate(zip(attack_keys(test_attacks), test_attacks, strict=True)):
            m, begin = len(x_test) if i < len(seen) else args.n_unseen or len(x_test), time.perf_counter()
            results.append(attack(classifier, x_test[:m], y_test[:m], batch_size=256))  # unseen: the first n_unseen
            report["attack_seconds"][key] = time.perf_counter() - begin
        if args.art:
            m = args.n_unseen or len(x_test)
            art_runs = art_attacks(classifier, x_test[:m], y_test[:m],
                                   art_cw_params(args.art_cw_search_steps, args.art_cw_iter, args.art_cw_const),
                                   args.art_cache)
            report["art_cw_params"], report["art_cached"] = art_runs["art_cw"]["params"], art_runs["art_cw"].get("cached")
            report["attack_seconds"] |= {name: run["seconds"] for name, run in art_runs.items()}
        def test_rows(detector: Detector, label: str) -> dict:
            """Clean FPR (nominal, each benign corruption) and every attack's row on the test images."""
            # detection quality of the non-adaptive attacks only: benchmarks/evaluation.py runs the adaptive ones
            evaluation = evaluate(classifier, detector, x_test, y_test, test_attacks,
                                  results=results, data=args.data, adaptive=None, taylor_inputs=0)
            rows = {
                "clean_fpr": evaluation["detector"]["clean_fpr"],
                "clean_fpr_shifted": evaluation["detector"]["clean_fpr_shifted"],  # each benign corruption, and max
                "calibration": detector.calibration.to_json(),  # the threshold, which cap set it, with what confidence
                "attacks": {name: {k: row[k] for k in ("success_rate", "n_turned", "auroc", "tpr")}
                            for name, row in evaluation["attacks"].items()},
            }
            if args.art:
                rows["attacks"] |= art_rows(detector, x_test, clean_correct, art_runs)
            print(f"{label}: " + ", ".join(f"{n} AUROC {r['auroc']} TPR {r['tpr']}"
                                           for n, r in rows["attacks"].items()), file=sys.stderr)
            return rows

        detectors = {}
        for family in args.families:
            begin = time.perf_counter()
            detectors[family] = fit_detector(seen_sets, family=family, classifier=classifier,
                                             epochs=args.detector_epochs, shifted_fpr=args.shifted_fpr,
                                             calibration_images=x_calibration, verbose=0,
                                             **({"members": args.members} if args.members else {}))
            report["fit_seconds"][family] = time.perf_counter() - begin
            report["families"][family] = test_rows(detectors[family], family)
        for family in [] if args.no_retrain else [f for f in args.retrain_families if f in detectors]:
            begin = time.perf_counter()
            retrained, retrain = retrain_detector(detectors[family], datasets[len(fitted_on):], seen_sets,
                                                  classifier=classifier, shifted_fpr=args.retrain_shifted_fpr,
                                                  calibration_images=x_calibration,
                                                  epochs=args.retrain_epochs if family == "input" else None, verbose=0)
            retrain["seconds"] = time.perf_counter() - begin
            # the retrained detector on the test images too: the new attack unseen there, ART's beside ours
            retrain["test_after"] = test_rows(retrained, f"{family} retrained on {args.retrain_on}")
            report[f"retrain_{family}_on_{args.retrain_on}"] = retrain
    report["best"] = {}
    for name in report["families"][args.families[0]]["attacks"] if report["families"] else []:
        auroc, family = max((row["attacks"][name]["auroc"] or 0.0, f) for f, row in report["families"].items())
        report["best"][name] = {"family": family, "auroc": auroc, "tpr": report["families"][family]["attacks"][name]["tpr"]}
    report["seconds"] = time.perf_counter() - started
    emit(report, args.out)


if __name__ == "__main__":
    main()
