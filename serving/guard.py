"""The guard: a detector in front of a classifier, rejecting inputs the detector flags.

A guard directory (what `safetynet serve --guard DIR` and `safetynet export` read; its format is
`detector.guard_directory`) holds `guard.json` (name, policy, clip range, batch size),
`classifier.keras` (absent for a guard that sits in front of a remote classifier it cannot load)
and `detector/` (any detector family).

Fast path: when the detector's score is a Keras graph (`Detector.scoring_model`: the `input` and
`activations` families) the guard runs ONE model per batch that gives both the logits and the score
(for `activations` the classifier computes the activations the detector reads once), and `export`
writes that model as a single TensorFlow SavedModel (`serving.export`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Any

import keras
import numpy as np

from detector import Detector, load_detector
from detector.guard_directory import SETTINGS, check_guard, load_guard_directory, save_guard_directory
from foundation.models import load_model, logits_model
from foundation.storage import model_fingerprint, remembered_fingerprints
from foundation.validation import Parameterized, check_image_shape, check_images

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GuardResult:
    """Per input: class probabilities and predicted label (None without a local classifier), the
    detector's score, whether it is `flagged` (score above the threshold, or the detector failed),
    and whether it is `rejected` (flagged under the "reject" policy; never under "flag")."""

    probabilities: np.ndarray | None
    labels: np.ndarray | None
    scores: np.ndarray
    flagged: np.ndarray
    rejected: np.ndarray


@dataclasses.dataclass
class GuardStats:
    """Running counts since the guard was built (thread-safe through the guard's lock)."""

    inputs: int = 0
    flagged: int = 0
    rejected: int = 0
    detector_errors: int = 0


class Guard(Parameterized):
    """Classify inputs and reject those the detector flags at its calibrated threshold.

    policy: "reject" (default) rejects flagged inputs; "flag" only reports them (a dry run before
        turning rejection on). Either way an input whose score is NaN, or whose batch made the
        detector raise, is flagged: the guard fails closed, and counts the error.
    classifier: None for a detector that does not read the classifier, when the guard sits in front
        of a remote classifier (`predict` then returns no probabilities).
    The detector must have been trained for this classifier (same weight fingerprint) unless
    `check_fingerprint=False`: a detector trained on another model's adversarial examples gives
    no guarantee for this one. A classifier ending in a softmax has it cut (the logits contract).
    `scoring_model` is the detector's fused model for this classifier, or None: see `predict`.
    The settings (name, policy, clip, batch_size) are declared in `detector.guard_directory.SETTINGS`;
    `get_params` gives them as guard.json records them.
    """

    _parameter_constraints = SETTINGS

    @remembered_fingerprints()  # the classifier is hashed once for the check and `classifier_fingerprint`
    def __init__(
        self,
        classifier: keras.Model | None,
        detector: Detector,
        *,
        policy: str = "reject",
        name: str = "safetynet",
        batch_size: int = 64,
        clip: tuple[float, float] = (0.0, 1.0),
        check_fingerprint: bool = True,
    ) -> None:
        self._set_params(locals())
        check_guard(classifier, detector, check_fingerprint)
        self.classifier = None if classifier is None else logits_model(classifier)
        self.classifier_fingerprint = (detector.classifier_fingerprint if self.classifier is None
                                       else model_fingerprint(self.classifier))
        self.detector = detector
        self.scoring_model = detector.scoring_model(self.classifier)
        self.stats = GuardStats()
        self._lock = threading.Lock()

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """The (H, W, C) the guard accepts (from the classifier, else from the detector)."""
        model = self.classifier if self.classifier is not None else getattr(self.detector, "model", None)
        if model is None:
            raise ValueError(f"the {self.detector.kind!r} detector does not say its input shape")
        return tuple(model.input_shape[1:])

    def check(self, x: Any) -> np.ndarray:
        """`x` as float32 NHWC numpy after checking rank, dtype, finiteness, range and shape."""
        return check_image_shape(check_images(x, self.clip), self.input_shape, "the guard's input shape")

    def predict(self, x: Any, *, checked: bool = False) -> GuardResult:
        """Guarded predictions for a batch of images (float NHWC in the clip range), `batch_size`
        inputs at a time; a NaN score (detector failure) counts as a detector error. `checked=True`:
        `x` is already `check`'s output (the HTTP service checks each request once, as it arrives)."""
        if not checked:
            x = self.check(x)
        batches = [self._predict_batch(x[start : start + self.batch_size]) for start in range(0, len(x), self.batch_size)]
        scores = np.concatenate([batch_scores for _, batch_scores in batches])
        probabilities = labels = None
        if self.classifier is not None:
            logits = np.concatenate([batch_logits for batch_logits, _ in batches])
            probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
            labels = np.argmax(probabilities, axis=-1)
        flagged = ~(scores <= self.detector.threshold)
        rejected = flagged if self.policy == "reject" else np.zeros(len(x), bool)
        with self._lock:
            self.stats.inputs += len(x)
            self.stats.flagged += int(flagged.sum())
            self.stats.rejected += int(rejected.sum())
            self.stats.detector_errors += int(np.isnan(scores).sum())
        return GuardResult(probabilities=probabilities, labels=labels, scores=scores, flagged=flagged, rejected=rejected)

    def _predict_batch(self, batch: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(logits or None, scores) for one batch. With a scoring model, that one compiled model
        (`predict_on_batch`: on MobileNet as fast as a cached tf.function, and XLA is ~10x slower on CPU).
        Without one, or if it raises, the classifier and the detector run apart, so that a classifier
        error still raises and a detector error still fails closed: NaN scores, flagged, counted."""
        if self.scoring_model is not None:
            try:
                outputs = self.scoring_model.predict_on_batch(batch)
                return outputs.get("logits"), _checked_scores(outputs["score"], len(batch))
            except Exception:
                log.exception("the fused scoring model failed on a batch of %d inputs; "
                              "running the classifier and the detector apart", len(batch))
        logits = None if self.classifier is None else self.classifier.predict_on_batch(batch)
        try:
            return logits, _checked_scores(self.detector.score(batch), len(batch))
        except Exception:  # fail closed: log and flag the whole batch (counted as NaN scores)
            log.exception("detector failed on a batch of %d inputs; flagging them", len(batch))
            return logits, np.full(len(batch), np.nan)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the guard directory atomically: guard.json, classifier.keras, detector/
        (`detector.guard_directory`; the guard was checked when it was built)."""
        return save_guard_directory(directory, self.classifier, self.detector, **self.get_params(), check_fingerprint=False)

    @classmethod
    @remembered_fingerprints()  # the classifier is hashed once: by the detector's check and the guard's
    def load(cls, directory: str | os.PathLike, **overrides: Any) -> Guard:
        """Load a guard directory (models in Keras safe mode); `overrides` replace saved settings."""
        classifier, detector, settings = load_guard_directory(directory)
        return cls(classifier, detector, **(settings | overrides))

    @classmethod
    @remembered_fingerprints()
    def from_paths(cls, classifier: str | os.PathLike | None, detector: str | os.PathLike, **options: Any) -> Guard:
        """A guard from a saved classifier (or None) and a detector directory."""
        model = None if classifier is None else load_model(classifier)
        return cls(model, load_detector(detector, classifier=model), **options)


def _checked_scores(values: Any, count: int) -> np.ndarray:
    """`values` as `count` float64 scores, or ValueError."""
    values = np.asarray(values, np.float64).reshape(-1)
    if values.shape != (count,):
        raise ValueError(f"the detector returned {values.shape[0]} scores for {count} inputs")
    return values
