"""Detection rates a reviewer can check: per attack, on the test split, one threshold for all.

Successful adversarial examples are the positives of the headline numbers (an input the classifier
still gets right needs no detecting); every clean test image is a negative; the same numbers on all
adversarial examples sit beside them (`*_all`). AUROC comes from scikit-learn; TPR and clean FPR
are read at the detector's calibrated threshold, never a per-attack one, and TPR at 1% / 5% FPR off
the test ROC curve. Guarded accuracy counts an input as handled when it is rejected or classified
correctly: for targeted attacks "correctly" means the true label, not "missed the target".
By default adaptive attacks that know the detector run too (`detector.adaptive_evaluation`): their
row per budget is the worst case per input over the suite, each attack's own figures beside it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np

from attacks.base import Attack, AttackResult
from detector.adaptive_evaluation import (
    DEFAULT_ADAPTIVE,
    AdaptiveSettings,
    evaluate_adaptive,
)
from detector.adaptive_outcomes import Checkpoints
from detector.base import Detector
from detector.benign_shift import shifted_fprs
from detector.calibration import false_positive_interval
from detector.metrics import attack_row, correctly_classified, fgsm_taylor, flagged, jsonable
from foundation.storage import atomic_write_json, model_fingerprint, remembered_fingerprints

TAYLOR_POINTS = 21
PACKAGES = ("safetynet", "numpy", "keras", "tensorflow", "jax", "scikit-learn", "scipy", "opencv-python-headless", "matplotlib")


def _predict_labels(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=-1)


def attack_label(attack: Attack) -> str:
    """An attack as its spec without eps: the name and every parameter that differs from the default
    (`pgd:steps=40`, `pgd:norm=2,steps=20`; the default relative step 2.5 / steps is not shown)."""
    changed = []
    for field in dataclasses.fields(attack):
        if not field.init or field.name in ("eps", "clip") or field.default is dataclasses.MISSING:
            continue
        value = getattr(attack, field.name)
        if field.name == "rel_stepsize" and value is not None and np.isclose(value, 2.5 / getattr(attack, "steps", 1)):
            continue
        if value != field.default:
            changed.append(f"{field.name}={value:g}" if isinstance(value, float) else f"{field.name}={value}")
    return attack.name + (":" + ",".join(changed) if changed else "")


def attack_keys(attacks: Sequence[Attack]) -> list[str]:
    """The report keys: each attack's name; where names repeat (an eps sweep), every one of them gets
    its eps (`fgsm@eps=0.1`, `fgsm@eps=0.3`: no bare name that is secretly one of them), then, where
    still equal, its label with the parameters that differ (`pgd:steps=40@eps=0.3`), then a count."""
    keys = [attack.name for attack in attacks]
    for describe in (lambda key, attack: f"{key}@eps={getattr(attack, 'eps', None) or 0:.6g}",
                     lambda key, attack: attack_label(attack) + key[len(attack.name):]):
        keys = [describe(key, attack) if keys.count(key) > 1 else key for key, attack in zip(keys, attacks, strict=True)]
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            keys[i] = f"{key}#{seen[key]}"
    return keys


def display_name(key: str, row: dict[str, Any]) -> str:
    """A row's name in the tables: its key with the attack's name spelt as its label, so that
    `--attacks pgd:steps=40` shows as `pgd:steps=40`, not `pgd`."""
    name = row.get("params", {}).get("attack", "")
    return row["label"] + key[len(name):] if "label" in row and key.startswith(name) and not key.startswith(row["label"]) else key


def check_match(classifier: keras.Model, detector: Detector) -> None:
    """Refuse a detector trained for another classifier (weight fingerprints differ)."""
    expected = detector.classifier_fingerprint
    actual = model_fingerprint(classifier)
    if expected is not None and expected != actual:
        raise ValueError(f"the detector was trained for a different classifier (fingerprint {expected[:12]}...,"
                         f" the model's is {actual[:12]}...): evaluate it with the classifier it was made for")


def detector_fingerprint(detector: Detector) -> str:
    """sha256 over a detector's kind, hyper-parameters, calibration and every weight and array it
    holds (ensemble members included): equal for the same detector saved and loaded again."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, Detector):
            calibration = None if value.calibration is None else value.calibration.to_json()
            digest.update(json.dumps([value.kind, value.get_params(), calibration], sort_keys=True, default=str).encode())
            for name in sorted(vars(value)):
                feed(getattr(value, name))
        elif isinstance(value, keras.Model):
            digest.update(model_fingerprint(value).encode())
        elif isinstance(value, np.ndarray):
            digest.update(str((value.dtype, value.shape)).encode() + np.ascontiguousarray(value).tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)

    feed(detector)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_attacks(classifier: keras.Model, x: np.ndarray, y: np.ndarray, attacks: Sequence[Attack], *,
                targets: str | None = None, batch_size: int = 256, progress: bool = True) -> list[AttackResult]:
    """Each attack's result on (x, y), in order (`targets`: "random" or "least_likely" for targeted)."""
    return [attack(classifier, x, y, targets=targets, batch_size=batch_size, progress=progress) for attack in attacks]


