"""The `margin` family: how close the classifier's decision is, read from its own logits.

Minimal attacks stop as soon as the label flips: CW-L2 with confidence 0 minimises the perturbation
subject to a top-two logit gap of about zero, DeepFool steps just across the linearised boundary,
and decision-based attacks walk along it. Their examples all sit at a top-two logit gap near zero,
where few clean images of a well-trained classifier fall; FGSM and PGD, which the learned families
are fitted on, leave the opposite trace (a confident wrong label). Score = minus the top-two logit
gap, so higher is more suspicious; training-free, differentiable (`white-box`).

Not a defence on its own: an attacker who knows it asks for a confident misclassification (CW with
confidence > 0, PGD), which it does not see. It is an ensemble member for the minimal attacks the
others miss; the adaptive rows of `evaluate` show what it keeps against such an attacker.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np

from detector.base import Detector
from detector.features import image_shape, predict, prepare_classifier, require_classifier
from detector.joint import logit_gap
from foundation.storage import model_fingerprint
from foundation.validation import Interval, check_image_shape


class MarginDetector(Detector):
    """Minus the classifier's top-one minus top-two logit (Stutz et al. 2020 and Pang et al. 2022
    reject low confidence the same way; here it is read on the undefended classifier)."""

    kind = "margin"
    uses_classifier: ClassVar[bool] = True
    _parameter_constraints = {"batch_size": [Interval(int, 1)]}

    def __init__(self, classifier: keras.Model, *, batch_size: int = 256) -> None:
        super().__init__()
        self._set_params(locals())
        self.classifier = prepare_classifier(classifier)
        self.classifier_fingerprint = model_fingerprint(self.classifier)

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *, verbose: int | str = 0) -> None:
        """Nothing to learn: the threshold comes from `calibrate` on clean images."""

    def _score(self, x: np.ndarray) -> np.ndarray:
        x = check_image_shape(x, image_shape(self.classifier))
        top = np.sort(predict(self.classifier, x, self.batch_size)[0], axis=-1)[:, -2:]
        return -(top[:, 1] - top[:, 0]).astype(np.float64)

    def score_graph(self, images: Any) -> Any:
        return -logit_gap(self.classifier(images))

    def _save_files(self, directory: Path) -> None:
        """No files: the classifier comes at load time, checked against the recorded fingerprint."""

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "MarginDetector":
        return cls(require_classifier(directory, classifier, cls.kind), **params)
