"""One threshold per detector, set on clean images only, with an honest statement of what it achieves.

`calibrate_threshold` caps the FPR of pristine clean images at the target; `capped_calibration`
also caps the FPR of each benign corruption of them (JPEG, noise, shifts, resizing) at its own
limit, and records which cap set the threshold, so a user sees why the threshold is where it is.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from scipy.stats import binomtest


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A threshold (score > threshold means suspicious) and the clean false-positive rate it gave.

    `fpr_interval` is the exact (Clopper-Pearson) 95% interval of the false-positive rate on new
    clean data, given `fpr` was observed on `n_clean` calibration images.

    With benign corruptions capped (`capped_calibration`): `shifted_fpr` is the cap on each
    corruption's FPR, `nominal_threshold` the threshold the pristine images alone give, `shifted`
    per corruption its own threshold, its FPR at `threshold` and its image count, and `bound_by`
    "nominal" or the corruption whose threshold is `threshold`. None (and absent from the JSON)
    when only pristine images were used.
    """

    threshold: float
    target_fpr: float
    fpr: float
    fpr_interval: tuple[float, float]
    n_clean: int
    shifted_fpr: float | None = None
    nominal_threshold: float | None = None
    shifted: dict[str, dict[str, float]] | None = None
    bound_by: str | None = None

    def to_json(self) -> dict:
        data = dataclasses.asdict(self) | {"fpr_interval": list(self.fpr_interval)}
        return {key: value for key, value in data.items() if value is not None or key in _REQUIRED}

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        return cls(**(data | {"fpr_interval": tuple(data["fpr_interval"])}))


_REQUIRED = ("threshold", "target_fpr", "fpr", "fpr_interval", "n_clean")


def flagged(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The one threshold rule: True where a score is above the threshold, or NaN (fail closed)."""
    return ~(np.asarray(scores) <= threshold)


def false_positive_interval(false_positives: int, n: int) -> tuple[float, float]:
    interval = binomtest(false_positives, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(interval.low), float(interval.high)


def _at_threshold(threshold: float, target_fpr: float, clean_scores: np.ndarray, **extra: Any) -> Calibration:
    """The calibration record of `threshold`: the FPR it gives on the clean scores and its interval."""
    false_positives = int(np.sum(clean_scores > threshold))
    return Calibration(threshold=threshold, target_fpr=float(target_fpr), fpr=false_positives / len(clean_scores),
                       fpr_interval=false_positive_interval(false_positives, len(clean_scores)),
                       n_clean=len(clean_scores), **extra)


def calibrate_threshold(clean_scores: np.ndarray, target_fpr: float) -> Calibration:
    """The smallest threshold that flags at most `target_fpr` of `clean_scores`."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie strictly between 0 and 1, got {target_fpr}")
    scores = np.asarray(clean_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError("calibration needs a non-empty 1-D array of clean scores")
    if not np.isfinite(scores).all():
        raise ValueError("the detector returned NaN or infinite scores on clean calibration images")
    allowed = math.floor(target_fpr * len(scores) + 1e-9)  # 0.29 * 100 is 28.999...
    descending = np.sort(scores)[::-1]
    threshold = float(descending[allowed]) if allowed < len(scores) else float(descending[-1])
    return _at_threshold(threshold, target_fpr, scores)


def capped_calibration(
    clean_scores: np.ndarray, shifted_scores: Mapping[str, np.ndarray], target_fpr: float, shifted_fpr: float
) -> Calibration:
    """The smallest threshold that flags at most `target_fpr` of `clean_scores` and at most
    `shifted_fpr` of each corruption's scores in `shifted_scores` (name -> scores of the corrupted
    clean images): the largest of the thresholds each gives alone (every FPR falls as the threshold
    rises). Ties go to "nominal", then to the first corruption."""
    if not shifted_scores:
        raise ValueError("capped calibration needs the scores of at least one benign corruption")
    if not 0.0 < shifted_fpr < 1.0:
        raise ValueError(f"shifted_fpr must lie strictly between 0 and 1, got {shifted_fpr}")
    nominal = calibrate_threshold(clean_scores, target_fpr)
    own = {name: calibrate_threshold(scores, shifted_fpr) for name, scores in shifted_scores.items()}
    threshold, bound_by = nominal.threshold, "nominal"
    for name, calibration in own.items():
        if calibration.threshold > threshold:
            threshold, bound_by = calibration.threshold, name
    return _at_threshold(
        threshold, target_fpr, np.asarray(clean_scores, np.float64),
        shifted_fpr=float(shifted_fpr),
        nominal_threshold=nominal.threshold,
        shifted={name: {"threshold": c.threshold,
                        "fpr": float(np.mean(np.asarray(shifted_scores[name], np.float64) > threshold)),
                        "n": c.n_clean}
                 for name, c in own.items()},
        bound_by=bound_by,
    )
