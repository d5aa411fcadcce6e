"""Detectors of adversarial inputs: one interface, one on-disk layout, calibrated thresholds."""
from __future__ import annotations

from detector.activations import ActivationDetector
from detector.base import FAMILIES, Detector, load_detector
from detector.calibration import Calibration, calibrate_threshold
from detector.ensemble import EnsembleDetector
from detector.input_detector import InputDetector
from detector.joint import JointDetector
from detector.mahalanobis import MahalanobisDetector
from detector.margin import MarginDetector, ShiftDropDetector, ShiftMarginDetector
from detector.odds import OddsDetector
from detector.squeeze import SqueezeDetector
from detector.svm import SafetyNetDetector

FAMILIES.update({
    cls.kind: cls
    for cls in (InputDetector, ActivationDetector, SafetyNetDetector, MahalanobisDetector, SqueezeDetector,
                MarginDetector, ShiftMarginDetector, ShiftDropDetector, OddsDetector, EnsembleDetector, JointDetector)
})


__all__ = [
    "FAMILIES", "ActivationDetector", "Calibration", "Detector", "EnsembleDetector", "InputDetector", "JointDetector",
    "MahalanobisDetector", "MarginDetector", "OddsDetector", "SafetyNetDetector", "ShiftDropDetector", "ShiftMarginDetector",
    "SqueezeDetector",
    "calibrate_threshold", "load_detector",
]
