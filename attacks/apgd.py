"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): PGD whose step size needs no tuning, the core of AutoAttack.

Per sample, the step starts at 2 eps and is halved at checkpoints (after 22%, 41%, 56%, ... of the
iterations) when the loss rose in fewer than 75% of the steps since the last checkpoint, or when
neither the step nor the best loss changed since then; a halving restarts from the best point found.
Each step mixes the projected gradient step with the previous move (momentum 0.75). The loss is any
objective of `attacks.objectives` (cross-entropy: APGD-CE; "dlr": APGD-DLR; the adaptive attack's
classifier+detector objective), so APGD runs through the same compiled machinery as PGD: eps is a
runtime budget, restarts draw their starts per input from (seed, index), and each input keeps its
best iterate by the objective's rank.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
from keras import ops

from attacks.engine import Plan, evaluator, keep_better, over_restarts, steepest_step
from attacks.gradient_sign import GradientSignAttack
from attacks.norms import per_image, perturbation_norms, project
from foundation.backend import Forward, value_and_grad

MOMENTUM = 0.75  # weight of the new projected step against the previous move
RHO = 0.75  # at a checkpoint, the step halves unless the loss rose in this share of the steps since the last


def checkpoints(steps: int) -> list[int]:
    """The iterations after which APGD may halve its step: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as ceil(p_j * steps)."""
    points, previous, current = [], 0.0, 0.22
    while current <= 1.0:
        points.append(math.ceil(round(current * steps, 6)))  # round: 0.41 * 100 is not 41.000...04
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return sorted(set(p for p in points if 0 < p <= steps))


def apgd_ascend(forward: Forward, plan: Plan, x: Any, goal: Any, noise: Any, eps: Any, weights: Any,
                targeted: bool) -> tuple[Any, Any]:
    """(x_adv, success) for one batch: APGD with plan.restarts restarts, every iterate a candidate."""
    objective, levels = plan.objective, plan.objective.levels
    n = ops.shape(x)[0]
    eps = ops.cast(eps, x.dtype)  # (n,); per_image(eps) broadcasts over the images
    marks = checkpoints(plan.steps)
    is_mark = ops.convert_to_tensor(np.isin(np.arange(1, plan.steps + 1), marks))
    spans = np.ones(plan.steps, "float32")  # at a checkpoint: the steps since the one before
    for previous, mark in zip([0, *marks], marks):
        spans[mark - 1] = mark - previous
    spans = ops.convert_to_tensor(spans)
    weights = ops.ones((n, plan.restarts), x.dtype) if weights is None else ops.cast(weights, x.dtype)

    evaluate = evaluator(forward, objective, x, goal, targeted)

    def loss_and_grad(z: Any, weight: Any) -> tuple[Any, Any, Any, Any]:
        value, (rank, shortfall), grad = value_and_grad(lambda u: evaluate(u, weight), z)
        return value, rank, shortfall, grad

    def one_restart(r: Any, best: tuple) -> tuple:
        weight = ops.take(weights, r, axis=1)
        radius = per_image(eps)
        start = x if noise is None else project(x, x + radius * ops.take(noise, r, axis=1), eps=radius, norm=plan.norm, clip=plan.clip)
        value, rank, shortfall, grad = loss_and_grad(start, weight)
        best = keep_better(best, start, rank, shortfall)
        step = 2.0 * eps
        state = (start, start, value, grad, step, start, value, grad, ops.zeros_like(value), step, value, *best)

        def body(i: Any, state: tuple) -> tuple:
            (x_k, x_prev, f_k, g_k, step, x_max, f_max, g_max, rises, step_mark, f_mark, *best) = state
            z = steepest_step(x, x_k, g_k, radius, per_image(step), plan.norm, plan.clip)
            mix = ops.where(i == 0, 1.0, MOMENTUM)
            x_new = project(x, x_k + mix * (z - x_k) + (1.0 - mix) * (x_k - x_prev), eps=radius, norm=plan.norm, clip=plan.clip)
            f_new, rank, shortfall, g_new = loss_and_grad(x_new, weight)
            best = keep_better(tuple(best), x_new, rank, shortfall)
            rises = rises + ops.cast(f_new > f_k, x.dtype)
            improved = f_new > f_max
            x_max, g_max = ops.where(per_image(improved), x_new, x_max), ops.where(per_image(improved), g_new, g_max)
            f_max = ops.where(improved, f_new, f_max)
            # at a checkpoint: halve the step (and go back to the best point) where progress stalled
            stalled = ops.logical_or(rises < RHO * ops.take(spans, i),
                                     ops.logical_and(step == step_mark, f_max == f_mark))
            at_mark = ops.take(is_mark, i)
            halve = ops.logical_and(at_mark, stalled)
            step = ops.where(halve, step / 2.0, step)
            x_next = ops.where(per_image(halve), x_max, x_new)
            g_next = ops.where(per_image(halve), g_max, g_new)
            f_next = ops.where(halve, f_max, f_new)
            rises = ops.where(at_mark, ops.zeros_like(rises), rises)
            step_mark = ops.where(at_mark, step, step_mark)
            f_mark = ops.where(at_mark, f_max, f_mark)
            return (x_next, x_k, f_next, g_next, step, x_max, f_max, g_max, rises, step_mark, f_mark, *best)

        state = ops.fori_loop(0, plan.steps, body, state)
        return tuple(state[11:])

    return over_restarts(one_restart, x, plan.restarts, levels, stop_when_all_succeed=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class APGD(GradientSignAttack):
    """APGD-CE (default) or APGD-DLR (`loss="dlr"`), L-inf or L2, untargeted or targeted; `steps`
    iterations per restart (AutoAttack uses 100), `restarts` random starts (the first from the input
    when `random_start` is off). eps is a runtime budget; the step size is APGD's own."""

    name = "apgd"
    budgets: ClassVar[tuple[str, ...]] = ("eps",)
    steps: int = 100
    random_start: bool = True
    step_size: float | None = dataclasses.field(default=None, init=False)
    rel_stepsize: float | None = dataclasses.field(default=2.0, init=False)
    momentum: float = dataclasses.field(default=MOMENTUM, init=False)
    early_stop: bool = dataclasses.field(default=False, init=False)

    def _plan(self) -> Plan:
        return dataclasses.replace(super()._plan(), keep_best=True)

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool, *,
               eps: Any, step: Any, momentum: Any) -> tuple:
        x_adv, success = apgd_ascend(forward, self._plan(), x, y, noise, eps, None, targeted)
        return (x_adv, success, *perturbation_norms(x, x_adv))
