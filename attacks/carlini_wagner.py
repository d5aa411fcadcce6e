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

Scale. With a fixed Adam rate every pixel moves by about the rate per iteration whatever the image,
so a rate tuned for MNIST (perturbations of L2 ~1.4 over 784 pixels) takes steps ten times too large
for CIFAR-10 (~0.3 over 3,072), and a fixed first c suits one logit scale only. By default
(`learning_rate=None`, `initial_const=None`) both follow each sample: the model linearised at the
input gives the distance to the boundary, r = margin / ||grad margin||, and the smallest c that
crosses it for a linear model, 2 margin / ||grad margin||^2 (the first c is twice that). Adam's rate
is a fraction of the per-pixel size of a perturbation of length r, and after each search step r
becomes the smallest L2 found so far; within a search step the rate decays to zero on a cosine, so
the last iterations refine instead of jumping across the boundary. Early abort ends a search step
only when every sample's loss has stalled (the reference stops when the batch's total does, which
ends the search for samples still improving).

The change of variables. The paper's x = lo + (hi - lo) * (tanh(w) + 1) / 2 cannot start at a pixel
on a bound (arctanh(+-1) is infinite), so the reference code starts at arctanh(0.999999 * (2 x~ - 1))
(x~ the pixel scaled to [0, 1]). There, in tanh's flat tail, Adam moves w by about learning_rate per
iteration and needs hundreds of iterations before a black or white pixel changes at all. This
implementation starts at w0 = arctanh(s * (2 x~ - 1)) with s = 0.9 and maps

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

from attacks.base import Attack
from attacks.norms import per_image, per_sample_norm, perturbation_norms
from foundation.backend import Forward, value_and_grad
from foundation.validation import BOOLEAN, Interval

