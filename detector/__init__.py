"""Detectors of adversarial inputs: one interface, one on-disk layout, calibrated thresholds."""
from __future__ import annotations

import os
from pathlib import Path

from detector.base import Detector
from detector.calibration import Calibration, calibrate_threshold
from detector.input_detector import InputDetector

FAMILIES: dict[str, type[Detector]] = {cls.kind: cls for cls in (InputDetector,)}


def load_detector(directory: str | os.PathLike) -> Detector:
    """Load any detector family from its directory (the manifest says which)."""
    manifest = Detector.read_manifest(directory)
    kind = manifest.get("kind")
    if kind not in FAMILIES:
        raise ValueError(f"detector {directory} is of unknown kind {kind!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[kind]._from_manifest(Path(directory), manifest)


__all__ = ["FAMILIES", "Calibration", "Detector", "InputDetector", "calibrate_threshold", "load_detector"]
