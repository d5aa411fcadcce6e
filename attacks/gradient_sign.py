"""The gradient-sign family on one iterative engine: FGSM (one step), BIM / I-FGSM, PGD, MI-FGSM.

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

from attacks.backend import Forward, repeat, value_and_grad
from attacks.base import Attack, check_finite_nonnegative, check_integer, fooled
from attacks.norms import check_norm, per_image, perturbation_norms, project, steepest_direction


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientSignAttack(Attack):
    """Iterative gradient attack with L-inf or L2 projection (the engine behind FGSM, BIM and PGD).

    eps: radius of the allowed perturbation in the chosen norm.
    steps: gradient steps. step_size: per-step move (default 2.5 * eps / steps, Madry et al.).
    random_start: begin at a uniform random point of the eps-ball (PGD) instead of the input.
    restarts: independent random starts; each input keeps its best (first successful, else
        highest-loss) result. Needs random_start.
    momentum: decay of the accumulated L1-normalised gradient (MI-FGSM, Dong et al. 2018); 0 = off.
    early_stop: a sample that already fools the model stops changing; the loop ends when all do.
    """

    name = "gradient_sign"
    eps: float
    norm: str = "inf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = False
    restarts: int = 1
    momentum: float = 0.0
    early_stop: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        norm = check_norm(self.norm)
        object.__setattr__(self, "norm", norm)
        eps = check_finite_nonnegative("eps", self.eps)
        if norm == "inf" and eps > self.clip[1] - self.clip[0]:
            raise ValueError(f"eps must lie in [0, {self.clip[1] - self.clip[0]}] for L-inf, got {eps}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "steps", check_integer("steps", self.steps))
        object.__setattr__(self, "restarts", check_integer("restarts", self.restarts))
        if self.restarts > 1 and not self.random_start:
            raise ValueError("restarts > 1 needs random_start=True: without it every restart is identical")
        object.__setattr__(self, "momentum", check_finite_nonnegative("momentum", self.momentum))
        step_size = 2.5 * eps / self.steps if self.step_size is None else self.step_size
        object.__setattr__(self, "step_size", check_finite_nonnegative("step_size", step_size))

    def _batch_noise(self, shape: tuple[int, ...], index: np.ndarray) -> np.ndarray:
        """(batch, restarts, H, W, C) random starts: uniform in the eps-ball, per input from (seed, index)."""
        noise = np.zeros((shape[0], self.restarts, *shape[1:]), np.float32)
        if not self.random_start:
            return noise
        size = int(np.prod(shape[1:]))
        for row, key in enumerate(index):
            rng = self.input_rng(key)
            for restart in range(self.restarts):
                if self.norm == "inf":
                    noise[row, restart] = rng.uniform(-self.eps, self.eps, shape[1:])
                else:  # a uniform direction, radius eps * u^(1/d)
                    direction = rng.standard_normal(shape[1:])
                    radius = self.eps * rng.uniform() ** (1.0 / size)
                    noise[row, restart] = direction * (radius / (np.linalg.norm(direction) + 1e-12))
        return noise

    def _project(self, x0: Any, x: Any) -> Any:
        return project(x0, x, eps=self.eps, norm=self.norm, clip=self.clip)

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool) -> tuple:
        def loss_and_fooled(z: Any) -> tuple[Any, Any]:
            logits = forward(z)
            loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            return (-loss if targeted else loss), fooled(logits, y, targeted)

        def step(i: Any, x_adv: Any, velocity: Any, active: Any) -> tuple[Any, Any, Any, Any]:
            _, now_fooled, grad = value_and_grad(loss_and_fooled, x_adv)
            if self.early_stop:
                active = ops.logical_and(active, ops.logical_not(now_fooled))
            l1 = per_image(ops.mean(ops.abs(ops.reshape(grad, (ops.shape(grad)[0], -1))), axis=1))
            velocity = self.momentum * velocity + grad / ops.maximum(l1, 1e-12)
            moved = self._project(x, x_adv + self.step_size * steepest_direction(velocity, self.norm))
            return i + 1, ops.where(per_image(active), moved, x_adv), velocity, active

        def keep_going(i: Any, x_adv: Any, velocity: Any, active: Any) -> Any:
            return ops.logical_and(i < self.steps, ops.any(active))

        def run_from(start_noise: Any) -> Any:
            state = (
                ops.convert_to_tensor(0), self._project(x, x + start_noise),
                ops.zeros_like(x), ops.ones((ops.shape(x)[0],), dtype="bool"),
            )
            if self.early_stop:  # a data-dependent end: a real loop
                return ops.while_loop(keep_going, step, state)[1]
            return repeat(step, state, self.steps)[1]

        if self.restarts == 1:  # success is judged from x_adv only if the caller asks for it
            x_adv = run_from(noise[:, 0])
            return (x_adv, None, *perturbation_norms(x, x_adv))

        def restart(r: Any, best_x: Any, best_loss: Any, best_fooled: Any) -> tuple[Any, Any, Any, Any]:
            candidate = run_from(ops.take(noise, r, axis=1))
            loss, now_fooled = loss_and_fooled(candidate)
            better = ops.logical_or(
                ops.logical_and(now_fooled, ops.logical_not(best_fooled)),
                ops.logical_and(ops.logical_not(ops.logical_or(now_fooled, best_fooled)), loss > best_loss),
            )
            return (
                r + 1, ops.where(per_image(better), candidate, best_x),
                ops.where(better, loss, best_loss), ops.logical_or(best_fooled, now_fooled),
            )

        def more_restarts(r: Any, best_x: Any, best_loss: Any, best_fooled: Any) -> Any:
            return ops.logical_and(r < self.restarts, ops.logical_not(ops.all(best_fooled)))

        no_loss = ops.full((ops.shape(x)[0],), -float("inf"))
        state = (ops.convert_to_tensor(0), x, no_loss, ops.zeros((ops.shape(x)[0],), dtype="bool"))
        _, x_adv, _, success = ops.while_loop(more_restarts, restart, state)
        return (x_adv, success, *perturbation_norms(x, x_adv))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FGSM(GradientSignAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size eps."""

    name = "fgsm"
    steps: int = dataclasses.field(default=1, init=False)
    step_size: float | None = dataclasses.field(default=None, init=False)
    random_start: bool = dataclasses.field(default=False, init=False)
    restarts: int = dataclasses.field(default=1, init=False)
    momentum: float = dataclasses.field(default=0.0, init=False)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class MIFGSM(GradientSignAttack):
    """Momentum Iterative FGSM (Dong et al. 2018): BIM whose steps follow accumulated gradients,
    which transfers better to models the attacker cannot see."""

    name = "mifgsm"
    momentum: float = 1.0
