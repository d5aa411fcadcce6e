"""The gradient-sign family on one iterative engine: FGSM (one step), BIM / I-FGSM, PGD.

Each step moves along the loss gradient's sign (L-inf) or its unit direction (L2), then projects back
into the eps-ball around the input and into the clip range. The whole loop runs inside one compiled
function (`keras.ops.while_loop`), so nothing returns to Python or numpy between steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
from keras import ops

from attacks.backend import Forward, value_and_grad
from attacks.base import Attack, check_finite_nonnegative
from attacks.norms import NORMS, perturbation_norms, per_image, project, steepest_direction

@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientSignAttack(Attack):
    """Iterative gradient attack with L-inf or L2 projection (the engine behind FGSM, BIM and PGD).

    eps: radius of the allowed perturbation in the chosen norm.
    steps: gradient steps. step_size: per-step move (default 2.5 * eps / steps, Madry et al.).
    random_start: begin at a uniform random point of the eps-ball (PGD) instead of the input.
    early_stop: a sample that already fools the model stops changing; the loop ends when all do.
    """

    name = "gradient_sign"
    eps: float
    norm: str = "inf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = False
    early_stop: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        norm = str(self.norm).lower().removeprefix("l")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: expected one of 'inf', '2'")
        object.__setattr__(self, "norm", norm)
        eps = check_finite_nonnegative("eps", self.eps)
        if norm == "inf" and eps > self.clip[1] - self.clip[0]:
            raise ValueError(f"eps must lie in [0, {self.clip[1] - self.clip[0]}] for L-inf, got {eps}")
        object.__setattr__(self, "eps", eps)
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        step_size = 2.5 * eps / self.steps if self.step_size is None else self.step_size
        object.__setattr__(self, "step_size", check_finite_nonnegative("step_size", step_size))

    def _noise(self, sample_shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
        if not self.random_start:
            return None
        if self.norm == "inf":
            return rng.uniform(-self.eps, self.eps, sample_shape)
        # uniform in the L2 ball: a uniform direction, radius eps * u^(1/d)
        direction = rng.standard_normal(sample_shape)
        radius = self.eps * rng.uniform() ** (1.0 / direction.size)
        return direction * (radius / (np.linalg.norm(direction) + 1e-12))

    def _project(self, x0: Any, x: Any) -> Any:
        return project(x0, x, eps=self.eps, norm=self.norm, clip=self.clip)

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool) -> tuple:
        def fooled(logits: Any) -> Any:
            predicted = ops.cast(ops.argmax(logits, axis=-1), y.dtype)
            return predicted == y if targeted else predicted != y

        def loss_and_fooled(z: Any) -> tuple[Any, Any]:
            logits = forward(z)
            loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            return (-loss if targeted else loss), fooled(logits)

        def step(i: Any, x_adv: Any, active: Any) -> tuple[Any, Any, Any]:
            _, now_fooled, grad = value_and_grad(loss_and_fooled, x_adv)
            if self.early_stop:
                active = ops.logical_and(active, ops.logical_not(now_fooled))
            moved = self._project(x, x_adv + self.step_size * steepest_direction(grad, self.norm))
            return i + 1, ops.where(per_image(active), moved, x_adv), active

        def keep_going(i: Any, x_adv: Any, active: Any) -> Any:
            return ops.logical_and(i < self.steps, ops.any(active))

        start = self._project(x, x + noise)
        active = ops.ones((ops.shape(x)[0],), dtype="bool")
        _, x_adv, _ = ops.while_loop(keep_going, step, (ops.convert_to_tensor(0), start, active))
        return (x_adv, fooled(forward(x_adv)), *perturbation_norms(x, x_adv))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FGSM(GradientSignAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size eps."""

    name = "fgsm"
    steps: int = dataclasses.field(default=1, init=False)
    step_size: float | None = dataclasses.field(default=None, init=False)
    random_start: bool = dataclasses.field(default=False, init=False)
    early_stop: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_size", self.eps)
        super().__post_init__()


@dataclasses.dataclass(frozen=True, kw_only=True)
class BIM(GradientSignAttack):
    """Basic Iterative Method / I-FGSM (Kurakin et al. 2017): iterated FGSM from the input."""

    name = "bim"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PGD(GradientSignAttack):
    """Projected Gradient Descent (Madry et al. 2018): BIM from a random point of the eps-ball."""

    name = "pgd"
    random_start: bool = True
