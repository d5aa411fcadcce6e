"""What the gradient engine maximises: the loss hook (as Foolbox's `loss_fn`, but per sample).

An objective sees the model's outputs on an iterate and returns, per sample, three things:

- `value`: what the engine ascends (its gradient drives the step);
- `rank`: how good the iterate is as a result (0 = nothing; `levels` = full success);
- `shortfall`: among iterates of equal rank, lower is better (e.g. minus the loss, or a detector margin).

Objectives are frozen dataclasses (hashable), so one compiled engine serves each objective; the
numbers that change per call (eps, step sizes, momentum, per-restart weights) are not here but runtime
inputs of the engine. `prepare(forward, x)` computes what an objective needs from the clean batch
once (TRADES: the clean prediction), and `weight` is the engine's per-restart weight (the adaptive
attack's lambda; 1 elsewhere).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import keras
from keras import ops

Tensor = Any


def fooled(logits: Tensor, goal: Tensor, targeted: bool) -> Tensor:
    """Per sample: the model predicts the target (targeted) or anything but the label (untargeted)."""
    predicted = ops.cast(ops.argmax(logits, axis=-1), goal.dtype)
    return predicted == goal if targeted else predicted != goal


def logit_margin(logits: Tensor, goal: Tensor, targeted: bool) -> Tensor:
    """Carlini & Wagner's margin: the best other class's logit over the goal's (targeted: the goal's
    over the best other class); positive exactly when the attack has succeeded."""
    onehot = ops.one_hot(goal, ops.shape(logits)[-1], dtype=logits.dtype)
    gap = ops.max(logits - 1e9 * onehot, axis=-1) - ops.sum(logits * onehot, axis=-1)
    return -gap if targeted else gap


@dataclasses.dataclass(frozen=True)
class Objective:
    """Base of the loss hooks; subclasses implement `evaluate`."""

    levels: ClassVar[int] = 1

    def prepare(self, forward: Callable[[Tensor], Tensor], x: Tensor) -> Any:
        """Whatever the objective needs from the clean batch, computed once per batch (default: nothing)."""
        return None

    def logits(self, outputs: Tensor) -> Tensor:
        """The classifier's logits within the model's outputs (default: the outputs themselves)."""
        return outputs

    def evaluate(self, outputs: Tensor, goal: Tensor, targeted: bool, context: Any, weight: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """(value to maximise, rank, shortfall) per sample."""
        raise NotImplementedError

    def _misclassified(self, value: Tensor, logits: Tensor, goal: Tensor, targeted: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Rank 1 when fooled; among the rest, a higher value is better. Among fooled iterates the
        first one found is kept (its shortfall, -inf, is never beaten)."""
        hit = fooled(logits, goal, targeted)
        return value, ops.cast(hit, "int32"), ops.where(hit, -math.inf, -value)


@dataclasses.dataclass(frozen=True)
class CrossEntropy(Objective):
    """The label's cross-entropy (targeted: minus the target's), the default of every L-p attack."""

    def evaluate(self, outputs: Tensor, goal: Tensor, targeted: bool, context: Any, weight: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        loss = keras.losses.sparse_categorical_crossentropy(goal, outputs, from_logits=True)
        return self._misclassified(-loss if targeted else loss, outputs, goal, targeted)


@dataclasses.dataclass(frozen=True)
class Margin(Objective):
    """Carlini & Wagner's logit margin, capped at `confidence`: it does not saturate on a confident
    model as cross-entropy does, and stops pushing once the margin is reached."""

    confidence: float = math.inf

    def evaluate(self, outputs: Tensor, goal: Tensor, targeted: bool, context: Any, weight: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        value = ops.minimum(logit_margin(outputs, goal, targeted), self.confidence)
        return self._misclassified(value, outputs, goal, targeted)


def dlr(logits: Tensor, goal: Tensor, targeted: bool) -> Tensor:
    """Croce & Hein's Difference of Logits Ratio (2020, the loss of APGD-DLR in AutoAttack): the logit
    margin divided by the spread of the top logits, so that it does not change when the logits are
    rescaled (a defence that scales them up cannot hide behind it). Positive exactly when fooled.

    untargeted: (max_{i != y} z_i - z_y) / (z_(1) - z_(3));  targeted: (z_t - max_{i != t} z_i) /
    (z_(1) - (z_(3) + z_(4)) / 2), z_(k) the k-th largest logit. Needs 3 (targeted: 4) classes."""
    top = ops.top_k(logits, 4 if targeted else 3, sorted=True)[0]
    spread = top[:, 0] - ((top[:, 2] + top[:, 3]) / 2 if targeted else top[:, 2])
    return logit_margin(logits, goal, targeted) / (spread + 1e-12)


@dataclasses.dataclass(frozen=True)
class DifferenceOfLogitsRatio(Objective):
    """The DLR loss (`dlr`): scale-invariant, the second loss of AutoAttack beside cross-entropy."""

    def evaluate(self, outputs: Tensor, goal: Tensor, targeted: bool, context: Any, weight: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        return self._misclassified(dlr(outputs, goal, targeted), outputs, goal, targeted)


@dataclasses.dataclass(frozen=True)
class TradesKL(Objective):
    """KL(p(x) || p(x')) of the clean prediction to the iterate's (Zhang et al. 2019, TRADES): the
    inner maximisation of TRADES training. The label is not used."""

    def prepare(self, forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return ops.stop_gradient(ops.log_softmax(forward(x)))

    def evaluate(self, outputs: Tensor, goal: Tensor, targeted: bool, context: Tensor, weight: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        kl = ops.sum(ops.exp(context) * (context - ops.log_softmax(outputs)), axis=-1)
        return kl, ops.zeros_like(kl, dtype="int32"), -kl


@dataclasses.dataclass(frozen=True)
class DetectorAware(Objective):
    """The adaptive attack's objective on a classifier+detector model (K logits, then the score):

        L(logits) - weight * softplus((score - threshold) / score_scale)

    L is the capped logit margin ("margin"), cross-entropy ("ce") or the DLR loss ("dlr", capped at
    `confidence` like the margin); the second term pushes the score
    under the threshold. Rank: misclassified and under the threshold (2) > misclassified (1) > neither;
    among equals, the lower detector margin."""

    threshold: float
    score_scale: float = 1.0
    loss: str = "margin"
    confidence: float = 1.0
    levels: ClassVar[int] = 2

    def logits(self, outputs: Tensor) -> Tensor:
        return outputs[:, :-1]

    def evaluate(self, outputs: Tensor, goal: Tensor, targeted: bool, context: Any, weight: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        logits, score = outputs[:, :-1], outputs[:, -1]
        if self.loss == "ce":
            loss = keras.losses.sparse_categorical_crossentropy(goal, logits, from_logits=True)
            loss = -loss if targeted else loss
        else:
            gap = dlr(logits, goal, targeted) if self.loss == "dlr" else logit_margin(logits, goal, targeted)
            loss = ops.minimum(gap, self.confidence)
        margin = (score - self.threshold) / self.score_scale
        hit = fooled(logits, goal, targeted)
        rank = ops.cast(hit, "int32") + ops.cast(ops.logical_and(hit, margin <= 0), "int32")
        return loss - weight * ops.softplus(margin), rank, margin
