"""The `ensemble` family: several already fitted detectors, combined. Families fail on different
attacks (Carlini and Wagner 2017, "Adversarial examples are not easily detected"), so several are
more robust than one. Two rules:

- "logistic": a logistic regression stacked on the members' scores (stacked generalisation, Wolpert
  1992), fitted clean vs adversarial. It weighs members by how well they separate the attacks it is
  fitted on, so a member that only sees other attacks (the squeezer on minimal ones) is weighed down.
- "max": each member's score standardised on clean images in the tail where thresholds fall (its
  95th percentile to 0, its 99th to 1), and the largest of them: an input is flagged when any
  member flags it at about a common clean quantile. Fitted on clean images only, it keeps every
  member's view of attacks never seen. Anchoring at the median instead let a member with a wide
  bulk and a bounded top (`margin`: minus a logit gap, never above 0) reach only about 1.2 where
  the others' tails set the threshold higher, so it flagged nothing (MNIST, ART's CW-L2: 60.1%
  with it and without it, 95.9% for `margin` alone). Given benignly corrupted clean images
  (`shifted`), each member is anchored on its worst condition (the largest of those quantiles over
  the pristine images and each corruption): a member that flags, say, JPEG + noise is scaled down
  alone, instead of the one threshold rising for every member under the benign cap (MNIST, retrained
  on CW-L2: the `input` member learnt CW's noise, and the cap cost `margin`'s view of CW).

Fit the stacker on images the members were NOT trained on: a member's scores on its own training
images are over-confident.

Each member is saved whole (its own manifest and files) in a sub-directory `member_<i>`; the stacker
(standardisation and regression weights) is an .npz.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from detector.base import Detector, load_detector
from detector.features import fit_linear_rule, load_arrays, save_arrays
from foundation.validation import Interval, Options, Satisfies

ARRAYS_FILE = "stacker.npz"
RULES = ("logistic", "max")  # how the members' scores are combined (see the module)
_ARRAYS = ("score_mean", "score_scale", "coef", "intercept")
MAX_RULE_QUANTILES = (0.95, 0.99)  # the clean quantiles the "max" rule maps to 0 and 1


def member_directory(index: int) -> str:
    return f"member_{index}"


def _tail_anchors(groups: Sequence[np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The "max" rule's standardisation from (n, members) clean scores per condition (pristine, then
    each benign corruption): each member's 95th percentile to 0 and 99th to 1, on its worst condition."""
    for scores in groups:
        if len(scores) < 20 or not np.isfinite(scores).all():
            raise ValueError("the max rule needs at least 20 clean images with finite member scores, "
                             f"got {len(scores)}")
    lower = np.max([np.quantile(scores, MAX_RULE_QUANTILES[0], axis=0) for scores in groups], axis=0)
    upper = np.max([np.quantile(scores, MAX_RULE_QUANTILES[1], axis=0) for scores in groups], axis=0)
    return {"score_mean": lower, "score_scale": np.maximum(upper - lower, 1e-12),
            "coef": np.ones((1, count)), "intercept": np.zeros(1)}


def _members(members: Any) -> list[Detector]:
    members = list(members)
    if len(members) < 2 or not all(isinstance(member, Detector) for member in members):
        raise ValueError(members)
    return members


