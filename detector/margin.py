"""The `margin` family: how close the classifier's decision is, read from its own logits.

Minimal attacks stop as soon as the label flips: CW-L2 with confidence 0 minimises the perturbation
subject to a top-two logit gap of about zero, DeepFool steps just across the linearised boundary,
and decision-based attacks walk along it. Their examples all sit at a top-two logit gap near zero,
where few clean images of a well-trained classifier fall; FGSM and PGD, which the learned families
are fitted on, leave the opposite trace (a confident wrong label). Score = minus the top-two logit
gap, so higher is more suspicious; training-free, differentiable (`white-box`).

`shift_margin` reads the same gap for the label of the image as given, averaged over its
translations by up to `max_shift` pixels (borders replicated). A minimal perturbation is tied to
pixel positions: moved by one pixel it no longer holds, and the label falls back, so the averaged
gap falls to about zero or below. A clean image near the boundary, or one shifted by a camera, keeps its label in
most of the translations. On ART's CW-L2 (benchmarks/detection.py, one calibrated threshold) it
lifts AUROC / TPR from 0.851 / 28% to 0.959 / 79% on CIFAR-10 (the 86.8% ResNet) and from 0.994 /
96% to 0.998 / 99% on MNIST; on 8 x 8 digits a pixel is an eighth of the image and it is weaker
than `margin`. It costs (2k+1)^2 forward passes per image. Detecting perturbations that do not
survive an image transformation: Tian et al. 2018.

Not a defence on its own: an attacker who knows it asks for a confident misclassification (CW with
confidence > 0, PGD), which it does not see, and averages its attack over the translations (EOT).
It is an ensemble member for the minimal attacks the others miss; the adaptive rows of `evaluate`
show what it keeps against such an attacker.

`shift_drop` reads how far that gap drops when the image moves: the gap of the image as given
minus its mean over the other translations (Tian et al.'s instability under transformation). PGD's
confident examples keep a large gap only where the perturbation was put, so one pixel away it
collapses; a clean image keeps most of its gap, whether sure or unsure, blurred or noisy, so
benign corruptions that lower every gap move it little. On CIFAR-10 (the 86.5% ResNet) alone it
catches seen PGD at 1.000 / 99.7% and L2 PGD at 0.999 / 98.8%, with at most 5.4% of clean images
flagged under a benign corruption; minimal attacks, whose gap is about zero to start with, it sees
less (ART's CW-L2 0.905 / 57%: `shift_margin`'s part). On MNIST at eps 0.3, where PGD redraws
strokes that hold a pixel away, it sees less of PGD (0.924 / 66%), and it is a colour member only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np
from keras import ops

from detector.base import Detector
from detector.features import image_shape, predict, prepare_classifier, require_classifier
from foundation.storage import model_fingerprint
from foundation.validation import Interval, check_image_shape


class MarginDetector(Detector):
    """Minus the classifier's top-one minus top-two logit (Stutz et al. 2020 and Pang et al. 2022
    reject low confidence the same way; here it is read on the undefended classifier)."""

    kind = "margin"
    uses_classifier: ClassVar[bool] = True
    _parameter_constraints = {"batch_size": [Interval(int, 1)]}
    max_shift: int = 0  # the reach of the translations read (`shift_margin`); 0: the image as given only

    def __init__(self, classifier: keras.Model, *, batch_size: int = 256) -> None:
        super().__init__()
        self._set_params(locals())
        self.classifier = prepare_classifier(classifier)
        self.classifier_fingerprint = model_fingerprint(self.classifier)

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *, verbose: int | str = 0) -> None:
        """Nothing to learn: the threshold comes from `calibrate` on clean images."""

    def _score(self, x: np.ndarray) -> np.ndarray:
        x = check_image_shape(x, image_shape(self.classifier))
        k = self.max_shift
        padded = np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)), mode="edge")
        given = predict(self.classifier, x, self.batch_size)[0]
        labels = np.argmax(given, axis=-1)
        gaps = [ops.convert_to_numpy(own_label_gap(
                    given if (dy, dx) == (k, k) else
                    predict(self.classifier, padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]], self.batch_size)[0],
                    labels)).astype(np.float64)
                for dy, dx in _offsets(k)]
        return self.combine(gaps)

    def score_graph(self, images: Any) -> Any:
        moved = translations(images, self.max_shift)
        logits = self.classifier(ops.concatenate(moved, axis=0))
        logits = ops.reshape(logits, (len(moved), -1, ops.shape(logits)[-1]))
        labels = ops.argmax(logits[len(moved) // 2], axis=-1)  # the image as given sits in the middle
        gaps = own_label_gap(logits, labels)
        return self.combine([gaps[i] for i in range(len(moved))])

    def combine(self, gaps: list[Any]) -> Any:
        """The score from the label's gap in each translation (arrays or tensors, row-major, the image
        as given in the middle): minus their mean."""
        return -(sum(gaps) / len(gaps))

    def _save_files(self, directory: Path) -> None:
        """No files: the classifier comes at load time, checked against the recorded fingerprint."""

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "MarginDetector":
        return cls(require_classifier(directory, classifier, cls.kind), **params)


class ShiftMarginDetector(MarginDetector):
    """Minus the top-two logit gap of the label of the image as given, averaged over its
    translations by up to `max_shift` pixels (module docstring)."""

    kind = "shift_margin"
    _parameter_constraints = {"max_shift": [Interval(int, 1, 4)], "batch_size": [Interval(int, 1)]}

    def __init__(self, classifier: keras.Model, *, max_shift: int = 1, batch_size: int = 256) -> None:
        Detector.__init__(self)
        self._set_params(locals())
        self.classifier = prepare_classifier(classifier)
        self.classifier_fingerprint = model_fingerprint(self.classifier)


class ShiftDropDetector(ShiftMarginDetector):
    """The top-two logit gap of the image as given minus its mean over the other translations by up
    to `max_shift` pixels: how far the label's gap drops when the image moves (module docstring)."""

    kind = "shift_drop"

    def combine(self, gaps: list[Any]) -> Any:
        given = gaps[len(gaps) // 2]
        return given - (sum(gaps) - given) / (len(gaps) - 1)


def _offsets(max_shift: int) -> list[tuple[int, int]]:
    """(row, column) windows into the edge-padded image, row-major: the identity is the middle one."""
    return [(dy, dx) for dy in range(2 * max_shift + 1) for dx in range(2 * max_shift + 1)]


def translations(images: Any, max_shift: int) -> list[Any]:
    """NHWC `images` moved by every (dy, dx) in [-max_shift, max_shift]^2, borders replicated
    (keras.ops, so differentiable), in the order of `_offsets`."""
    k = max_shift
    if k == 0:
        return [images]
    rows = ops.concatenate([ops.repeat(images[:, :1], k, axis=1), images, ops.repeat(images[:, -1:], k, axis=1)], axis=1)
    padded = ops.concatenate([ops.repeat(rows[:, :, :1], k, axis=2), rows, ops.repeat(rows[:, :, -1:], k, axis=2)],
                             axis=2)
    height, width = images.shape[1], images.shape[2]
    return [padded[:, dy:dy + height, dx:dx + width] for dy, dx in _offsets(k)]


def own_label_gap(logits: Any, labels: Any) -> Any:
    """The logit of `labels` minus the largest other logit, over the last axis: the top-two gap
    where the label is the top one, negative where another class has overtaken it."""
    chosen = ops.one_hot(labels, ops.shape(logits)[-1], dtype=logits.dtype)
    return ops.sum(chosen * logits, axis=-1) - ops.max(logits - 1e9 * chosen, axis=-1)