@remembered_fingerprints()  # the classifier is hashed once, not for each check and record
def evaluate(
    classifier: keras.Model,
    detector: Detector,
    x: np.ndarray,
    y: np.ndarray,
    attacks: Sequence[Attack],
    *,
    data: str,
    results: Sequence[AttackResult] | None = None,
    targets: str | None = None,
    adaptive: AdaptiveSettings | None = DEFAULT_ADAPTIVE,
    taylor_inputs: int = 4,
    seed: int = 0,
    command: Sequence[str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
    checkpoints: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run each attack on (x, y) and measure the detector on it; then the adaptive attacks (None
    turns them off), the Taylor picture on the first `taylor_inputs` inputs, and what it takes to
    reproduce the report. `results` (the attacks' results on x, in order; a result may cover only
    the first images of x) skips running them. `checkpoints`: a folder where each finished adaptive
    attack is stored, so that the same call after an interruption resumes where it stopped.

    Returns the report (schema of README "report.json"), strict JSON values only.
    """
    threshold = detector.threshold
    check_match(classifier, detector)
    if results is not None and len(results) != len(attacks):
        raise ValueError(f"{len(results)} precomputed results for {len(attacks)} attacks")
    keras.utils.set_random_seed(seed)
    clean_scores = np.asarray(detector.score(x), np.float64)
    clean_flagged = flagged(clean_scores, threshold)
    clean_correct = correctly_classified(classifier, x, y, batch_size)
    false_positives = int(clean_flagged.sum())
    report: dict[str, Any] = {
        "data": data,
        "n": len(x),
        "classifier": {"clean_accuracy": float(clean_correct.mean()), "fingerprint": model_fingerprint(classifier)},
        "detector": {
            "kind": detector.kind,
            "threshold": float(threshold),
            "target_fpr": detector.calibration.target_fpr,
            "clean_fpr": false_positives / len(x),
            "clean_fpr_interval": list(false_positive_interval(false_positives, len(x))),
            "calibration_fpr": detector.calibration.fpr,
            # where the threshold was set: the held-out sources, or the images train-detector --calibrate-on named
            "calibrated_on": detector.info.get("calibration_images", detector.info.get("calibrated_on", "held-out sources")),
            # the clean FPR on ordinary corruptions of the same images (JPEG, noise, shifts, resizing)
            "clean_fpr_shifted": shifted_fprs(detector, x, seed=seed),
            "guarded_clean_accuracy": float(np.mean(clean_correct | clean_flagged)),
            "fingerprint": detector_fingerprint(detector),
        },
        "attacks": {},
    }
    if results is None:
        results = run_attacks(classifier, x, y, attacks, targets=targets, batch_size=batch_size, progress=progress)
    keyed: dict[str, tuple[Attack, AttackResult]] = {}
    handled: dict[str, np.ndarray] = {}
    curves: dict[str, Any] = {}
    for key, attack, result in zip(attack_keys(attacks), attacks, results, strict=True):
        keyed[key] = (attack, result)
        misclassified = result.success if result.targets is None else _predict_labels(classifier, result.x_adv, batch_size) != y
        scores = np.asarray(detector.score(result.x_adv), np.float64)
        row, curves[key] = attack_row(clean_scores, threshold, scores, result, misclassified, clean_correct[:len(scores)])
        handled[key] = flagged(scores, threshold) | ~misclassified
        report["attacks"][key] = {"eps": getattr(attack, "eps", None), **row, "label": attack_label(attack), "params": attack.get_params()}
    if adaptive is not None:
        identity = [report["classifier"]["fingerprint"], report["detector"]["fingerprint"], seed,
                    [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in (x, y)],
                    [attack.get_params() for attack in attacks]]
        section, adaptive_curves = evaluate_adaptive(
            classifier, detector, x, y, keyed, handled, clean_scores, clean_correct, adaptive, seed=seed,
            batch_size=batch_size, progress=progress,
            checkpoints=None if checkpoints is None else Checkpoints(Path(checkpoints), json.dumps(identity, default=str)))
        if section is not None:
            report["adaptive"] = section
            report["detector"]["gradient_masking_check"] = any(r["gradient_masking_check"] for r in section["attacks"].values())
            curves |= adaptive_curves
    report["curves"] = curves
    if taylor_inputs > 0:
        linf = [a.eps for a in attacks if getattr(a, "norm", "inf") == "inf" and isinstance(getattr(a, "eps", None), float)]
        report["taylor"] = fgsm_taylor(classifier, x[:taylor_inputs], y[:taylor_inputs],
                                       np.linspace(0.0, max(linf, default=0.1), TAYLOR_POINTS))
    report["reproducibility"] = {
        "seed": seed, "command": None if command is None else list(command), "backend": keras.backend.backend(),
        "versions": _versions(), "classifier_fingerprint": report["classifier"]["fingerprint"],
        "detector_fingerprint": report["detector"]["fingerprint"], "targets": targets,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return jsonable(report)


def _cell(value: float | None, width: int = 9) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.4f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table for the terminal (adaptive rows after the others)."""
    det = report["detector"]
    lines = [
        f"data: {report['data']}  (n={report['n']})",
        f"classifier clean accuracy: {report['classifier']['clean_accuracy']:.4f}",
        (f"detector: {det['kind']}  threshold {det['threshold']:.4g}  target FPR {det['target_fpr']:.3f}"
         f"  clean FPR {det['clean_fpr']:.4f} [{det['clean_fpr_interval'][0]:.4f}, {det['clean_fpr_interval'][1]:.4f}]"),
    ]
    if det.get("clean_fpr_shifted"):
        lines.append("clean FPR under benign shifts: "
                     + "  ".join(f"{name} {fpr:.4f}" for name, fpr in det["clean_fpr_shifted"].items()))
    adaptive = report.get("adaptive") or {"attacks": {}}
    rows = [*report["attacks"].items(), *adaptive["attacks"].items()]
    rows = [(display_name(name, row), row) for name, row in rows]
    width = max(30, *(len(name) + 2 for name, _ in rows))  # a long key (eps 8/255 printed in full) keeps its column
    lines += ["", f"{'attack':<{width}}{'eps':>8}{'success':>10}{'AUROC':>9}{'TPR':>9}{'guarded acc':>13}"]
    for name, row in rows:
        eps = "n/a" if row["eps"] is None else f"{row['eps']:.4g}"
        flag = "  <- gradient masking check" if row.get("gradient_masking_check") else ""
        lines.append(f"{name:<{width}}{eps:>8}{row['success_rate']:>10.4f}{_cell(row['auroc'])}{_cell(row['tpr'])}"
                     f"{row['guarded_accuracy']:>13.4f}{flag}")
        for attack, own in row.get("suite", {}).items():  # the worst case's attacks, each alone
            lines.append(f"{'  ' + attack:<{width}}{eps:>8}{own['success_rate']:>10.4f}{'':>18}{own['guarded_accuracy']:>13.4f}"
                         f"  won {own['won']}")
    if report.get("adaptive"):
        lines.append(f"adaptive attacks: detector stand-in {adaptive['stand_in']['method']} "
                     f"(decision agreement {adaptive['stand_in']['decision_agreement']:.4f})")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write report.json (atomically) into `out_dir` and return its path."""
    return atomic_write_json(Path(out_dir) / "report.json", report)
