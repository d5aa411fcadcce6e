"""What guarding costs at serving time, and what it catches, on ImageNet MobileNet; prints JSON.

Model: MobileNet (alpha 0.75, 224 x 224, ImageNet weights from ../shared/data/imagenet, loaded offline
through a temporary KERAS_HOME) behind a Rescaling layer, so the guarded model takes [0, 1] images;
its softmax is cut (the logits contract).

Detector (the default this benchmark argues for): the `activations` family on ONE intermediate
activation MobileNet computes anyway (`conv_pw_11_relu`, 14 x 14 x 384) with a 32-wide head. The
guard's fused scoring model runs the classifier once and the head on the tapped activation, so the
overhead is the head alone (the `input` family would run a second CNN on the 224 x 224 image).

Latency: the same calling method for every variant (`predict_on_batch`, one compiled graph), measured
interleaved round after round so that background load hits all variants alike; `guard_predict` is
the whole `Guard.predict` (input checks, fused model, softmax, threshold, stats).

Quality: clean images are CIFAR-10 images resized to 224 with OpenCV (training split: fitting and
calibration; test split: held out) plus the photos in ../shared/data/photos (held out). FGSM and PGD
at `--eps` are crafted against the classifier's own predictions; the detector is fitted on the
fitting images and their adversarial versions, calibrated to 5% FPR on the calibration images, and
evaluated (AUROC, TPR at the calibrated threshold, on successful adversarial examples) on the held-out
ones, with FGSM at half the budget as an attack strength it was not trained on. Two checks of what it
should NOT flag: the clean photos (real 224 x 224 images, unlike the upscaled CIFAR it was fitted on)
and the test images plus random-sign noise of the same budget (a benign perturbation).

    python benchmarks/serving_overhead.py [--n-fit 360] [--eps 4/255] [--out results.json]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import emit  # noqa: E402 (no keras: it loads in `run`, after KERAS_HOME is set)
# keras and the project's modules (which import keras) are imported in `run`, after KERAS_HOME is set

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = ("mobilenet_7_5_224_tf.h5", "imagenet_class_index.json")
SIZE = 224
TARGET_RATIO = 1.15  # Guard.predict latency over the bare classifier's at batch 64


def offline_keras_home(data: Path) -> Path:
    """A temporary KERAS_HOME whose models/ holds the MobileNet weights (set before keras loads)."""
    home = Path(tempfile.mkdtemp(prefix="keras-home-"))
    (home / "models").mkdir()
    for name in WEIGHTS:
        shutil.copy(data / "imagenet" / name, home / "models" / name)
    os.environ["KERAS_HOME"] = str(home)
    return home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--n-fit", type=int, default=360, help="CIFAR-10 training images to fit the detector on")
    parser.add_argument("--n-calibrate", type=int, default=120, help="further training images to calibrate on")
    parser.add_argument("--n-test", type=int, default=120, help="CIFAR-10 test images held out (plus the photos)")
    parser.add_argument("--eps", default="4/255", help="L-inf budget of FGSM and PGD")
    parser.add_argument("--pgd-steps", type=int, default=5)
    parser.add_argument("--layers", nargs="+", default=["conv_pw_11_relu"], help="MobileNet activations to read")
    parser.add_argument("--width", type=int, default=32, help="detector head width")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per batch size")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    started = time.perf_counter()
    home = offline_keras_home(args.data)
    try:
        report = run(args)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.out)


def run(args: argparse.Namespace) -> dict:
    import keras

    from attacks import FGSM, PGD, parse_attack_spec
    from detector import ActivationDetector
    from foundation.models import logits_model
    from serving import Guard
    from training.data import load_dataset

    eps = parse_attack_spec(f"fgsm:eps={args.eps}").eps
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    scaled = keras.layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(inputs)
    classifier = logits_model(keras.applications.MobileNet(alpha=0.75, weights="imagenet", input_tensor=scaled))

    cifar = load_dataset(str(args.data / "cifar10"))
    n_train = args.n_fit + args.n_calibrate
    x_train = resize(cifar.x_train[:n_train])
    x_fit, x_calibrate = x_train[: args.n_fit], x_train[args.n_fit :]
    x_test = np.concatenate([resize(cifar.x_test[: args.n_test]), photos(args.data / "photos")])

    def predicted(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.argmax(classifier.predict_on_batch(x[i : i + 64]), -1) for i in range(0, len(x), 64)])

    attacks = {"fgsm": FGSM(eps=eps), "pgd": PGD(eps=eps, steps=args.pgd_steps)}
    y_fit, y_test = predicted(x_fit), predicted(x_test)
    x_adv_fit = np.concatenate([attack(classifier, x_fit, y_fit, batch_size=32).x_adv for attack in attacks.values()])
    attacks["fgsm_half_eps_unseen"] = FGSM(eps=eps / 2)
    test_attacks = {name: attack(classifier, x_test, y_test, batch_size=32) for name, attack in attacks.items()}

    fit_started = time.perf_counter()
    detector = ActivationDetector(classifier, layers=args.layers, width=args.width, epochs=15, batch_size=64)
    detector.fit(x_fit, x_adv_fit, verbose=0).calibrate(x_calibrate, 0.05)
    fit_seconds = time.perf_counter() - fit_started
    guard = Guard(classifier, detector)

    cifar_rows = slice(0, args.n_test)  # then the 3 photos
    clean = guard.predict(x_test)
    quality = {}
    for name, attack in attacks.items():
        result = test_attacks[name]
        guarded, success = guard.predict(result.x_adv), result.success[cifar_rows]
        quality[name] = {
            "eps": float(attack.eps),
            "success_rate": float(success.mean()),
            "auroc": auroc(clean.scores[cifar_rows], guarded.scores[cifar_rows][success]),
            "tpr": float(guarded.rejected[cifar_rows][success].mean()),
            "photos_rejected": guarded.rejected[args.n_test :].tolist(),
        }

    # a benign perturbation of the same size (uniform random signs): what the detector should NOT flag
    noisy = np.clip(x_test + eps * np.random.default_rng(0).choice([-1.0, 1.0], x_test.shape), 0, 1).astype(np.float32)
    noise = guard.predict(noisy)
    timings = latency(classifier, guard, x_test, args.repeats)
    overhead = timings["batch_64"]["guard_predict"]
    return {
        "model": "MobileNet alpha=0.75 224x224 ImageNet (Rescaling [0,1] -> [-1,1], logits)",
        "detector": {
            "family": detector.kind, "layers": detector.layers, "width": detector.width,
            "head_parameters": int(detector.model.count_params()),
            "classifier_parameters": int(classifier.count_params()),
            "threshold": detector.threshold, "calibration_fpr": detector.calibration.fpr,
            "fit_seconds": round(fit_seconds, 1),
        },
        "data": {
            "fit": f"{args.n_fit} CIFAR-10 train images resized to 224 + FGSM and PGD versions",
            "calibrate": f"{args.n_calibrate} further CIFAR-10 train images",
            "test": f"{args.n_test} CIFAR-10 test images resized to 224 + 3 photos",
            "photos": sorted(p.name for p in (args.data / "photos").glob("*.jpg")),
            "pgd_steps": args.pgd_steps,
        },
        "clean_test_fpr": float(clean.rejected[cifar_rows].mean()),
        "clean_photos": {"rejected": clean.rejected[args.n_test :].tolist(),
                         "scores": np.round(clean.scores[args.n_test :], 3).tolist()},
        "attacks": quality,
        "random_sign_noise": {"eps": eps, "rejected_rate": float(noise.rejected[cifar_rows].mean()),
                              "auroc_vs_clean": auroc(clean.scores[cifar_rows], noise.scores[cifar_rows])},
        "latency": timings,
        "target_guard_over_classifier_batch_64": {"max": TARGET_RATIO, "wall_ratio": overhead["wall_ratio"],
                                                  "cpu_ratio": overhead["cpu_ratio"],
                                                  "met": max(overhead["wall_ratio"], overhead["cpu_ratio"]) <= TARGET_RATIO},
        "cpu": f"{os.cpu_count()} cores",
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def resize(images: np.ndarray) -> np.ndarray:
    """CIFAR images (float in [0, 1]) up to 224 x 224 with bicubic interpolation, clipped back."""
    return np.stack([cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) for image in images]).clip(0, 1)


def photos(folder: Path) -> np.ndarray:
    """The photos centre-cropped to a square and resized to 224, RGB float in [0, 1]."""
    images = []
    for path in sorted(folder.glob("*.jpg")):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        side = min(image.shape[:2])
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        square = image[top : top + side, left : left + side]
        images.append(cv2.resize(square, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255)
    if len(images) != 3:
        raise ValueError(f"expected the 3 photos in {folder}, found {len(images)}")
    return np.stack(images)


def auroc(clean_scores: np.ndarray, adversarial_scores: np.ndarray) -> float | None:
    if len(adversarial_scores) == 0:
        return None
    labels = np.r_[np.zeros(len(clean_scores)), np.ones(len(adversarial_scores))]
    return float(roc_auc_score(labels, np.r_[clean_scores, adversarial_scores]))


def latency(classifier: Any, guard: Any, x: np.ndarray, repeats: int) -> dict:
    """Per batch size and variant: wall-clock and CPU milliseconds per call (median and min over
    interleaved rounds) and the ratio to the bare classifier (median over rounds of the per-round
    ratio). CPU time counts this process's threads only: what a call costs even while other
    processes load the machine; wall time is what a client waits. Variants: the bare classifier,
    the fused scoring model, `Guard.predict`, and `Guard.predict` with classifier and detector apart."""
    from serving import Guard

    unfused = Guard(classifier, guard.detector)
    unfused.scoring_model = None
    variants = {
        "classifier": classifier.predict_on_batch,
        "fused_model": guard.scoring_model.predict_on_batch,
        "guard_predict": guard.predict,
        "unfused_guard_predict": unfused.predict,
    }
    out = {}
    for batch in (1, 64):
        xb = np.resize(x, (batch, *x.shape[1:])).astype(np.float32)  # the first `batch` images
        for call in variants.values():  # warm up: trace and compile once
            call(xb)
        wall, cpu = {name: [] for name in variants}, {name: [] for name in variants}
        rounds = repeats * (4 if batch == 1 else 1)
        for _ in range(rounds):
            for name, call in variants.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                call(xb)
                wall[name].append(1000 * (time.perf_counter() - start))
                cpu[name].append(1000 * (time.process_time() - start_cpu))
        row: dict = {"rounds": rounds}
        for name in variants:
            row[name] = {"wall_ms_median": round(float(np.median(wall[name])), 2),
                         "wall_ms_min": round(float(np.min(wall[name])), 2),
                         "cpu_ms_median": round(float(np.median(cpu[name])), 2)}
            if name != "classifier":
                row[name]["wall_ratio"] = round(float(np.median(np.divide(wall[name], wall["classifier"]))), 3)
                row[name]["cpu_ratio"] = round(float(np.median(np.divide(cpu[name], cpu["classifier"]))), 3)
        out[f"batch_{batch}"] = row
    return out


if __name__ == "__main__":
    main()
