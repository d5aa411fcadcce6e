"""The cross-attack matrix: a detector trained on attack A, tested on attack B, for every pair.

The diagonal is what a detector's authors usually report; the rest is what an attacker who picks
another attack meets. Each training attack gets its own detector from `fit(x_clean, x_adversarial)`
(the caller's factory, e.g. an `input` detector with few epochs), calibrated on a held-out fraction
of the clean training images at `target_fpr`; each is tested on the given results on the test
images (successful examples as positives, every clean test image as a negative).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np

from attacks.base import Attack, AttackResult
from detector.base import Detector
from detector.metrics import auroc, correctly_classified, flagged, jsonable

Fit = Callable[[np.ndarray, np.ndarray], Detector]
TrainingSet = Attack | tuple[np.ndarray, np.ndarray]


def _training_pair(classifier: keras.Model, source: TrainingSet, x_train: np.ndarray | None,
                   y_train: np.ndarray | None, batch_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(source, Attack):
        if x_train is None or y_train is None:
            raise ValueError(f"training attack {name!r} is an attack: give x_train and y_train to run it on")
        return x_train, source(classifier, x_train, y_train, batch_size=batch_size).x_adv
    if not (isinstance(source, tuple) and len(source) == 2):
        raise ValueError(f"training set {name!r} must be an Attack or an (x_clean, x_adversarial) pair")
    x_clean, x_adversarial = (np.asarray(a, np.float32) for a in source)
    if x_clean.shape != x_adversarial.shape:
        raise ValueError(f"training set {name!r}: clean {x_clean.shape} and adversarial {x_adversarial.shape} differ")
    return x_clean, x_adversarial


def cross_attack_matrix(
    classifier: keras.Model,
    train: Mapping[str, TrainingSet],
    test: Mapping[str, AttackResult],
    x_test: np.ndarray,
    y_test: np.ndarray,
    fit: Fit,
    *,
    x_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    target_fpr: float = 0.05,
    calibration_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Train one detector per entry of `train` (an attack, run on x_train / y_train, or a pair of
    paired clean and adversarial images) and test each on every result in `test` (on x_test): its
    positives are the examples the attack turned (successful, from an image of x_test the classifier
    gets right, as in `detector.metrics.attack_row`).

    Returns {"train": names, "test": names, "auroc": rows x columns, "tpr": ..., "clean_fpr": per
    row, "target_fpr", "n_train": per row}; strict JSON values.
    """
    if not train or not test:
        raise ValueError("the cross-attack matrix needs at least one training and one test attack")
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
    rng = np.random.default_rng(seed)
    clean_correct = correctly_classified(classifier, x_test, y_test, batch_size)
    turned = {name: np.asarray(result.success) & clean_correct for name, result in test.items()}
    matrix: dict[str, Any] = {"train": list(train), "test": list(test), "auroc": [], "tpr": [], "clean_fpr": [],
                              "target_fpr": target_fpr, "n_train": []}
    for name, source in train.items():
        x_clean, x_adversarial = _training_pair(classifier, source, x_train, y_train, batch_size, name)
        held = rng.random(len(x_clean)) < calibration_fraction
        if held.all() or not held.any():
            raise ValueError(f"training set {name!r} ({len(x_clean)} images) is too small to hold out calibration images")
        keras.utils.set_random_seed(seed)
        detector = fit(x_clean[~held], x_adversarial[~held]).calibrate(x_clean[held], target_fpr)
        clean_scores = np.asarray(detector.score(x_test), np.float64)
        aurocs, tprs = [], []
        for test_name, result in test.items():
            positives = (np.asarray(detector.score(result.x_adv[turned[test_name]]), np.float64)
                         if turned[test_name].any() else np.empty(0))
            aurocs.append(auroc(clean_scores, positives))
            tprs.append(float(np.mean(flagged(positives, detector.threshold))) if len(positives) else None)
        matrix["auroc"].append(aurocs)
        matrix["tpr"].append(tprs)
        matrix["clean_fpr"].append(float(np.mean(flagged(clean_scores, detector.threshold))))
        matrix["n_train"].append(int((~held).sum()))
    return jsonable(matrix)
