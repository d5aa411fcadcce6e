"""The one gradient engine: projected steepest ascent on an objective, compiled once per structure.

`ascend` runs every L-p gradient attack of the project: FGSM, BIM, PGD and MI-FGSM, the adaptive
attack on a classifier+detector, TRADES and eps warm-up in adversarial training, and the demo's
slider. What changes from call to call is a runtime input, one value per sample: the radius `eps`,
the absolute `step` and the `momentum`; and one `weight` per restart (the adaptive attack's lambda).
What fixes the compiled graph is the `Plan`: norm, steps, restarts, early stop, which iterate to keep,
the clip range and the objective (the loss hook, `attacks.objectives`). So a new eps never compiles
anything.

Each step moves along the steepest-ascent direction of the momentum-accumulated, L1-normalised
gradient (its sign for L-inf, its unit vector for L2; momentum 0 is plain PGD), then projects back
into the per-sample eps-ball and the clip range. Random starts arrive as unit noise (`unit_noise`,
uniform in the unit ball) that the engine scales by each sample's eps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import keras
import numpy as np
from keras import ops

from attacks.norms import per_image, project, steepest_direction
from attacks.objectives import Objective
from foundation.backend import Forward, repeat, value_and_grad

Tensor = Any


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static structure of one engine run (everything that changes the compiled graph).

    keep_best: every iterate is a candidate and each sample keeps its best (by the objective's rank,
        then shortfall; the adaptive attack); otherwise the last iterate of each restart is.
    """

    objective: Objective
    norm: str = "inf"
    steps: int = 10
    restarts: int = 1
    early_stop: bool = False
    keep_best: bool = False
    clip: tuple[float, float] = (0.0, 1.0)


def keep_better(best: tuple, candidate: Tensor, rank: Tensor, shortfall: Tensor) -> tuple:
    """(best_x, best_rank, best_shortfall) updated per sample with a candidate that ranks higher, or
    equal with a lower shortfall."""
    best_x, best_rank, best_shortfall = best
    better = ops.logical_or(rank > best_rank, ops.logical_and(rank == best_rank, shortfall < best_shortfall))
    return (ops.where(per_image(better), candidate, best_x), ops.where(better, rank, best_rank),
            ops.where(better, shortfall, best_shortfall))


def steepest_step(x0: Tensor, x: Tensor, direction: Tensor, eps: Any, step: Any, norm: str,
                  clip: tuple[float, float]) -> Tensor:
    """One step of the engine: `x` moved by `step` along the steepest-ascent direction of
    `direction` (a gradient), then projected into the eps-ball around `x0` and the clip range.
    Public so that a caller holding a gradient already (the demo caches the clean image's) takes
    exactly the engine's FGSM step without another backward pass."""
    return project(x0, x + step * steepest_direction(direction, norm), eps=eps, norm=norm, clip=clip)


def ascend(
    forward: Forward, plan: Plan, x: Tensor, goal: Tensor, noise: Tensor | None, eps: Tensor, step: Tensor,
    momentum: Tensor, weights: Tensor | None, targeted: bool,
) -> tuple[Tensor, Tensor | None]:
    """(x_adv, success): the engine on one batch. `noise` is (n, restarts, H, W, C) unit noise or None
    (start at the input); eps, step, momentum are (n,); weights (n, restarts) or None (all 1).
    `success` is None when nothing was judged (one restart, last iterate kept): the caller judges
    it on demand."""
    objective, levels = plan.objective, plan.objective.levels
    n = ops.shape(x)[0]
    eps, step, momentum = (per_image(ops.cast(v, x.dtype)) for v in (eps, step, momentum))
    evaluate = evaluator(forward, objective, x, goal, targeted)

    with_momentum = ops.any(momentum > 0)

    def accumulate(velocity: Tensor, grad: Tensor) -> Tensor:
        """MI-FGSM's velocity: decayed, plus the L1-normalised gradient."""
        l1 = per_image(ops.mean(ops.abs(ops.reshape(grad, (ops.shape(grad)[0], -1))), axis=1))
        return momentum * velocity + grad / ops.maximum(l1, 1e-12)

    def run(start: Tensor, weight: Tensor, best: tuple) -> tuple[Tensor, tuple]:
        """One restart from `start`; returns its last iterate and the best so far (keep_best)."""

        def one_step(i: Tensor, x_adv: Tensor, velocity: Tensor, active: Tensor, *best: Tensor) -> tuple:
            _, (rank, shortfall), grad = value_and_grad(lambda z: evaluate(z, weight), x_adv)
            if plan.keep_best:
                best = keep_better(best, x_adv, rank, shortfall)
            if plan.steps == 1:  # nothing to accumulate: the direction is the gradient's (FGSM)
                velocity = grad
            else:  # without momentum the accumulated direction is the gradient's: skip the sums
                velocity = ops.cond(with_momentum, lambda: accumulate(velocity, grad), lambda: grad)
            moved = steepest_step(x, x_adv, velocity, eps, step, plan.norm, plan.clip)
            if plan.early_stop:  # a sample that already succeeds stays where it is
                active = ops.logical_and(active, rank < levels)
                moved = ops.where(per_image(active), moved, x_adv)
            return (i + 1, moved, velocity, active, *best)

        def keep_going(i: Tensor, x_adv: Tensor, velocity: Tensor, active: Tensor, *best: Tensor) -> Tensor:
            return ops.logical_and(i < plan.steps, ops.any(active))

        state = (ops.convert_to_tensor(0), start, ops.zeros_like(x), ops.ones((n,), dtype="bool"), *best)
        if plan.early_stop:  # a data-dependent end: a real loop
            state = ops.while_loop(keep_going, one_step, state)
        else:
            state = repeat(one_step, state, plan.steps)
        return state[1], tuple(state[4:])

    def start_of(r: Any) -> Tensor:
        if noise is None:
            return x
        return project(x, x + eps * ops.take(noise, r, axis=1), eps=eps, norm=plan.norm, clip=plan.clip)

    weights = ops.ones((n, plan.restarts), x.dtype) if weights is None else ops.cast(weights, x.dtype)
    if plan.restarts == 1 and not plan.keep_best:
        last, _ = run(start_of(0), weights[:, 0], ())
        return last, None

    def restart(r: Tensor, best: tuple) -> tuple:
        weight = ops.take(weights, r, axis=1)
        last, tracked = run(start_of(r), weight, best if plan.keep_best else ())
        _, (rank, shortfall) = evaluate(last, weight)
        return keep_better(tracked if plan.keep_best else best, last, rank, shortfall)

    # with keep_best every restart (every lambda) may lower the shortfall further: run them all
    return over_restarts(restart, x, plan.restarts, levels, stop_when_all_succeed=not plan.keep_best)


