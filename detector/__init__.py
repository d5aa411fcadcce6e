"""Detectors of adversarial inputs: one interface, one on-disk layout, calibrated thresholds."""
from __future__ import annotations

import os
from pathlib import Path

import keras

from detector.activations import ActivationDetector
from detector.base import Detector
from detector.calibration import Calibration, calibrate_threshold
from detector.ensemble import EnsembleDetector
from detector.input_detector import InputDetector
from detector.joint import JointDetector
from detector.mahalanobis import MahalanobisDetector
from detector.squeeze import SqueezeDetector
from detector.svm import SafetyNetDetector

FAMILIES: dict[str, type[Detector]] = {
    cls.kind: cls
    for cls in (InputDetector, ActivationDetector, SafetyNetDetector, MahalanobisDetector, SqueezeDetector, EnsembleDetector,
                JointDetector)
}


def load_detector(directory: str | os.PathLike, classifier: keras.Model | None = None) -> Detector:
    """Load any detector family from its directory (the manifest says which). Families that read
    the classifier's activations or outputs need `classifier`, checked against their fingerprint."""
    manifest = Detector.read_manifest(directory)
    kind = manifest.get("kind")
    if kind not in FAMILIES:
        raise ValueError(f"detector {directory} is of unknown kind {kind!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[kind]._from_manifest(Path(directory), manifest, classifier=classifier)


__all__ = [
    "FAMILIES", "ActivationDetector", "Calibration", "Detector", "EnsembleDetector", "InputDetector", "JointDetector",
    "MahalanobisDetector", "SafetyNetDetector", "SqueezeDetector", "calibrate_threshold", "load_detector",
]
