"""Carlini & Wagner's L2 attack (Carlini & Wagner 2017, "Towards Evaluating the Robustness of Neural
Networks"): the smallest L2 perturbation found by optimisation, not by a fixed budget.

Each input gets a change of variables x = lo + (tanh(w) + 1) / 2 * (hi - lo), which keeps every
image inside the clip range without projection, and Adam minimises

    ||x - x0||_2^2 + c * max(Z_true - max_{i != true} Z_i + kappa, 0)         (untargeted)
    ||x - x0||_2^2 + c * max(max_{i != target} Z_i - Z_target + kappa, 0)     (targeted)

over w, where Z are the logits. A per-sample binary search adjusts c: c shrinks (halving the known
bracket) after a search step that found an adversarial example for that sample, and grows (x10 until
one is found, then bisection) after one that did not. Over all steps the attack keeps, per sample,
the adversarial example with the smallest L2 distance; samples never fooled come back unchanged.

Everything, the binary search, Adam and the bookkeeping, runs in one compiled function as two
nested `keras.ops.while_loop`s, vectorised over the batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from keras import ops

from attacks.backend import Forward, value_and_grad
from attacks.base import Attack, check_finite_nonnegative
from attacks.norms import per_image, perturbation_norms

# arctanh(+-1) is infinite, so inputs at the clip bounds are pulled in by this factor (as in the
# reference implementation); the perturbation is measured from tanh(w0), so an untouched pixel
# stays exactly equal to the input.
_TANH_SHRINK = 0.999999
_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPSILON = 1e-8
# a const bracket whose upper end has not been found yet
_NO_UPPER_BOUND = 1e10


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class CarliniWagnerL2(Attack):
    """Carlini & Wagner L2 attack, with Adam in tanh space and a per-sample binary search over c.

    confidence: kappa, the logit margin the adversarial example must reach (0 = just fooled).
    learning_rate: Adam's step size on w (tanh space).
    binary_search_steps: how many values of c each sample tries (each restarts from the input).
    steps: the most Adam iterations per search step.
    initial_const: the first c, the weight of the misclassification term against the squared L2.
    abort_early: end a search step once the batch's total loss has fallen by less than 0.01% over
        the last steps // 10 iterations.
    """

    name = "cw"
    confidence: float = 0.0
    learning_rate: float = 0.01
    binary_search_steps: int = 5
    steps: int = 100
    initial_const: float = 1e-2
    abort_early: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "confidence", check_finite_nonnegative("confidence", self.confidence))
        object.__setattr__(self, "learning_rate", _check_positive("learning_rate", self.learning_rate))
        object.__setattr__(self, "initial_const", _check_positive("initial_const", self.initial_const))
        object.__setattr__(
            self, "binary_search_steps", _check_int("binary_search_steps", self.binary_search_steps, 1)
        )
        object.__setattr__(self, "steps", _check_int("steps", self.steps, 1))
        if not isinstance(self.abort_early, (bool, np.bool_)):
            raise ValueError(f"abort_early must be True or False, got {self.abort_early!r}")
        object.__setattr__(self, "abort_early", bool(self.abort_early))

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool) -> tuple:
        low, high = self.clip
        half = (high - low) / 2.0
        kappa = self.confidence
        n = ops.shape(x)[0]
        check_every = max(self.steps // 10, 1)

        # x(w) = x + (high - low) / 2 / s * (tanh(w) - tanh(w0)), with w0 = arctanh(s * (2 x~ - 1)):
        # exactly x at w0, and the image of w spans the clip range (a little more, cut off below).
        shrink = _TANH_SHRINK
        scale = half / shrink
        t0 = ops.clip((x - low) / half - 1.0, -1.0, 1.0) * shrink
        w0 = ops.arctanh(t0)
        tanh0 = ops.tanh(w0)
        # the interval of w whose image lies in [low, high]; at a pixel on a bound, that end is w0
        w_low = ops.arctanh(ops.clip(tanh0 - (x - low) / scale, -1.0, 1.0))
        w_high = ops.arctanh(ops.clip(tanh0 + (high - x) / scale, -1.0, 1.0))

        def image_of(w: Any) -> Any:
            return x + scale * (ops.tanh(w) - tanh0)

        def fooled(logits: Any, margin: float) -> Any:
            """Adversarial with at least `margin` to spare (the true/target logit handicapped)."""
            onehot = ops.one_hot(y, ops.shape(logits)[-1], dtype=logits.dtype)
            shifted = logits - margin * onehot if targeted else logits + margin * onehot
            predicted = ops.cast(ops.argmax(shifted, axis=-1), y.dtype)
            return predicted == y if targeted else predicted != y

        def objective(const: Any):
            def loss(w: Any) -> tuple[Any, Any]:
                image = image_of(w)
                logits = forward(image)
                onehot = ops.one_hot(y, ops.shape(logits)[-1], dtype=logits.dtype)
                goal = ops.sum(onehot * logits, axis=-1)
                other = ops.max(logits - onehot * 1e9, axis=-1)
                gap = other - goal if targeted else goal - other
                misclassification = ops.maximum(gap + kappa, 0.0)
                distance = ops.sum(ops.square(image - x), axis=(1, 2, 3))
                return distance + const * misclassification, (distance, fooled(logits, kappa), image)

            return loss

        def search_step(outer, const, lower, upper, best_l2, best_adv):
            loss = objective(const)

            def adam_step(i, w, m, v, prev, aborted, hit, best_l2, best_adv):
                values, (distance, now_fooled, image), grad = value_and_grad(loss, w)
                # the image w encodes before this update is the one the loss and logits describe
                better = ops.logical_and(now_fooled, distance < best_l2)
                best_l2 = ops.where(better, distance, best_l2)
                best_adv = ops.where(per_image(better), image, best_adv)
                hit = ops.logical_or(hit, now_fooled)
                t = ops.cast(i + 1, "float32")
                m = _ADAM_BETA1 * m + (1.0 - _ADAM_BETA1) * grad
                v = _ADAM_BETA2 * v + (1.0 - _ADAM_BETA2) * ops.square(grad)
                m_hat = m / (1.0 - ops.power(_ADAM_BETA1, t))
                v_hat = v / (1.0 - ops.power(_ADAM_BETA2, t))
                w = w - self.learning_rate * m_hat / (ops.sqrt(v_hat) + _ADAM_EPSILON)
                w = ops.minimum(ops.maximum(w, w_low), w_high)
                if self.abort_early:
                    total = ops.sum(values)
                    check = (i % check_every) == 0
                    aborted = ops.logical_and(check, total > prev * 0.9999)
                    prev = ops.where(check, total, prev)
                return i + 1, w, m, v, prev, aborted, hit, best_l2, best_adv

            def keep_going(i, w, m, v, prev, aborted, hit, best_l2, best_adv):
                return ops.logical_and(i < self.steps, ops.logical_not(aborted))

            zeros = ops.zeros_like(x)
            start = (
                ops.convert_to_tensor(0),
                w0,
                zeros,
                zeros,
                ops.convert_to_tensor(np.inf, "float32"),
                ops.convert_to_tensor(False),
                ops.zeros((n,), "bool"),
                best_l2,
                best_adv,
            )
            *_, hit, best_l2, best_adv = ops.while_loop(keep_going, adam_step, start)

            # success: the smallest failing c is an upper bound; failure: c is a lower bound
            upper = ops.where(hit, ops.minimum(upper, const), upper)
            lower = ops.where(hit, lower, ops.maximum(lower, const))
            bracketed = upper < _NO_UPPER_BOUND / 10
            const = ops.where(bracketed, (lower + upper) / 2.0, const * 10.0)
            return outer + 1, const, lower, upper, best_l2, best_adv

        def more_searches(outer, const, lower, upper, best_l2, best_adv):
            return outer < self.binary_search_steps

        start = (
            ops.convert_to_tensor(0),
            ops.full((n,), self.initial_const, "float32"),
            ops.zeros((n,), "float32"),
            ops.full((n,), _NO_UPPER_BOUND, "float32"),
            ops.full((n,), np.inf, "float32"),
            x,
        )
        *_, best_l2, best_adv = ops.while_loop(more_searches, search_step, start)

        # keep an example only if the model, run on exactly the returned image, is fooled by it
        best_adv = ops.clip(best_adv, low, high)
        found = per_image(ops.isfinite(best_l2))
        candidate = ops.where(found, best_adv, x)
        confirmed = ops.logical_and(ops.isfinite(best_l2), fooled(forward(candidate), 0.0))
        x_adv = ops.where(per_image(confirmed), candidate, x)
        return (x_adv, fooled(forward(x_adv), 0.0), *perturbation_norms(x, x_adv))