# where on tanh an input pixel on a clip bound starts (see the module docstring)
_TANH_SHRINK = 0.9
_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPSILON = 1e-8
# abort early: a sample's loss has stalled when it fell by less than this fraction since the last check
_ABORT_TOLERANCE = 1e-4
# c's upper bound while no c has produced an adversarial example yet
_NO_UPPER_BOUND = 1e10
# the adaptive defaults: Adam's rate as a fraction of the per-pixel size of a perturbation of the
# current length, and the first c as a multiple of the linearised model's smallest working c
_RATE_FRACTION = 0.2
_CONST_FACTOR = 2.0


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
    learning_rate: Adam's step size on w. None (the default): per sample, from the distance to the
        decision boundary (the linearised model's, then the smallest L2 found), decayed on a cosine
        within each search step, so one setting fits any image size and scale. A number: that
        constant rate, as in the paper (which used 0.01 with up to 10,000 iterations).
    binary_search_steps: how many values of c each sample tries (each restarts from the input).
    steps: the most Adam iterations per search step.
    initial_const: the first c (weight of the misclassification term against the squared L2). None
        (the default): per sample, twice the smallest c that crosses the boundary of the model
        linearised at the input. A number: that c for every sample (the paper: 1e-3).
    abort_early: end a search step once every sample's loss has fallen by less than 0.01% over the
        last steps // 10 iterations.

    The attack has no eps: the perturbation is as large as needed (see the returned `l2`).
    """

    name = "cw"
    _parameter_constraints = {
        **Attack._parameter_constraints,
        "confidence": [Interval(float, 0)],
        "learning_rate": [None, Interval(float, 0, closed="neither")],
        "binary_search_steps": [Interval(int, 1)],
        "steps": [Interval(int, 1)],
        "initial_const": [None, Interval(float, 0, closed="neither")],
        "abort_early": [BOOLEAN],
    }
    confidence: float = 0.0
    learning_rate: float | None = None
    binary_search_steps: int = 9
    steps: int = 100
    initial_const: float | None = None
    abort_early: bool = True

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool) -> tuple:
        low, high = self.clip
        half = (high - low) / 2.0
        kappa = self.confidence
        n = ops.shape(x)[0]
        check_every = max(self.steps // 10, 1)
        adaptive_rate = self.learning_rate is None

        # x(w) = x + (high - low) / (2 s) * (tanh(w) - tanh(w0)), w0 = arctanh(s * (2 x~ - 1))
        scale = half / _TANH_SHRINK
        t0 = ops.clip((x - low) / half - 1.0, -1.0, 1.0) * _TANH_SHRINK
        w0 = ops.arctanh(t0)
        tanh0 = ops.tanh(w0)
        # the interval of w whose image lies in [low, high]; at a pixel on a bound, that end is w0
        w_low = ops.arctanh(ops.clip(tanh0 - (x - low) / scale, -1.0, 1.0))
        w_high = ops.arctanh(ops.clip(tanh0 + (high - x) / scale, -1.0, 1.0))

        # tanh's slope at the start of each pixel, relative to mid-range: the adaptive rate divides by it so
        # that a pixel on a bound (MNIST's background) starts moving as fast as a grey one
        start_slope = 1.0 - ops.square(t0)

        def image_of(w: Any) -> Any:
            return x + scale * (ops.tanh(w) - tanh0)

        def margin(logits: Any) -> Any:
            """How far each sample is from being adversarial: > 0 not yet, <= 0 fooled."""
            onehot = ops.one_hot(y, ops.shape(logits)[-1], dtype=logits.dtype)
            goal = ops.sum(onehot * logits, axis=-1)
            other = ops.max(logits - onehot * 1e9, axis=-1)
            return other - goal if targeted else goal - other

        def fooled(logits: Any, margin_needed: float) -> Any:
            """Adversarial with at least `margin_needed` to spare (the true/target logit handicapped)."""
            onehot = ops.one_hot(y, ops.shape(logits)[-1], dtype=logits.dtype)
            shifted = logits - margin_needed * onehot if targeted else logits + margin_needed * onehot
            predicted = ops.cast(ops.argmax(shifted, axis=-1), y.dtype)
            return predicted == y if targeted else predicted != y

        # the model linearised at the input: the distance to its boundary and the smallest c that crosses it
        gap, _, gap_grad = value_and_grad(lambda z: (margin(forward(z)) + kappa, ()), x)
        gap = ops.maximum(gap, 1e-6)
        slope = ops.maximum(per_sample_norm(gap_grad, "2"), 1e-12)
        pixels = ops.cast(ops.size(x), "float32") / ops.cast(n, "float32")
        diagonal = (high - low) * ops.sqrt(pixels)
        radius = ops.clip(gap / slope, diagonal * 1e-4, diagonal)
        if self.initial_const is None:
            first_const = ops.clip(_CONST_FACTOR * 2.0 * gap / ops.square(slope), 1e-6, _NO_UPPER_BOUND / 100)
        else:
            first_const = ops.full((n,), self.initial_const, "float32")

        def rate_of(radius: Any) -> Any:
            """Adam's rate per sample: a constant, or a fraction of the per-pixel size of a perturbation
            of length `radius` (tanh's slope at mid-range, scale, turns it into a step on w)."""
            if not adaptive_rate:
                return ops.full((n,), self.learning_rate, "float32")
            return _RATE_FRACTION * radius / ops.sqrt(pixels) / scale

        def objective(const: Any):
            def loss(w: Any) -> tuple[Any, Any]:
                image = image_of(w)
                logits = forward(image)
                misclassification = ops.maximum(margin(logits) + kappa, 0.0)
                distance = ops.sum(ops.square(image - x), axis=(1, 2, 3))
                return distance + const * misclassification, (distance, fooled(logits, kappa), image)

            return loss

        def search_step(outer, const, lower, upper, radius, best_l2, best_adv):
            loss = objective(const)
            rate = per_image(rate_of(radius))

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
                step = rate
                if adaptive_rate:  # cosine decay from the full rate to zero over the search step
                    step = rate * 0.5 * (1.0 + ops.cos(math.pi * ops.cast(i, "float32") / self.steps)) / start_slope
                w = w - step * m_hat / (ops.sqrt(v_hat) + _ADAM_EPSILON)
                w = ops.minimum(ops.maximum(w, w_low), w_high)
                if self.abort_early:  # every sample's loss stalled since the last check
                    check = (i % check_every) == 0
                    stalled = ops.all(values >= prev * (1.0 - _ABORT_TOLERANCE))
                    aborted = ops.logical_and(check, stalled)
                    prev = ops.where(check, values, prev)
                return i + 1, w, m, v, prev, aborted, hit, best_l2, best_adv

            def keep_going(i, w, m, v, prev, aborted, hit, best_l2, best_adv):
                return ops.logical_and(i < self.steps, ops.logical_not(aborted))

            zeros = ops.zeros_like(x)
            start = (
                ops.convert_to_tensor(0),
                w0,
                zeros,
                zeros,
                ops.full((n,), np.inf, "float32"),
                ops.convert_to_tensor(False),
                ops.zeros((n,), "bool"),
                best_l2,
                best_adv,
            )
            *_, hit, best_l2, best_adv = ops.while_loop(keep_going, adam_step, start)
            # the next rate follows the smallest perturbation found so far
            radius = ops.where(ops.isfinite(best_l2), ops.sqrt(best_l2), radius)
            return outer + 1, *next_const(hit, const, lower, upper), radius, best_l2, best_adv

        def more_searches(outer, const, lower, upper, radius, best_l2, best_adv):
            return outer < self.binary_search_steps

        start = (
            ops.convert_to_tensor(0),
            first_const,
            ops.zeros((n,), "float32"),
            ops.full((n,), _NO_UPPER_BOUND, "float32"),
            radius,
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
