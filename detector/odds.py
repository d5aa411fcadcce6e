"""The `odds` family (Roth, Kilcher and Hofmann 2019, "The odds are odd: a statistical test for
detecting adversarial examples"): how the classifier's logit gaps move when the input is noised.

An adversarial example sits just past a boundary that the perturbation was optimised to cross; noise
undoes part of that optimisation, so the gaps between the predicted class and the others (above all
the true class) shift towards the other side far more than for clean images of the same predicted
class. Score = the largest per-pair z-score of that shift, with each (predicted, other) pair
standardised on clean images. It sees confident L2 attacks (L2 PGD), which `margin` cannot, and
needs clean images only.

The noise is a fixed set of `samples` Gaussian patterns drawn once from `seed` and stored with the
detector, so scores are deterministic and `score_graph` is exact (white-box): an adaptive attacker
differentiates through the very noise the guard uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np
from keras import ops

from detector.base import Detector
from detector.features import image_shape, load_arrays, predict, prepare_classifier, require_classifier, save_arrays
from foundation.storage import model_fingerprint
from foundation.validation import Interval, check_image_shape

ARRAYS_FILE = "odds.npz"
ARRAY_NAMES = ("noise", "shift_mean", "shift_scale")
_EXCLUDED = -1e9  # the predicted class's own pair, never the maximum


class OddsDetector(Detector):
    """Max over classes z of the standardised mean shift of logit(z) - logit(predicted) under noise.

    noise: standard deviation of the Gaussian noise on the [0, 1] pixel scale; samples: noisy copies
    per image (each costs one forward pass); batch_size: images per forward batch (times `samples`).
    """

    kind = "odds"
    learned = "arrays"
    uses_classifier: ClassVar[bool] = True
    _parameter_constraints = {
        "noise": [Interval(float, 0, closed="neither")],
        "samples": [Interval(int, 2)],
        "batch_size": [Interval(int, 1)],
        "seed": [Interval(int, 0)],
    }

    def __init__(self, classifier: keras.Model, *, noise: float = 0.01, samples: int = 16, batch_size: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        self._set_params(locals())
        self.classifier = prepare_classifier(classifier)
        self.classifier_fingerprint = model_fingerprint(self.classifier)
        self.arrays: dict[str, np.ndarray] | None = None
        self._shift_model: keras.Model | None = None

    def _shifts_graph(self, images: Any, noise: Any) -> tuple[Any, Any]:
        """(logits, shift): shift[:, z] = mean over the noisy copies of the gap logit(z) - logit(predicted),
        minus that gap on the image itself."""
        logits = self.classifier(images)
        copies = ops.clip(ops.expand_dims(images, 1) + ops.expand_dims(noise, 0), 0.0, 1.0)
        noisy = ops.reshape(self.classifier(ops.reshape(copies, (-1, *noise.shape[1:]))), (-1, noise.shape[0], logits.shape[-1]))
        predicted = ops.one_hot(ops.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)
        gap = logits - ops.sum(logits * predicted, axis=-1, keepdims=True)
        noisy_gap = noisy - ops.sum(noisy * ops.expand_dims(predicted, 1), axis=-1, keepdims=True)
        return logits, ops.mean(noisy_gap, axis=1) - gap

    def _shifts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class, shift) of each image, through one compiled model."""
        x = check_image_shape(x, image_shape(self.classifier))
        if self._shift_model is None:
            inputs = keras.Input(image_shape(self.classifier))
            self._shift_model = keras.Model(inputs, self._shifts_graph(inputs, ops.convert_to_tensor(self.arrays["noise"])))
        logits, shift = predict(self._shift_model, x, self.batch_size)
        return logits.argmax(axis=-1), shift.astype(np.float64)

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *, verbose: int | str = 0) -> None:
        """Per predicted class, the mean and spread of the clean shifts (classes predicted for fewer
        than two clean images take those of all of them). The adversarial images are not needed."""
        shape = image_shape(self.classifier)
        noise = np.random.default_rng(self.seed).normal(0.0, self.noise, (self.samples, *shape)).astype(np.float32)
        self.arrays, self._shift_model = {"noise": noise}, None
        predicted, shift = self._shifts(x_clean)
        classes = shift.shape[1]
        mean, scale = np.tile(shift.mean(axis=0), (classes, 1)), np.tile(shift.std(axis=0), (classes, 1))
        for c in range(classes):
            if np.count_nonzero(predicted == c) >= 2:
                mean[c], scale[c] = shift[predicted == c].mean(axis=0), shift[predicted == c].std(axis=0)
        self.arrays |= {"shift_mean": mean.astype(np.float32), "shift_scale": np.maximum(scale, 1e-6).astype(np.float32)}

    def _score(self, x: np.ndarray) -> np.ndarray:
        predicted, shift = self._shifts(x)
        z = (shift - self.arrays["shift_mean"][predicted]) / self.arrays["shift_scale"][predicted]
        z[np.arange(len(z)), predicted] = _EXCLUDED
        return z.max(axis=1)

    def score_graph(self, images: Any) -> Any:
        logits, shift = self._shifts_graph(images, ops.convert_to_tensor(self.arrays["noise"]))
        predicted = ops.argmax(logits, axis=-1)
        z = (shift - ops.take(self.arrays["shift_mean"], predicted, axis=0)) / ops.take(self.arrays["shift_scale"], predicted, axis=0)
        own = ops.one_hot(predicted, logits.shape[-1], dtype=z.dtype)
        return ops.max(ops.where(own > 0, _EXCLUDED, z), axis=-1)

    def _save_files(self, directory: Path) -> None:
        save_arrays(directory / ARRAYS_FILE, **self.arrays)

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "OddsDetector":
        detector = cls(require_classifier(directory, classifier, cls.kind), **params)
        arrays = load_arrays(directory / ARRAYS_FILE, ARRAY_NAMES)
        expected = (params["samples"], *image_shape(detector.classifier))
        if arrays["noise"].shape != expected or arrays["shift_mean"].shape[1] != detector.classifier.output_shape[-1]:
            raise ValueError(f"{directory / ARRAYS_FILE} does not fit this classifier (noise {arrays['noise'].shape},"
                             f" expected {expected}): wrong classifier?")
        detector.arrays = arrays
        return detector
