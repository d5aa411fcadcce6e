"""The guard directory: a classifier, the detector in front of it, and the guard's settings.

`guard.json` (format version, name, policy, clip range, batch size, whether there is a classifier),
`classifier.keras` (absent for a guard in front of a remote classifier it cannot load) and
`detector/` (any family). `safetynet serve --guard DIR`, `safetynet export` and the demo read it
through `serving.guard.Guard`, the runtime. The format lives here, below `serving`, so that
`training.harden` writes a guard directory without importing the service.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras

from detector.base import Detector, load_detector
from foundation.models import load_model, logits_model, save_model
from foundation.storage import atomic_directory, atomic_write_json, model_fingerprint, read_json
from foundation.validation import CLIP_RANGE, InstanceOf, Interval, Options, validate_params

POLICIES = ("reject", "flag")
GUARD_FILE = "guard.json"
CLASSIFIER_FILE = "classifier.keras"
DETECTOR_DIR = "detector"
FORMAT_VERSION = 1
# the guard's settings (`serving.guard.Guard`'s parameters), in guard.json's order
SETTINGS = {
    "name": [InstanceOf(str, "a string")],
    "policy": [Options(*POLICIES)],
    "clip": [CLIP_RANGE],
    "batch_size": [Interval(int, 1)],
}


def check_guard(classifier: keras.Model | None, detector: Detector, check_fingerprint: bool = True) -> None:
    """ValueError unless `detector` may guard `classifier`: it must be calibrated and, unless
    `check_fingerprint=False`, trained for this classifier (same weight fingerprint): one trained on
    another model's adversarial examples gives no guarantee for this one."""
    if detector.calibration is None:
        raise ValueError("the detector is not calibrated: call calibrate(clean_x, target_fpr) first")
    if classifier is None and detector.uses_classifier:
        raise ValueError(f"the {detector.kind!r} detector reads the classifier: a guard with it needs the classifier")
    if check_fingerprint and classifier is not None and detector.classifier_fingerprint not in (None, model_fingerprint(classifier)):
        raise ValueError(
            "the detector was trained for a different classifier (weight fingerprints differ); "
            "retrain it for this model or pass check_fingerprint=False"
        )


def save_guard_directory(directory: str | os.PathLike, classifier: keras.Model | None, detector: Detector, *,
                         name: str = "safetynet", policy: str = "reject", batch_size: int = 64,
                         clip: tuple[float, float] = (0.0, 1.0), check_fingerprint: bool = True) -> Path:
    """Write the guard directory atomically (an existing one is replaced whole) after checking the
    settings and `check_guard`; a classifier ending in a softmax is saved with it cut (the logits contract)."""
    settings = validate_params("Guard", SETTINGS, {"name": name, "policy": policy, "clip": clip, "batch_size": batch_size})
    check_guard(classifier, detector, check_fingerprint)
    config = {"format_version": FORMAT_VERSION, **settings, "clip": list(settings["clip"]),
              "has_classifier": classifier is not None}
    with atomic_directory(directory) as temp:
        if classifier is not None:
            save_model(logits_model(classifier), temp / CLASSIFIER_FILE)
        detector.save(temp / DETECTOR_DIR)
        atomic_write_json(temp / GUARD_FILE, config)
    return Path(directory)


def load_guard_directory(directory: str | os.PathLike) -> tuple[keras.Model | None, Detector, dict[str, Any]]:
    """(classifier or None, detector, the saved `SETTINGS`) of a guard directory; models load in
    Keras safe mode and the detector re-checks its classifier's fingerprint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"guard directory not found: {directory}")
    config = read_json(directory / GUARD_FILE, "guard config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"guard {directory} has format version {config.get('format_version')!r}; "
                         f"this safetynet reads {FORMAT_VERSION}")
    classifier_path = directory / CLASSIFIER_FILE
    classifier = load_model(classifier_path) if classifier_path.exists() else None
    if config.get("has_classifier") and classifier is None:
        raise FileNotFoundError(f"guard {directory} lacks its classifier file {CLASSIFIER_FILE}")
    detector = load_detector(directory / DETECTOR_DIR, classifier=classifier)
    return classifier, detector, {key: config[key] for key in SETTINGS if key in config}
