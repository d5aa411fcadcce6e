"""The numbers of an evaluation, as plain functions of score arrays (hand-checkable), plus the
first-order Taylor picture of a classifier's loss along the FGSM direction.

Conventions: a score above the threshold is flagged (NaN scores are flagged: fail closed). Clean
images are the negatives. "TPR at x% FPR" reads the ROC curve built on the test clean images (the
best threshold that flags at most x% of them), unlike `tpr`, which uses the detector's calibrated
threshold. Guarded accuracy: an input counts as handled when it is rejected or classified correctly.
"""
from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops
from sklearn.metrics import roc_auc_score, roc_curve

from attacks.base import AttackResult
from detector.calibration import flagged
from foundation.backend import compile_with_model, value_and_grad

FPR_LEVELS = (0.01, 0.05)
ROC_POINTS = 200
HISTOGRAM_BINS = 30


def jsonable(value: Any) -> Any:
    """`value` with tuples as lists, numpy scalars and arrays as Python values, NaN and inf as None,
    so that report.json is strict JSON and loads back equal."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of positives vs negatives (None without both; NaN scores count as
    the most suspicious)."""
    if len(negatives) == 0 or len(positives) == 0:
        return None
    scores = np.nan_to_num(np.r_[negatives, positives].astype(np.float64), nan=np.inf)
    return float(roc_auc_score(np.r_[np.zeros(len(negatives)), np.ones(len(positives))], scores))


def tpr_at_fpr(negatives: np.ndarray, positives: np.ndarray, fpr: float) -> float | None:
    """The fraction of positives above the lowest threshold that flags at most `fpr` of negatives."""
    if len(negatives) == 0 or len(positives) == 0:
        return None
    descending = np.sort(np.nan_to_num(np.asarray(negatives, np.float64), nan=np.inf))[::-1]
    allowed = math.floor(fpr * len(descending) + 1e-9)
    threshold = descending[allowed] if allowed < len(descending) else -np.inf
    return float(np.mean(flagged(positives, threshold)))


def rate(mask: np.ndarray) -> float | None:
    return float(np.mean(mask)) if len(mask) else None


def detection(negatives: np.ndarray, positives: np.ndarray, threshold: float, suffix: str = "") -> dict[str, Any]:
    """AUROC, TPR at the calibrated threshold and TPR at each of `FPR_LEVELS`, keys ending in `suffix`."""
    row = {f"auroc{suffix}": auroc(negatives, positives), f"tpr{suffix}": rate(flagged(positives, threshold))}
    for level in FPR_LEVELS:
        row[f"tpr_at_{level * 100:g}pct_fpr{suffix}"] = tpr_at_fpr(negatives, positives, level)
    return row


def guarded_accuracy(rejected: np.ndarray, misclassified: np.ndarray) -> float:
    """Fraction of inputs handled: rejected, or not misclassified."""
    return float(np.mean(rejected | ~misclassified))


def roc_points(negatives: np.ndarray, positives: np.ndarray) -> dict[str, list[float]] | None:
    """The ROC curve, thinned to at most `ROC_POINTS` points (for plots)."""
    if len(negatives) == 0 or len(positives) == 0:
        return None
    scores = np.nan_to_num(np.r_[negatives, positives].astype(np.float64), nan=np.inf, posinf=1e300)
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(negatives)), np.ones(len(positives))], scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}


def histogram(clean: np.ndarray, adversarial: np.ndarray) -> dict[str, list[float]]:
    """Counts of clean and adversarial scores over shared bins (finite scores only; for plots)."""
    both = np.r_[clean, adversarial].astype(np.float64)
    both = both[np.isfinite(both)]
    edges = np.histogram_bin_edges(both if len(both) else [0.0, 1.0], bins=HISTOGRAM_BINS)

    def count(scores: np.ndarray) -> list[int]:
        scores = np.asarray(scores, np.float64)
        return np.histogram(scores[np.isfinite(scores)], bins=edges)[0].tolist()

    return {"edges": edges.tolist(), "clean": count(clean), "adversarial": count(adversarial)}


def fgsm_taylor(model: keras.Model, x: np.ndarray, y: np.ndarray, eps: np.ndarray) -> dict[str, Any]:
    """For each input, the cross-entropy loss at x + e * sign(grad) for each e in `eps` (no clipping)
    beside its first-order prediction L(x) + e * ||grad||_1. Where the two part early, FGSM's
    linear model of the loss is poor; a loss that stays flat while the prediction climbs is the
    picture of a masked gradient."""
    def loss_and_gradient(forward: Any, images: Any, labels: Any) -> tuple:
        def loss(z: Any) -> tuple[Any, Any]:
            value = keras.losses.sparse_categorical_crossentropy(labels, forward(z), from_logits=True)
            return value, value
        return value_and_grad(loss, images)

    images, labels = np.asarray(x, np.float32), np.asarray(y, np.int32)
    value, _, grad = compile_with_model(model, loss_and_gradient)(ops.convert_to_tensor(images), ops.convert_to_tensor(labels))
    value, grad = ops.convert_to_numpy(value).astype(np.float64), ops.convert_to_numpy(grad)
    l1 = np.abs(grad.reshape(len(images), -1)).sum(axis=1).astype(np.float64)
    direction = np.sign(grad)
    losses = []
    for e in eps:
        logits = model.predict(images + np.float32(e) * direction, verbose=0)
        losses.append(ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
    return {"eps": [float(e) for e in eps], "loss": np.stack(losses, axis=1).tolist(),
            "first_order": (value[:, None] + np.outer(l1, eps)).tolist(), "grad_l1": l1.tolist()}


def correctly_classified(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Whether the classifier gets each clean input right: what an attack can turn (`attack_row`)."""
    return np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=-1) == y


def attack_row(clean_scores: np.ndarray, threshold: float, scores: np.ndarray, result: AttackResult,
               misclassified: np.ndarray, clean_correct: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """One attack's report row (detection on the examples it turned and on all, success, norms,
    guarded accuracy) and its curves (ROC on the turned and on all examples, score histogram).

    The positives are the examples the attack turned: successful, from an image the classifier got
    right (`clean_correct`). Its own clean errors are no attack: a minimal attack (CW, DeepFool)
    returns them unchanged, and counting them as misses would mix the classifier's clean error into
    the detector's TPR (as in Carlini & Wagner 2017 and Lee et al. 2018). Guarded accuracy still
    counts every input."""
    success = np.asarray(result.success)
    turned = success & np.asarray(clean_correct)
    row = {
        "success_rate": result.success_rate,
        **detection(clean_scores, scores[turned], threshold),
        **detection(clean_scores, scores, threshold, "_all"),
        "n_successful": int(success.sum()),
        "n_turned": int(turned.sum()),
        "mean_linf": float(result.linf.mean()),
        "mean_l2": float(result.l2.mean()),
        "mean_linf_successful": float(result.linf[success].mean()) if success.any() else None,
        "mean_l2_successful": float(result.l2[success].mean()) if success.any() else None,
        "targeted": result.targets is not None,
        "misclassification_rate": float(np.mean(misclassified)),
        "guarded_accuracy": guarded_accuracy(flagged(scores, threshold), misclassified),
    }
    curves = {"roc": roc_points(clean_scores, scores[turned]), "roc_all": roc_points(clean_scores, scores),
              "histogram": histogram(clean_scores, scores[turned])}
    return row, curves
