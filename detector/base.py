"""The interface every detector family shares, and its one on-disk layout.

A detector directory holds `manifest.json` (family, format version, threshold and the false-positive
rate it achieved, classifier fingerprint, hyper-parameters, training notes, versions) plus the
family's model files (`.keras`, `.npz`). Nothing in it is ever unpickled or evaluated.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np

from attacks.storage import atomic_directory, atomic_write_json, read_json
from detector.calibration import Calibration, calibrate_threshold

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class Detector(abc.ABC):
    """Scores inputs (higher = more suspicious) and flags those above a clean-calibrated threshold."""

    kind: ClassVar[str]
    uses_classifier: ClassVar[bool] = False  # families that read the classifier get it again at load time

    def __init__(self) -> None:
        self.calibration: Calibration | None = None
        self.classifier_fingerprint: str | None = None
        self.info: dict[str, Any] = {}

    @abc.abstractmethod
    def score(self, x: np.ndarray) -> np.ndarray:
        """One float per input; higher means more likely adversarial."""

    @abc.abstractmethod
    def hyperparameters(self) -> dict[str, Any]:
        """Everything needed to rebuild the detector, as JSON-able values."""

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> None:
        """Write the family's model files into `directory`."""

    @classmethod
    @abc.abstractmethod
    def _load_files(cls, directory: Path, hyperparameters: dict[str, Any], **context: Any) -> "Detector":
        """Rebuild the detector from its model files (families with `uses_classifier` receive
        `classifier=` in `context`)."""

    def scoring_model(self, classifier: keras.Model | None) -> keras.Model | None:
        """One Keras model from images to {"logits": the classifier's logits, "score": `score()`}
        ("logits" left out when `classifier` is None), so that a guard runs one compiled graph per
        batch and can export it as a single SavedModel.

        None (this default) for families whose score is not a pure Keras graph: those with NumPy,
        scikit-learn or OpenCV steps, or input gradients, outside the model."""
        return None

    @property
    def threshold(self) -> float:
        if self.calibration is None:
            raise ValueError("the detector is not calibrated: call calibrate(clean_x, target_fpr) first")
        return self.calibration.threshold

    def calibrate(self, clean_x: np.ndarray, target_fpr: float = 0.05) -> "Detector":
        """Set the threshold so that about `target_fpr` of clean images are flagged."""
        self.calibration = calibrate_threshold(self.score(clean_x), target_fpr)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """True where the input is flagged as adversarial (NaN scores are flagged: fail closed)."""
        scores = self.score(x)
        return ~(scores <= self.threshold)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the detector directory atomically (an existing one is replaced whole)."""
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "calibration": None if self.calibration is None else self.calibration.to_json(),
            "classifier_fingerprint": self.classifier_fingerprint,
            "hyperparameters": self.hyperparameters(),
            "info": self.info,
            "versions": {"keras": keras.__version__, "numpy": np.__version__},
        }
        with atomic_directory(directory) as temp:
            self._save_files(temp)
            atomic_write_json(temp / MANIFEST, manifest)
        return Path(directory)

    @staticmethod
    def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"detector directory not found: {directory}")
        manifest = read_json(directory / MANIFEST, "detector manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"detector {directory} has format version {version!r}; this safetynet reads "
                f"versions up to {FORMAT_VERSION} (upgrade safetynet to load it)"
            )
        return manifest

    @classmethod
    def _from_manifest(cls, directory: Path, manifest: dict[str, Any], classifier: keras.Model | None = None) -> "Detector":
        context = {"classifier": classifier} if cls.uses_classifier else {}
        detector = cls._load_files(directory, manifest.get("hyperparameters", {}), **context)
        calibration = manifest.get("calibration")
        detector.calibration = None if calibration is None else Calibration.from_json(calibration)
        detector.classifier_fingerprint = manifest.get("classifier_fingerprint")
        detector.info = manifest.get("info", {})
        return detector
