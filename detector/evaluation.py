"""Detection rates a reviewer can check: per attack, on the test split, one threshold for all.

Only successful adversarial examples count as positives (an input the classifier still gets right
needs no detecting); every clean test image counts as a negative. AUROC comes from scikit-learn;
TPR and clean FPR are read at the detector's calibrated threshold, never a per-attack one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
from sklearn.metrics import roc_auc_score

from attacks.base import Attack, AttackResult
from attacks.storage import atomic_write_json, model_fingerprint
from detector.base import Detector
from detector.calibration import false_positive_interval


def _finite_or_none(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def _predict_labels(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=-1)


def attack_key(attack: Attack, taken: Sequence[str]) -> str:
    """The report key of an attack: its name; its eps is added when the name is taken, then a count."""
    candidates = [attack.name, f"{attack.name}@eps={getattr(attack, 'eps', '?')}"]
    for key in candidates + [f"{candidates[1]}#{k}" for k in range(2, len(taken) + 3)]:
        if key not in taken:
            return key
    raise AssertionError("unreachable: more candidates than taken keys")


def evaluate(
    classifier: keras.Model,
    detector: Detector,
    x: np.ndarray,
    y: np.ndarray,
    attacks: Sequence[Attack],
    *,
    data: str,
    results: Sequence[AttackResult] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Run each attack on (x, y) and measure the detector on its successful examples. `results`
    (the attacks' results on x, in order) skips running them: one run serves several detectors.

    Returns the report (schema of README "report.json"): clean accuracy, the detector's threshold
    and clean FPR, and per attack eps, success rate, AUROC, TPR and guarded accuracy (an input
    counts as handled when it is rejected or classified correctly).
    """
    threshold = detector.threshold
    clean_scores = detector.score(x)
    clean_flagged = ~(clean_scores <= threshold)
    clean_correct = _predict_labels(classifier, x, batch_size) == y
    false_positives = int(clean_flagged.sum())
    report: dict[str, Any] = {
        "data": data,
        "n": int(len(x)),
        "classifier": {
            "clean_accuracy": float(clean_correct.mean()),
            "fingerprint": model_fingerprint(classifier),
        },
        "detector": {
            "kind": detector.kind,
            "threshold": float(threshold),
            "target_fpr": detector.calibration.target_fpr,
            "clean_fpr": false_positives / len(x),
            "clean_fpr_interval": list(false_positive_interval(false_positives, len(x))),
            "calibration_fpr": detector.calibration.fpr,
            "guarded_clean_accuracy": float(np.mean(clean_correct | clean_flagged)),
        },
        "attacks": {},
    }
    if results is not None and len(results) != len(attacks):
        raise ValueError(f"{len(results)} precomputed results for {len(attacks)} attacks")
    for number, attack in enumerate(attacks):
        result = results[number] if results is not None else attack(classifier, x, y, batch_size=batch_size, progress=progress)
        scores = detector.score(result.x_adv)
        flagged = ~(scores <= threshold)
        success = result.success
        positives = scores[success]
        auroc = (
            roc_auc_score(np.r_[np.zeros(len(clean_scores)), np.ones(len(positives))], np.r_[clean_scores, positives])
            if len(positives)
            else float("nan")
        )
        report["attacks"][attack_key(attack, list(report["attacks"]))] = {
            "eps": _finite_or_none(float(getattr(attack, "eps", float("nan")))),
            "success_rate": result.success_rate,
            "auroc": _finite_or_none(auroc),
            "tpr": _finite_or_none(float(flagged[success].mean()) if success.any() else float("nan")),
            "n_successful": int(success.sum()),
            "mean_linf": float(result.linf.mean()),
            "mean_l2": float(result.l2.mean()),
            "guarded_accuracy": float(np.mean(flagged | ~success)),
            "params": attack.params(),
        }
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table for the terminal."""
    det = report["detector"]
    lines = [
        f"data: {report['data']}  (n={report['n']})",
        f"classifier clean accuracy: {report['classifier']['clean_accuracy']:.4f}",
        f"detector: {det['kind']}  threshold {det['threshold']:.4g}  target FPR {det['target_fpr']:.3f}"
        f"  clean FPR {det['clean_fpr']:.4f} [{det['clean_fpr_interval'][0]:.4f}, {det['clean_fpr_interval'][1]:.4f}]",
        "",
        f"{'attack':<16}{'eps':>8}{'success':>10}{'AUROC':>9}{'TPR':>9}{'guarded acc':>13}",
    ]
    for name, row in report["attacks"].items():
        auroc = "n/a" if row["auroc"] is None else f"{row['auroc']:.4f}"
        tpr = "n/a" if row["tpr"] is None else f"{row['tpr']:.4f}"
        lines.append(
            f"{name:<16}{row['eps']:>8.4g}{row['success_rate']:>10.4f}{auroc:>9}{tpr:>9}{row['guarded_accuracy']:>13.4f}"
        )
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write report.json (atomically) into `out_dir` and return its path."""
    return atomic_write_json(Path(out_dir) / "report.json", report)
