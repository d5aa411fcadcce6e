"""One threshold per detector, set on clean images only, with an honest statement of what it achieves.

`calibrate_threshold` sets the FPR of pristine clean images at the target; `capped_calibration`
also caps the FPR of each benign corruption of them (JPEG, noise, shifts, resizing) at its own
limit, and records which cap set the threshold, so a user sees why the threshold is where it is.

A target is a point estimate (its exact interval is recorded); a cap is a bound: each corruption's
threshold is the smallest whose one-sided exact upper confidence bound (`CAP_CONFIDENCE`) on that
corruption's FPR is at most the cap, so the cap holds on new images of the same kind with that
confidence, not just on the calibration sample (risk control as in Bates et al. 2021, "Distribution-
free, risk-controlling prediction sets"). Set at the sample's own rate, a 10% cap was exceeded on the
test images in most runs (MNIST 12.1%, digits 12.8%; docs/benchmarks.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from scipy.stats import beta, binomtest

CAP_CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A threshold (score > threshold means suspicious) and the clean false-positive rate it gave.

    `fpr_interval` is the exact (Clopper-Pearson) 95% interval of the false-positive rate on new
    clean data, given `fpr` was observed on `n_clean` calibration images.

    With benign corruptions capped (`capped_calibration`): `shifted_fpr` is the cap on each
    corruption's FPR, `shifted_confidence` the confidence with which it holds (None: the cap was
    met on the calibration sample only, as before 2026-12-01), `nominal_threshold` the threshold
    the pristine images alone give, `shifted` per corruption its own threshold, its FPR at
    `threshold`, that FPR's upper confidence bound (`fpr_upper`) and its image count, and
    `bound_by` "nominal" or the corruption whose threshold is `threshold`. None (and absent from
    the JSON) when only pristine images were used.
    """

    threshold: float
    target_fpr: float
    fpr: float
    fpr_interval: tuple[float, float]
    n_clean: int
    shifted_fpr: float | None = None
    shifted_confidence: float | None = None
    nominal_threshold: float | None = None
    shifted: dict[str, dict[str, float]] | None = None
    bound_by: str | None = None

    def to_json(self) -> dict:
        data = dataclasses.asdict(self) | {"fpr_interval": list(self.fpr_interval)}
        return {key: value for key, value in data.items() if value is not None or key in _REQUIRED}

    def warnings(self) -> list[str]:
        """One line per benign corruption whose cap the calibration images were too few to bound."""
        return [f"warning: {rates['n']} calibration images bound the FPR under {name} only at {rates['fpr_upper']:.3f}, "
                f"above the cap {self.shifted_fpr:g}: calibrate on more images"
                for name, rates in (self.shifted or {}).items()
                if self.shifted_confidence is not None and rates["fpr_upper"] > self.shifted_fpr]

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


def upper_bound(false_positives: int, n: int, confidence: float) -> float:
    """The one-sided exact (Clopper-Pearson) upper confidence bound on a rate seen as false_positives / n."""
    return 1.0 if false_positives >= n else float(beta.ppf(confidence, false_positives + 1, n - false_positives))


def allowed_false_positives(n: int, rate: float, confidence: float | None) -> int:
    """How many of n calibration scores a threshold may flag: at most `rate` of them (`confidence`
    None), or the most whose upper confidence bound stays at or below `rate` (0 when even none
    does: fewer images than that confidence needs, about 29 for a 10% cap at 95%)."""
    if confidence is None:
        return math.floor(rate * n + 1e-9)  # 0.29 * 100 is 28.999...
    counts = np.arange(n)
    within = np.flatnonzero(beta.ppf(confidence, counts + 1, n - counts) <= rate)
    return int(within[-1]) if len(within) else 0


def calibrate_threshold(clean_scores: np.ndarray, target_fpr: float, confidence: float | None = None) -> Calibration:
    """The smallest threshold that flags at most `target_fpr` of `clean_scores` (with `confidence`:
    whose upper confidence bound on the FPR is at most `target_fpr`)."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie strictly between 0 and 1, got {target_fpr}")
    scores = np.asarray(clean_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError("calibration needs a non-empty 1-D array of clean scores")
    if not np.isfinite(scores).all():
        raise ValueError("the detector returned NaN or infinite scores on clean calibration images")
    allowed = allowed_false_positives(len(scores), target_fpr, confidence)
    descending = np.sort(scores)[::-1]
    threshold = float(descending[allowed]) if allowed < len(scores) else float(descending[-1])
    return _at_threshold(threshold, target_fpr, scores)


def capped_calibration(
    clean_scores: np.ndarray, shifted_scores: Mapping[str, np.ndarray], target_fpr: float, shifted_fpr: float,
    confidence: float | None = CAP_CONFIDENCE,
) -> Calibration:
    """The smallest threshold that flags at most `target_fpr` of `clean_scores` and keeps the FPR of
    each corruption in `shifted_scores` (name -> scores of the corrupted clean images) at most
    `shifted_fpr` with `confidence` (None: on these scores only): the largest of the thresholds each
    gives alone (every FPR falls as the threshold rises). Ties go to "nominal", then to the first
    corruption."""
    if not shifted_scores:
        raise ValueError("capped calibration needs the scores of at least one benign corruption")
    if not 0.0 < shifted_fpr < 1.0:
        raise ValueError(f"shifted_fpr must lie strictly between 0 and 1, got {shifted_fpr}")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (or be None), got {confidence}")
    nominal = calibrate_threshold(clean_scores, target_fpr)
    own = {name: calibrate_threshold(scores, shifted_fpr, confidence) for name, scores in shifted_scores.items()}
    threshold, bound_by = nominal.threshold, "nominal"
    for name, calibration in own.items():
        if calibration.threshold > threshold:
            threshold, bound_by = calibration.threshold, name
    flags = {name: int(np.sum(np.asarray(scores, np.float64) > threshold)) for name, scores in shifted_scores.items()}
    return _at_threshold(
        threshold, target_fpr, np.asarray(clean_scores, np.float64),
        shifted_fpr=float(shifted_fpr),
        shifted_confidence=None if confidence is None else float(confidence),
        nominal_threshold=nominal.threshold,
        shifted={name: {"threshold": c.threshold, "fpr": flags[name] / c.n_clean,
                        "fpr_upper": upper_bound(flags[name], c.n_clean, confidence or CAP_CONFIDENCE),
                        "n": c.n_clean}
                 for name, c in own.items()},
        bound_by=bound_by,
    )
