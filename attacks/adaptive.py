"""The adaptive attack: PGD against a classifier and its detector at once (Carlini & Wagner 2017,
"Adversarial examples are not easily detected"). A detector is only worth what it keeps under an
attacker who knows it; this attack is that attacker.

Per sample and per weight lambda of a sweep, PGD maximises

    L(classifier(x'), y) - lambda * softplus((score(x') - threshold) / score_scale)

(the second term is lambda * log(1 - sigmoid(.)) of the detector's margin: it pushes the score
below the threshold; `score_scale` makes lambda comparable across score units). L is, by default,
Carlini & Wagner's logit margin max_{j != y} Z_j - Z_y capped at `confidence` (`loss="margin"`), or
the cross-entropy (`loss="ce"`). The margin is the default because cross-entropy saturates on a
confident classifier: on the MNIST reference CNN and an input detector (eps 0.3, 40 steps, 200 test
images) it left 85% of inputs handled where the margin left 2.5%; the cap lets the detector term
take over once an input is misclassified. Each lambda starts from the input itself (clean images
are under the threshold; a random start in the eps-ball was measured to make the detector's job
easier: 45% against 97.5% success), unless `random_start`.

`AdaptiveAPGD` runs APGD-CE or APGD-DLR (Croce & Hein 2020) on the same joint model, with the
objective min(classifier margin, lambda x detector margin) (`JointMargin`): on the MNIST reference
CNN and an input detector (eps 0.3, 50 steps, 200 test images) the weighted sum above left 26% (CE)
and 18% (DLR) of inputs handled under APGD, whose first steps of 2 eps land where the detector is
sure; the min form left 0% and 2.5%. `attacks.orthogonal` holds Orthogonal and Selective PGD.

Every iterate of every lambda is a candidate; each sample keeps the one that is misclassified AND
under the threshold with the lowest score, or, when there is none, the misclassified one with the
lowest score, or else the lowest-scoring one. `success` means misclassified and not rejected.

`attacks` knows nothing of detectors (DESIGN.md): the detector arrives as a Keras model from images
to a score (a differentiable stand-in for detectors that are not Keras graphs: BPDA, a surrogate),
joined to the classifier by `joint_model` into one model with K + 1 outputs (the K logits, then the
score), which the ordinary engine compiles once for TensorFlow or JAX.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import keras
import numpy as np
from keras import ops

from foundation.backend import Forward
from attacks.apgd import APGD, apgd_ascend
from attacks.base import AttackResult
from foundation.validation import Interval, Options, Satisfies
from attacks.engine import Plan, ascend
from attacks.gradient_sign import GradientSignAttack
from attacks.norms import perturbation_norms
from attacks.objectives import DetectorAware, Objective, dlr, fooled


def joint_model(classifier: keras.Model | None, score_model: keras.Model) -> keras.Model:
    """One model from images to [logits..., score] (K + 1 columns).

    `score_model` returns one score per image ((n,) or (n, 1)) or a dict with "score"; when that
    dict also holds "logits" (a detector's scoring model built with the classifier), `classifier`
    may be None and the one graph serves both."""
    inputs = keras.Input(tuple(score_model.input_shape[1:]), name="images")
    outputs = score_model(inputs)
    logits = outputs.get("logits") if isinstance(outputs, dict) else None
    if isinstance(outputs, dict):
        if "score" not in outputs:
            raise ValueError(f"the score model's outputs {sorted(outputs)} hold no 'score'")
        outputs = outputs["score"]
    if logits is None:
        if classifier is None:
            raise ValueError("give the classifier: the score model does not output 'logits'")
        logits = classifier(inputs)
    score = ops.reshape(ops.cast(outputs, logits.dtype), (-1, 1))
    return keras.Model(inputs, ops.concatenate([logits, score], axis=-1), name="classifier_and_detector")


def _weights(values: Any) -> tuple[float, ...]:
    weights = tuple(Interval(float, 0).convert(v) for v in np.atleast_1d(values))
    if not weights:
        raise ValueError(values)
    return weights


# the constraints of the parameters every attack on a joint model has, and of its weights lambda
DETECTOR_TERMS = {"threshold": [Interval(float)], "score_scale": [Interval(float, 0, closed="neither")]}
LAMBDAS = Satisfies("one or more finite weights >= 0", _weights)


class OnJointModel:
    """What the attacks on a `joint_model` share: labels checked against the K classes (not the
    K + 1 outputs), the logits read from the first K columns, and one weight lambda per restart
    turned into a runtime budget. Their parameters `threshold` and `score_scale` are declared in
    `DETECTOR_TERMS`."""

    threshold: float
    score_scale: float

    def _classes(self, model: keras.Model) -> int:
        return int(model.output_shape[-1]) - 1

    def _logits(self, outputs: Any) -> Any:
        return outputs[:, :-1]

    def __call__(self, model: keras.Model, x: Any, y: Any, *, targets: Any = None, **kwargs: Any) -> AttackResult:
        """As `Attack.__call__`, with `model` a `joint_model` (labels and targets are checked against
        its K classes, not its K + 1 outputs)."""
        if self._classes(model) < 2:
            raise ValueError(f"the joint model must output K >= 2 logits and a score, got {self._classes(model) + 1} columns")
        return super().__call__(model, x, y, targets=targets, **kwargs)  # type: ignore[misc]


def restart_weights(lambdas: tuple[float, ...], given: Any, n: int, repeat: int = 1) -> np.ndarray:
    """(n, len(lambdas) * repeat) weights: each lambda `repeat` times in a row, from the attack's
    `lambdas` or a call's (one set, or one per input)."""
    values = np.asarray(lambdas if given is None else given, dtype=np.float64)
    count = len(lambdas)
    if values.shape not in ((count,), (n, count)) or not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"lambdas must hold {count} finite weights >= 0 (or that many per input), got {values!r}")
    return np.repeat(np.broadcast_to(values, (n, count)), repeat, axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptivePGD(OnJointModel, GradientSignAttack):
    """PGD on the classifier's loss minus lambda times the detector's softplus margin, swept over
    `lambdas` (one engine restart each, every iterate a candidate); called on a `joint_model`.

    eps, norm, steps, step_size / rel_stepsize (default 2.5 * eps / steps), random_start, momentum:
    as for PGD, and runtime budgets as there; `lambdas` too (one per restart, or per input and restart).
    threshold: the detector rejects scores above it. score_scale: the score's typical spread.
    loss: "margin" (C&W logit margin capped at `confidence`), "dlr" (Croce & Hein's DLR, capped
        likewise) or "ce" (cross-entropy).
    """

    name = "adaptive_pgd"
    budgets: ClassVar[tuple[str, ...]] = ("eps", "step_size", "rel_stepsize", "momentum", "lambdas")
    _parameter_constraints = {**GradientSignAttack._parameter_constraints, **DETECTOR_TERMS, "lambdas": [LAMBDAS],
                              "loss": [Options("margin", "ce", "dlr")], "confidence": [Interval(float, 0)]}
    threshold: float
    score_scale: float = 1.0
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0)
    steps: int = 40
    loss: str = "margin"
    confidence: float = 1.0
    restarts: int = dataclasses.field(default=1, init=False)
    early_stop: bool = dataclasses.field(default=False, init=False)

    def _objective(self) -> DetectorAware:
        return DetectorAware(self.threshold, self.score_scale, self.loss, self.confidence)

    def _plan(self) -> Plan:
        return dataclasses.replace(super()._plan(), restarts=len(self.lambdas), keep_best=True)

    def _budget(self, index: np.ndarray, overrides: dict[str, Any]) -> dict[str, np.ndarray]:
        overrides = dict(overrides)
        weights = restart_weights(self.lambdas, overrides.pop("lambdas", None), len(index))
        return super()._budget(index, overrides) | {"weights": weights}

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool, *,
               eps: Any, step: Any, momentum: Any, weights: Any) -> tuple:
        x_adv, success = ascend(forward, self._plan(), x, y, noise, eps, step, momentum, weights, targeted)
        return (x_adv, success, *perturbation_norms(x, x_adv))


