"""One threshold per detector, set on clean images only, with an honest statement of what it achieves."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.stats import binomtest


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A threshold (score > threshold means suspicious) and the clean false-positive rate it gave.

    `fpr_interval` is the exact (Clopper-Pearson) 95% interval of the false-positive rate on new
    clean data, given `fpr` was observed on `n_clean` calibration images.
    """

    threshold: float
    target_fpr: float
    fpr: float
    fpr_interval: tuple[float, float]
    n_clean: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"fpr_interval": list(self.fpr_interval)}

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        return cls(**(data | {"fpr_interval": tuple(data["fpr_interval"])}))


def flagged(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The one threshold rule: True where a score is above the threshold, or NaN (fail closed)."""
    return ~(np.asarray(scores) <= threshold)


def false_positive_interval(false_positives: int, n: int) -> tuple[float, float]:
    interval = binomtest(false_positives, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(interval.low), float(interval.high)


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
    false_positives = int(np.sum(scores > threshold))
    return Calibration(
        threshold=threshold,
        target_fpr=float(target_fpr),
        fpr=false_positives / len(scores),
        fpr_interval=false_positive_interval(false_positives, len(scores)),
        n_clean=len(scores),
    )
