"""The `joint` family: one rejection rule from a detector's score and the classifier's own doubt.

A detector in front of a non-robust classifier falls to an attacker who knows it (Tramer et al.
2020); behind an adversarially trained classifier the two fail on different inputs. An attack
within the budget that still fools a robust classifier mostly lands just across a decision
boundary, where the classifier's top-two logit gap is small (Stutz et al. 2020, CCAT; Pang et al.
2022, rectified rejection), while the detector reads the perturbation itself. `JointDetector` puts
both on one scale: a logistic regression on the standardised member score and the negative top-two
logit gap, so one threshold, calibrated on clean images, serves the whole guard.

The member is saved whole in `member/`; the regression (standardisation and weights) in an .npz.
The classifier is not stored: it is passed again at load time and its fingerprint checked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np
from keras import ops

from foundation.models import logits_model
from detector.base import Detector, load_detector
from detector.features import fit_linear_rule, load_arrays, predict, require_classifier, save_arrays
from foundation.validation import Interval, Satisfies

ARRAYS_FILE = "rule.npz"
MEMBER_DIRECTORY = "member"
_ARRAYS = ("feature_mean", "feature_scale", "coef", "intercept")
FEATURES = ("detector_score", "logit_gap_deficit")


def logit_gap(logits: Any) -> Any:
    """Top-1 minus top-2 logit per input (keras.ops, so the rule stays differentiable)."""
    top = ops.top_k(logits, 2)[0]
    return top[:, 0] - top[:, 1]


def _member(member: Any) -> Detector:
    if not isinstance(member, Detector) or isinstance(member, JointDetector):
        raise TypeError(member)
    return member


class JointDetector(Detector):
    """Logistic regression on (member score, -logit gap); `score` is its decision function."""

    kind = "joint"
    learned = "arrays"
    uses_classifier: ClassVar[bool] = True
    _parameter_constraints = {
        "member": [Satisfies("a fitted detector of another family", _member)],  # saved as its kind
        "C": [Interval(float, 0, closed="neither")],
        "seed": [Interval(int, 0)],
    }

    def __init__(self, member: Detector, classifier: keras.Model, *, C: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self._set_params(locals())
        self.classifier = logits_model(classifier)
        self.classifier_fingerprint = member.classifier_fingerprint
        self.arrays: dict[str, np.ndarray] | None = None

    def features(self, x: np.ndarray) -> np.ndarray:
        """(n, 2): the member's score and the negative top-two logit gap (higher = more suspicious)."""
        logits = predict(self.classifier, x)[0]
        top = np.sort(logits, axis=-1)[:, -2:]
        return np.stack([np.asarray(self.member.score(x), np.float64), top[:, 0] - top[:, 1]], axis=1)

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *, verbose: int | str = 1) -> None:
        """Fit the rule on clean (0) vs adversarial (1) images the member was NOT trained on (its
        scores on its own training images are over-confident)."""
        mean, scale, coef, intercept = fit_linear_rule(self.features, x_clean, x_adversarial, C=self.C, seed=self.seed,
                                                       what="the member")
        self.arrays = {"feature_mean": mean, "feature_scale": scale, "coef": coef, "intercept": intercept}
        if verbose:
            weights = np.round(self.arrays["coef"][0], 3).tolist()
            print(f"joint rule: weights {self.member.kind} score={weights[0]}, logit-gap deficit={weights[1]}")

    def _rule(self) -> dict[str, np.ndarray]:
        self.check_fitted()
        return self.arrays

    def _score(self, x: np.ndarray) -> np.ndarray:
        a = self._rule()
        return ((self.features(x) - a["feature_mean"]) / a["feature_scale"]) @ a["coef"][0] + a["intercept"][0]

    def combine(self, member_score: Any, logits: Any) -> Any:
        """The rule in keras.ops, from the member's score and the classifier's logits (for fused
        serving and for the adaptive attack's stand-in)."""
        a = self._rule()
        features = [ops.reshape(member_score, (-1,)), -logit_gap(logits)]
        total = float(a["intercept"][0])
        for index, feature in enumerate(features):
            standardised = (feature - float(a["feature_mean"][index])) / float(a["feature_scale"][index])
            total = total + float(a["coef"][0, index]) * standardised
        return total

    def score_graph(self, images: Any) -> Any | None:
        """The rule over the member's graph and the classifier's logits (None when the member has no graph)."""
        member = self.member.scoring_model(None)
        return None if member is None else self.combine(member(images)["score"], self.classifier(images))

    def gradient(self) -> str:
        member = self.member.gradient()
        return member if member == "white-box" else f"joint({member})"

    def _save_files(self, directory: Path) -> None:
        save_arrays(directory / ARRAYS_FILE, **self._rule())
        self.member.save(directory / MEMBER_DIRECTORY)

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "JointDetector":
        params = dict(params)
        kind = params.pop("member", None)
        classifier = require_classifier(directory, classifier, cls.kind)
        member = load_detector(directory / MEMBER_DIRECTORY, classifier)
        if member.kind != kind:
            raise ValueError(f"the joint rule's member in {directory} is a {member.kind!r} detector, expected {kind!r}")
        detector = cls(member, classifier, **params)
        arrays = load_arrays(directory / ARRAYS_FILE, _ARRAYS)
        if arrays["coef"].shape != (1, len(FEATURES)):
            raise ValueError(f"the joint rule in {directory} weighs {arrays['coef'].shape[-1]} features, expected {len(FEATURES)}")
        detector.arrays = arrays
        return detector
