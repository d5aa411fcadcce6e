"""Test doubles shared by the detector and guard tests: detectors whose scores are fixed functions
of the image, so every result can be checked exactly."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from detector import Detector


class SyntheticDetector(Detector):
    """A detector with no model files and no declared parameters (never saved in the tests)."""

    kind = "synthetic-test"

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, **fit_params: Any) -> None:
        """Nothing to learn: the score is a fixed function of the image."""

    def _save_files(self, directory: Path) -> None:  # pragma: no cover - not saved in these tests
        pass

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any], **context: Any) -> Detector:  # pragma: no cover
        return cls(**params)


class NaNForDarkImages(SyntheticDetector):
    """Mean pixel value, but NaN (a detector failure) for images darker than `cutoff`."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff

    def _score(self, x: np.ndarray) -> np.ndarray:
        means = np.asarray(x, np.float64).reshape(len(x), -1).mean(axis=1)
        return np.where(means < self.cutoff, np.nan, means)