@dataclasses.dataclass(frozen=True)
class JointMargin(Objective):
    """The joint objective of `AdaptiveAPGD`: min(classifier margin, lambda * detector margin), positive
    exactly when the input is misclassified and under the threshold, so each step works on whichever
    of the two is behind (a weighted sum lets the larger gradient drown the other: APGD's first steps
    of 2 eps then land where the detector is sure).

    classifier margin: the DLR loss ("dlr"), or for "ce" the cross-entropy's log-odds
    logsumexp_{j != y} z_j - z_y (cross-entropy = softplus of it: the same ascent direction and the
    same order of iterates, so APGD runs as on the cross-entropy); targeted, the target's side of each.
    detector margin: (threshold - score) / score_scale. Rank and shortfall as `DetectorAware`."""

    threshold: float
    score_scale: float = 1.0
    loss: str = "ce"
    levels: ClassVar[int] = 2

    def logits(self, outputs: Any) -> Any:
        return outputs[:, :-1]

    def evaluate(self, outputs: Any, goal: Any, targeted: bool, context: Any, weight: Any) -> tuple[Any, Any, Any]:
        logits, score = outputs[:, :-1], outputs[:, -1]
        if self.loss == "dlr":
            gap = dlr(logits, goal, targeted)
        else:
            onehot = ops.one_hot(goal, ops.shape(logits)[-1], dtype=logits.dtype)
            gap = ops.logsumexp(logits - 1e9 * onehot, axis=-1) - ops.sum(logits * onehot, axis=-1)
            gap = -gap if targeted else gap
        margin = (score - self.threshold) / self.score_scale
        hit = fooled(logits, goal, targeted)
        rank = ops.cast(hit, "int32") + ops.cast(ops.logical_and(hit, margin <= 0), "int32")
        return ops.minimum(gap, -weight * margin), rank, margin


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveAPGD(OnJointModel, APGD):
    """APGD (Croce & Hein 2020) on a `joint_model`: APGD-CE (`loss="ce"`) or APGD-DLR (`loss="dlr"`) on
    the joint objective `JointMargin`, `restarts` random starts for each weight lambda of `lambdas`
    (the detector margin's weight against the classifier's), every iterate a candidate; untargeted
    or targeted. eps and the lambdas are runtime budgets; the step size is APGD's own."""

    name = "adaptive_apgd"
    budgets: ClassVar[tuple[str, ...]] = ("eps", "lambdas")
    _parameter_constraints = {**APGD._parameter_constraints, **DETECTOR_TERMS, "lambdas": [LAMBDAS],
                              "loss": [Options("ce", "dlr")]}
    threshold: float
    score_scale: float = 1.0
    lambdas: tuple[float, ...] = (0.1, 1.0)
    loss: str = "ce"

    def _objective(self) -> JointMargin:
        return JointMargin(self.threshold, self.score_scale, self.loss)

    def _plan(self) -> Plan:
        return dataclasses.replace(super()._plan(), restarts=len(self.lambdas) * self.restarts)

    def _budget(self, index: np.ndarray, overrides: dict[str, Any]) -> dict[str, np.ndarray]:
        overrides = dict(overrides)
        weights = restart_weights(self.lambdas, overrides.pop("lambdas", None), len(index), self.restarts)
        return super()._budget(index, overrides) | {"weights": weights}

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool, *,
               eps: Any, step: Any, momentum: Any, weights: Any) -> tuple:
        x_adv, success = apgd_ascend(forward, self._plan(), x, y, noise, eps, weights, targeted)
        return (x_adv, success, *perturbation_norms(x, x_adv))
