"""The guard: a detector in front of a classifier, rejecting inputs the detector flags."""
from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np

from attacks.base import check_images, check_model_input
from attacks.storage import model_fingerprint
from detector import Detector, load_detector
from attacks.models import load_model


@dataclasses.dataclass(frozen=True)
class GuardResult:
    """Per input: class probabilities, predicted label, detector score, and whether it was rejected."""

    probabilities: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    rejected: np.ndarray


class Guard:
    """Classify inputs and reject those the detector flags at its calibrated threshold.

    The detector must have been trained for this classifier (same weight fingerprint) unless
    `check_fingerprint=False`: a detector trained on another model's adversarial examples gives
    no guarantee for this one.
    """

    def __init__(
        self,
        classifier: keras.Model,
        detector: Detector,
        *,
        batch_size: int = 256,
        clip: tuple[float, float] = (0.0, 1.0),
        check_fingerprint: bool = True,
    ) -> None:
        if detector.calibration is None:
            raise ValueError("the detector is not calibrated: call calibrate(clean_x, target_fpr) first")
        if check_fingerprint and detector.classifier_fingerprint not in (None, model_fingerprint(classifier)):
            raise ValueError(
                "the detector was trained for a different classifier (weight fingerprints differ); "
                "retrain it for this model or pass check_fingerprint=False"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.classifier = classifier
        self.detector = detector
        self.batch_size = batch_size
        self.clip = clip

    @classmethod
    def from_paths(cls, classifier: str | os.PathLike, detector: str | os.PathLike, **options) -> "Guard":
        model = load_model(classifier)
        return cls(model, load_detector(detector, classifier=model), **options)

    def predict(self, x: np.ndarray) -> GuardResult:
        """Guarded predictions for a batch of images (float NHWC in the clip range)."""
        x = check_images(x, self.clip)
        check_model_input(self.classifier, x)
        logits = self.classifier.predict(x, batch_size=self.batch_size, verbose=0)
        probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
        scores = self.detector.score(x)
        return GuardResult(
            probabilities=probabilities,
            labels=np.argmax(probabilities, axis=-1),
            scores=scores,
            rejected=~(scores <= self.detector.threshold),
        )
