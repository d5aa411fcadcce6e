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
import math
from typing import Any, ClassVar

import keras
import numpy as np
from keras import ops

from attacks.backend import Forward
from attacks.base import AttackResult, check_finite_nonnegative
from attacks.engine import Plan, ascend
from attacks.gradient_sign import GradientSignAttack
from attacks.norms import perturbation_norms
from attacks.objectives import DetectorAware


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptivePGD(GradientSignAttack):
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
    threshold: float
    score_scale: float = 1.0
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0)
    steps: int = 40
    loss: str = "margin"
    confidence: float = 1.0
    restarts: int = dataclasses.field(default=1, init=False)
    early_stop: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.loss not in ("margin", "ce", "dlr"):
            raise ValueError(f"loss must be 'margin', 'ce' or 'dlr', got {self.loss!r}")
        if not math.isfinite(float(self.threshold)):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")
        object.__setattr__(self, "threshold", float(self.threshold))
        scale = float(self.score_scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"score_scale must be a finite number > 0, got {self.score_scale}")
        object.__setattr__(self, "score_scale", scale)
        lambdas = tuple(check_finite_nonnegative("lambdas", v) for v in np.atleast_1d(self.lambdas))
        if not lambdas:
            raise ValueError("lambdas must hold at least one weight")
        object.__setattr__(self, "lambdas", lambdas)
        object.__setattr__(self, "confidence", check_finite_nonnegative("confidence", self.confidence))
        super().__post_init__()

    def _objective(self) -> DetectorAware:
        return DetectorAware(self.threshold, self.score_scale, self.loss, self.confidence)

    def _plan(self) -> Plan:
        return dataclasses.replace(super()._plan(), restarts=len(self.lambdas), keep_best=True)

    def _budget(self, n: int, overrides: dict[str, Any]) -> dict[str, np.ndarray]:
        overrides = dict(overrides)
        lambdas = np.asarray(overrides.pop("lambdas", self.lambdas), dtype=np.float64)
        count = len(self.lambdas)
        if lambdas.shape not in ((count,), (n, count)) or not np.isfinite(lambdas).all() or (lambdas < 0).any():
            raise ValueError(f"lambdas must hold {count} finite weights >= 0 (or that many per input), got {lambdas!r}")
        weights = np.broadcast_to(lambdas, (n, count)).astype(np.float32)
        return super()._budget(n, overrides) | {"weights": weights}

    def _classes(self, model: keras.Model) -> int:
        return int(model.output_shape[-1]) - 1

    def _logits(self, outputs: Any) -> Any:
        return outputs[:, :-1]

    def __call__(self, model: keras.Model, x: Any, y: Any, *, targets: Any = None, **kwargs: Any) -> AttackResult:
        """As `Attack.__call__`, with `model` a `joint_model` (labels and targets are checked against
        its K classes, not its K + 1 outputs)."""
        if self._classes(model) < 2:
            raise ValueError(f"the joint model must output K >= 2 logits and a score, got {self._classes(model) + 1} columns")
        return super().__call__(model, x, y, targets=targets, **kwargs)

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool, *,
               eps: Any, step: Any, momentum: Any, weights: Any) -> tuple:
        x_adv, success = ascend(forward, self._plan(), x, y, noise, eps, step, momentum, weights, targeted)
        return (x_adv, success, *perturbation_norms(x, x_adv))
