"""Carlini & Wagner's L2 attack (Carlini & Wagner 2017, "Towards Evaluating the Robustness of Neural
Networks"): the smallest L2 perturbation found by optimisation, not by a fixed budget.

Adam minimises, over a tanh-space variable w per pixel,

    ||x(w) - x0||_2^2 + c * max(Z_true - max_{i != true} Z_i + kappa, 0)         (untargeted)
    ||x(w) - x0||_2^2 + c * max(max_{i != target} Z_i - Z_target + kappa, 0)     (targeted)

where Z are the logits of x(w). A per-sample binary search adjusts c: after a search step that found
an adversarial example for a sample, c moves down (bisecting the bracket it now tops); after one
that did not, up (x10 until some c has worked, then bisection). Every search step restarts Adam from
the input. Over all steps the attack keeps, per sample, the adversarial example with the smallest L2
distance; samples never fooled come back exactly unchanged, with success False.

The change of variables. The paper's x = lo + (hi - lo) * (tanh(w) + 1) / 2 cannot start at a pixel
on a bound (arctanh(+-1) is infinite), so the reference code starts at arctanh(0.999999 * (2 x~ - 1))
(x~ the pixel scaled to [0, 1]). There, in tanh's flat tail, Adam moves w by about learning_rate per
iteration and needs hundreds of iterations before a black or white pixel changes at all: with a
budget of ~100 iterations that confines the attack to grey pixels (MNIST, default parameters: 96%
success and median L2 2.6 with 0.999999, against 100% and 1.4 here). This implementation starts at
w0 = arctanh(s * (2 x~ - 1)) with s = 0.9 and maps

    x(w) = x0 + (hi - lo) / (2 s) * (tanh(w) - tanh(w0)),

which is exactly x0 at w0 (no round-trip error), reaches every value in [lo, hi] (and up to
(1/s - 1)(hi - lo)/2 beyond; after each Adam step w is clipped to the interval that maps into
[lo, hi]), and is the paper's map scaled by 1/s. With s -> 1 it is the original parametrisation.

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
from attacks.base import Attack, check_integer
from attacks.norms import per_image, perturbation_norms

# where on tanh an input pixel on a clip bound starts (see the module docstring)
_TANH_SHRINK = 0.9
_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPSILON = 1e-8
# the reference's abort-early test: the loss must fall by more than this fraction per check
_ABORT_TOLERANCE = 1e-4
# c's upper bound while no c has produced an adversarial example yet
_NO_UPPER_BOUND = 1e10


def _number(name: str, value: Any, *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def next_const(hit: Any, const: Any, lower: Any, upper: Any) -> tuple[Any, Any, Any]:
    """One binary-search update per sample: (const, lower, upper) after a search step at `const`
    that found an adversarial example (`hit`) or not.

    A c that worked bounds the search from above, one that did not from below; c moves to the middle
    of the bracket, or grows tenfold while no c has worked yet (upper still _NO_UPPER_BOUND).
    """
    upper = ops.where(hit, ops.minimum(upper, const), upper)
    lower = ops.where(hit, lower, ops.maximum(lower, const))
    bracketed = upper < _NO_UPPER_BOUND / 10
    return ops.where(bracketed, (lower + upper) / 2.0, const * 10.0), lower, upper


@dataclasses.dataclass(frozen=True, kw_only=True)
class CarliniWagnerL2(Attack):
    """Carlini & Wagner L2 attack: Adam in tanh space with a per-sample binary search over c.

    confidence: kappa, the logit margin an adversarial example must have (0: just fooled). Larger
        values give examples that are farther away but more strongly misclassified.
    learning_rate: Adam's step size on w. The defaults (0.1, with 3 x 30 iterations) are tuned for
        images in [0, 1] like MNIST; for many-pixel images with small perturbations (CIFAR,
        ImageNet), a smaller rate with more steps finds smaller perturbations.
    binary_search_steps: how many values of c each sample tries (each restarts from the input).
    steps: the most Adam iterations per search step.
    initial_const: the first c (weight of the misclassification term against the squared L2).
    abort_early: end a search step once the batch's total loss has fallen by less than 0.01% over
        the last steps // 10 iterations (as in the reference implementation).

    The attack has no eps: the perturbation is as large as needed (see the returned `l2`).
    """

    name = "cw"
    confidence: float = 0.0
    learning_rate: float = 0.1
    binary_search_steps: int = 3
    steps: int = 30
    initial_const: float = 1.0
    abort_early: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "confidence", _number("confidence", self.confidence, positive=False))
        object.__setattr__(self, "learning_rate", _number("learning_rate", self.learning_rate, positive=True))
        object.__setattr__(self, "initial_const", _number("initial_const", self.initial_const, positive=True))
        object.__setattr__(
            self, "binary_search_steps", check_integer("binary_search_steps", self.binary_search_steps, 1)
        )
        object.__setattr__(self, "steps", check_integer("steps", self.steps, 1))
        if not isinstance(self.abort_early, (bool, np.bool_)):
            raise ValueError(f"abort_early must be True or False, got {self.abort_early!r}")
        object.__setattr__(self, "abort_early", bool(self.abort_early))

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool) -> tuple:
        low, high = self.clip
        half = (high - low) / 2.0
        kappa = self.confidence
        n = ops.shape(x)[0]
        check_every = max(self.steps // 10, 1)

        # x(w) = x + (high - low) / (2 s) * (tanh(w) - tanh(w0)), w0 = arctanh(s * (2 x~ - 1))
        scale = half / _TANH_SHRINK
        t0 = ops.clip((x - low) / half - 1.0, -1.0, 1.0) * _TANH_SHRINK
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
                    aborted = ops.logical_and(check, total > prev * (1.0 - _ABORT_TOLERANCE))
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

            return outer + 1, *next_const(hit, const, lower, upper), best_l2, best_adv

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