def evaluator(forward: Forward, objective: Objective, x: Tensor, goal: Tensor, targeted: bool
              ) -> Callable[[Tensor, Tensor], tuple[Tensor, tuple[Tensor, Tensor]]]:
    """`evaluate(z, weight) -> (value, (rank, shortfall))` of `objective` on the model's outputs at z,
    with the objective's clean-batch context prepared once. A bfloat16 model's outputs are cast up:
    objective, perturbation and projection stay float32."""
    context = objective.prepare(forward, x)

    def evaluate(z: Tensor, weight: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        value, rank, shortfall = objective.evaluate(ops.cast(forward(z), x.dtype), goal, targeted, context, weight)
        return value, (rank, shortfall)

    return evaluate


def over_restarts(restart: Callable[[Tensor, tuple], tuple], x: Tensor, restarts: int, levels: int, *,
                  stop_when_all_succeed: bool) -> tuple[Tensor, Tensor]:
    """(x_adv, success): `best = restart(r, best)` for r < restarts in a compiled loop, from "nothing
    found" (the input, rank -1); it ends early once every input succeeds, when asked."""
    n = ops.shape(x)[0]

    def step(r: Tensor, *best: Tensor) -> tuple:
        return (r + 1, *restart(r, tuple(best)))

    def more(r: Tensor, best_x: Tensor, best_rank: Tensor, best_shortfall: Tensor) -> Tensor:
        if not stop_when_all_succeed:
            return r < restarts
        return ops.logical_and(r < restarts, ops.logical_not(ops.all(best_rank >= levels)))

    nothing = (x, ops.full((n,), -1, dtype="int32"), ops.full((n,), math.inf, dtype=x.dtype))
    _, x_adv, rank, _ = ops.while_loop(more, step, (ops.convert_to_tensor(0), *nothing))
    return x_adv, rank >= levels


def unit_noise(rng: np.random.Generator, shape: tuple[int, ...], norm: str) -> np.ndarray:
    """One random start in the unit ball of `norm` (the engine scales it by eps): uniform per pixel
    (L-inf), or a uniform direction at radius u^(1/d) (L2, uniform in the ball)."""
    if norm == "inf":
        return rng.uniform(-1.0, 1.0, shape)
    direction = rng.standard_normal(shape)
    radius = rng.uniform() ** (1.0 / direction.size)
    return direction * (radius / (np.linalg.norm(direction) + 1e-12))


def unit_noise_in_graph(shape: tuple, norm: str, seed: keras.random.SeedGenerator) -> Tensor:
    """`unit_noise` for a whole (n, restarts, H, W, C) batch inside a compiled step (adversarial
    training draws its starts from a Keras seed generator, not per input index)."""
    if norm == "inf":
        return keras.random.uniform(shape, -1.0, 1.0, seed=seed)
    direction = keras.random.normal(shape, seed=seed)
    length = ops.sqrt(ops.sum(ops.square(direction), axis=tuple(range(2, len(shape))), keepdims=True))
    size = math.prod(shape[2:])
    radius = keras.random.uniform((*shape[:2], *[1] * (len(shape) - 2)), seed=seed) ** (1.0 / size)
    return direction * radius / ops.maximum(length, 1e-12)
