"""The adaptive suite (`detector.adaptive_evaluation`) against two guards whose answer is known; prints JSON.

- `mnist-input`: the reference CNN trained briefly on MNIST and a plain `input` detector trained on
  its FGSM and PGD examples (eps 0.3): a broken defence. Every attack of the suite alone should
  bring guarded accuracy to 5% or less on the first --n test images.
- `robust-digits`: the reference CNN adversarially trained on digits with PGD-10 at eps 0.3 (30
  epochs, batch 64, eps warm-up over 3 epochs: clean accuracy about 86%), and an `input` detector on
  its FGSM and PGD examples. The worst case over the suite should be at most the
  classifier's own robust accuracy plus what the detector adds, and no more than an independent
  suite found (18% or less); the classifier alone is measured with `robustness_report` and, with
  `--art-autoattack`, with IBM ART's AutoAttack (a second implementation, benchmark-only) as a check
  that the floor it sets is not an artefact of our own attacks.

    python benchmarks/adaptive_suite.py                        # both settings, default suite
    python benchmarks/adaptive_suite.py --setting mnist-input --n 1000
    python benchmarks/adaptive_suite.py --setting robust-digits --art-autoattack
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np

from attacks import FGSM, PGD
from detector import InputDetector
from detector.adaptive_evaluation import AdaptiveSettings
from detector.evaluation import evaluate
from training.adversarial import robustness_report, training_attack
from training.classifier import accuracy, train_adversarial, train_classifier
from training.data import load_dataset
from timing import emit

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist_keras_arrays.npz"
EPS = 0.3


def input_detector(classifier: keras.Model, x: np.ndarray, y: np.ndarray, calibration: np.ndarray, epochs: int) -> InputDetector:
    """An input detector on FGSM and PGD-10 examples of (x, y) against `classifier`, at 5% FPR."""
    adversarial = np.concatenate([a(classifier, x, y).x_adv for a in (FGSM(eps=EPS), PGD(eps=EPS, steps=10))])
    return InputDetector(epochs=epochs).fit(np.concatenate([x, x]), adversarial, verbose=0).calibrate(calibration, 0.05)


def mnist_input(n: int) -> tuple[keras.Model, InputDetector, np.ndarray, np.ndarray, dict[str, Any]]:
    data = load_dataset(str(MNIST))
    classifier = train_classifier(data.x_train[:20_000], data.y_train[:20_000], 10, epochs=3, verbose=0)
    detector = input_detector(classifier, data.x_train[:5000], data.y_train[:5000], data.x_train[20_000:22_000], epochs=3)
    return classifier, detector, data.x_test[:n], data.y_test[:n], {}


def art_autoattack(classifier: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The classifier alone under ART's AutoAttack at EPS: APGD-CE and APGD-DLR (100 steps, 5
    restarts), Square (5,000 queries), each untargeted and then targeted at every other class;
    robust accuracy is the share classified correctly after the worst of them."""
    from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack

    from peers import art_classifier

    estimator = art_classifier(classifier)
    apgd = [AutoProjectedGradientDescent(estimator, norm=np.inf, eps=EPS, eps_step=2 * EPS, max_iter=100, nb_random_init=5,
                                         batch_size=len(x), loss_type=loss, verbose=False)
            for loss in ("cross_entropy", "difference_logits_ratio")]
    square = SquareAttack(estimator, norm=np.inf, eps=EPS, max_iter=5000, p_init=0.8, nb_restarts=1, verbose=False)
    began = time.perf_counter()
    x_adv = AutoAttack(estimator, norm=np.inf, eps=EPS, attacks=[*apgd, square], batch_size=len(x),
                       targeted=True).generate(x.astype(np.float32), y=y)
    assert np.abs(x_adv - x).max() <= EPS + 1e-5, "ART's AutoAttack left the eps ball"
    return {"robust_accuracy": accuracy(classifier, x_adv, y), "seconds": round(time.perf_counter() - began, 1)}


def robust_digits(n: int) -> tuple[keras.Model, InputDetector, np.ndarray, np.ndarray, dict[str, Any]]:
    data = load_dataset("digits")
    classifier = train_adversarial(data.x_train, data.y_train, data.num_classes, training_attack(f"pgd:eps={EPS},steps=10", EPS),
                                   epochs=30, batch_size=64, warmup_epochs=3.0, verbose=0)
    detector = input_detector(classifier, data.x_train[:1100], data.y_train[:1100], data.x_train[1100:], epochs=10)
    x, y = data.x_test[:n], data.y_test[:n]
    alone = robustness_report(classifier, x, y, eps=EPS, cw_n=0)
    return classifier, detector, x, y, {"classifier_alone_robust_accuracy": alone["robust_accuracy"],
                                        "classifier_alone_strongest": alone["strongest"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("mnist-input", "robust-digits"), nargs="+", default=["robust-digits", "mnist-input"])
    parser.add_argument("--n", type=int, default=1000, help="test images (digits has 360)")
    parser.add_argument("--steps", type=int, default=AdaptiveSettings.steps)
    parser.add_argument("--restarts", type=int, default=AdaptiveSettings.restarts)
    parser.add_argument("--art-autoattack", action="store_true", help="robust-digits: also measure the classifier alone"
                        " under ART's AutoAttack (pip install adversarial-robustness-toolbox multiprocess)")
    args = parser.parse_args()
    settings = AdaptiveSettings(steps=args.steps, restarts=args.restarts, max_inputs=None)
    out: dict[str, Any] = {"backend": keras.backend.backend(), "eps": EPS, "settings": vars(args)}
    for name in args.setting:
        began = time.perf_counter()
        classifier, detector, x, y, extra = (mnist_input if name == "mnist-input" else robust_digits)(args.n)
        setup_s = time.perf_counter() - began
        if args.art_autoattack and name == "robust-digits":
            extra["classifier_alone_art_autoattack"] = art_autoattack(classifier, x, y)
        began = time.perf_counter()
        report = evaluate(classifier, detector, x, y, [PGD(eps=EPS, steps=40)], data=name, adaptive=settings,
                          taylor_inputs=0, progress=False)
        (key, row), = report["adaptive"]["attacks"].items()
        out[name] = {
            "n": len(x), "clean_accuracy": accuracy(classifier, x, y), **extra,
            "guarded_clean_accuracy": report["detector"]["guarded_clean_accuracy"],
            "pgd_guarded_accuracy": report["attacks"]["pgd"]["guarded_accuracy"],
            key: row["guarded_accuracy"], "strongest": row["strongest"],
            "suite": {k: {"guarded_accuracy": r["guarded_accuracy"], "won": r["won"], "steps": r["steps"],
                          "restarts": r["restarts"]} | ({"target_classes": r["target_classes"]} if "target_classes" in r else {})
                      for k, r in row["suite"].items()},
            "setup_seconds": round(setup_s, 1), "evaluation_seconds": round(time.perf_counter() - began, 1),
        }
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    emit(out)


if __name__ == "__main__":
    main()