class EnsembleDetector(Detector):
    """The members' standardised scores combined by `rule` ("logistic" or "max", see the module);
    `score` is the stacker's decision function or the largest standardised score."""

    kind = "ensemble"
    learned = "arrays"
    uses_classifier: ClassVar[bool] = True  # handed on to the members that need it
    _parameter_constraints = {
        "members": [Satisfies("a list of at least 2 Detector instances", _members)],  # saved as their kinds
        "rule": [Options(*RULES)],
        "C": [Interval(float, 0, closed="neither")],
        "seed": [Interval(int, 0)],
    }

    def __init__(self, members: Sequence[Detector], *, rule: str = "logistic", C: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self._set_params(locals())
        fingerprints = {m.classifier_fingerprint for m in self.members} - {None}
        if len(fingerprints) > 1:
            raise ValueError("the ensemble's members were trained for different classifiers")
        self.classifier_fingerprint = fingerprints.pop() if fingerprints else None
        self.arrays: dict[str, np.ndarray] | None = None

    def member_scores(self, x: np.ndarray) -> np.ndarray:
        """(n, members): each member's score (a member's shape check raises for wrong images)."""
        return np.stack([np.asarray(m.score(x), np.float64) for m in self.members], axis=1)

    def image_shape(self) -> tuple[int | None, ...] | None:
        return next((shape for shape in (m.image_shape() for m in self.members) if shape is not None), None)

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *,
             shifted: Mapping[str, np.ndarray] | None = None, verbose: int | str = 1) -> None:
        """Fit the stacker on clean (0) vs adversarial (1) images, ideally ones no member was trained on.
        The "max" rule reads the clean ones only, and `shifted` (corruption name -> those clean images
        corrupted, `detector.benign_shift.benign_versions`) when given."""
        if self.rule == "max":
            groups = [x_clean, *(shifted or {}).values()]
            self.arrays = _tail_anchors([self.member_scores(x) for x in groups], len(self.members))
            return
        if shifted is not None:
            raise ValueError("benignly corrupted images (shifted) anchor the max rule only; "
                             "the logistic rule takes them among the clean images")
        mean, scale, coef, intercept = fit_linear_rule(self.member_scores, x_clean, x_adversarial, C=self.C, seed=self.seed,
                                                       what="a member")
        self.arrays = {"score_mean": mean, "score_scale": scale, "coef": coef, "intercept": intercept}
        if verbose:
            weights = np.round(self.arrays["coef"][0], 3).tolist()
            print("ensemble: weights " + ", ".join(f"{m.kind}={w}" for m, w in zip(self.members, weights)))

    def _score(self, x: np.ndarray) -> np.ndarray:
        z = (self.member_scores(x) - self.arrays["score_mean"]) / self.arrays["score_scale"]
        return z.max(axis=1) if self.rule == "max" else z @ self.arrays["coef"][0] + self.arrays["intercept"][0]

    def score_graph(self, images: Any) -> Any | None:
        """The stacker over the members' graphs (None when a member has none)."""
        models = [m.scoring_model(None) for m in self.members]
        if any(model is None for model in models):
            return None
        return self.stack(ops.stack([ops.reshape(model(images)["score"], (-1,)) for model in models], axis=-1))

    def stack(self, member_scores: Any) -> Any:
        """The stacker's decision function in keras.ops, from (n, members) scores."""
        a = self.arrays
        standardised = (member_scores - a["score_mean"].astype(np.float32)) / a["score_scale"].astype(np.float32)
        if self.rule == "max":
            return ops.max(standardised, axis=-1)
        return ops.matmul(standardised, ops.convert_to_tensor(a["coef"][0].astype(np.float32))) + float(a["intercept"][0])

    def gradient(self) -> str:
        return f"ensemble({', '.join(m.gradient() for m in self.members)})"

    def _save_files(self, directory: Path) -> None:
        for index, member in enumerate(self.members):
            member.save(directory / member_directory(index))
        save_arrays(directory / ARRAYS_FILE, **self.arrays)

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "EnsembleDetector":
        params = dict(params)
        kinds = params.pop("members", None)
        if not isinstance(kinds, list) or len(kinds) < 2:
            raise ValueError(f"ensemble manifest in {directory} lists no members")
        members = []
        for index, kind in enumerate(kinds):
            member = load_detector(directory / member_directory(index), classifier)
            if member.kind != kind:
                raise ValueError(f"ensemble member {index} in {directory} is a {member.kind!r} detector, expected {kind!r}")
            members.append(member)
        detector = cls(members, **params)
        arrays = load_arrays(directory / ARRAYS_FILE, _ARRAYS)
        if arrays["coef"].shape != (1, len(members)):
            raise ValueError(f"the stacker in {directory} weighs {arrays['coef'].shape[-1]} members, the ensemble has {len(members)}")
        detector.arrays = arrays
        return detector
