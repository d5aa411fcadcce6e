"""JSMA, the Jacobian-based Saliency Map Attack (Papernot et al., EuroS&P 2016), pair version.

A targeted L0 attack. Each iteration scores every pair of input features (p, q) in the search domain
with the paper's saliency map over pairs, for the network output F and target t:

    alpha_pq = dF_t/dx_p + dF_t/dx_q,    beta_pq = sum_{j != t} (dF_j/dx_p + dF_j/dx_q),
    S(p, q)  = -alpha_pq * beta_pq   where alpha_pq > 0 and beta_pq < 0 (p != q), else 0

("increasing" mode, theta > 0; with theta < 0 both conditions flip, "decreasing" mode), moves the
best pair by theta (clipped to the clip range) and removes both from the search domain, which
starts as the features that can still move (below the top of the clip range when increasing, above
the bottom when decreasing). A sample stops as soon as the model predicts its target, when no pair
is admissible, or after floor(gamma * features / 2) pairs: at most a fraction gamma of its features
ever change. The loop runs in the compiled function (`keras.ops.while_loop`), vectorised over the
batch.

F is the softmax output by default, as in the paper and CleverHans ("JSMA-F"). The softmax sums
to 1, so beta_pq = -alpha_pq exactly and S(p, q) = alpha_pq**2 on {alpha_pq > 0}: the map's maximum
is the two domain features with the largest dF_t/dx, which the attack finds in O(features) with a
top-2 instead of building the features**2 map (the same pair, not an approximation; the tests check
it against the brute-force map). With `logits=True`, F is the logits Z ("JSMA-Z", Carlini & Wagner
2017), where beta is not tied to alpha: the attack then builds the full (batch, features, features)
map, and `__call__` caps the batch size to keep it within about 64M scores (109 MNIST images).

Measured on MNIST (reference CNN, random targets, 2 CPU cores, TensorFlow): JSMA-F reached 97.7%
of 1000 test images changing 4.8% of the pixels on average (14.3% at most), in 10-25 s; building
the full pair map for it took about 200 s. JSMA-Z reached 86% of 200 images with the same budget.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from keras import ops

from attacks.base import Attack, AttackResult
from attacks.norms import perturbation_norms
from foundation.backend import Forward, value_and_grad
from foundation.validation import BOOLEAN, Interval, param_error

PAIR_SCORES_PER_BATCH = 1 << 26


@dataclasses.dataclass(frozen=True, kw_only=True)
class JSMA(Attack):
    """Targeted saliency-map attack that changes few pixels (an L0 attack).

    theta: the change applied to each selected feature (clipped to the clip range); > 0 raises
        features ("increasing" mode, the paper's best on MNIST), < 0 lowers them. 1.0 on [0, 1]
        images turns a selected pixel fully on.
    gamma: the most features changed, as a fraction of all input features (0 < gamma <= 1); the
        default 0.145 is the paper's MNIST setting.
    logits: take the saliency map on the logits (JSMA-Z) instead of the softmax output (JSMA-F).
    Without `targets`, each input gets a random target other than its label, drawn from `seed` and
    the input's index (`random_targets` gives the same ones, and the result's `targets` holds
    them); `success` means the model predicts the target.
    """

    name = "jsma"
    _parameter_constraints = {**Attack._parameter_constraints, "theta": [Interval(float)],
                              "gamma": [Interval(float, 0, 1, closed="right")], "logits": [BOOLEAN]}
    theta: float = 1.0
    gamma: float = 0.145
    logits: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        span = self.clip[1] - self.clip[0]
        if self.theta == 0 or abs(self.theta) > span:
            raise param_error(type(self).__name__, "theta", f"nonzero with |theta| <= {span:g} (the clip range's width)",
                              self.theta)

    def max_pairs(self, features: int) -> int:
        """How many feature pairs one input may change: floor(gamma * features / 2), at least 1."""
        return max(1, int(self.gamma * features / 2))

    def random_targets(self, y: Any, num_classes: int, index: Any = None) -> np.ndarray:
        """The targets used when none are given: per input a uniformly random class other than its
        label, drawn from (`seed`, index), the same as `targets="random"` of every attack."""
        y = np.asarray(y)
        index = np.arange(len(y)) if index is None else np.asarray(index)
        if index.shape != y.shape:
            raise ValueError(f"index must hold one integer per input ({len(y)}), got shape {index.shape}")
        shifts = np.asarray([self.input_rng(i, purpose=1).integers(1, num_classes) for i in index], dtype=np.int64)
        return ((y + shifts) % num_classes).astype(np.int32)

    def __call__(
        self, model: Any, x: Any, y: Any, *, targets: Any = "random", batch_size: int = 256, **kwargs: Any
    ) -> AttackResult:
        """Attack `x` towards `targets` (see `Attack.__call__`); JSMA is always targeted, and without
        targets (None or "random") each input gets `random_targets`. `success` and the result's
        `targets` refer to those targets."""
        if targets is None:
            targets = "random"
        features = int(np.prod(np.shape(x)[1:]))
        if self.logits and batch_size >= 1:  # a (batch, features, features) map: keep it in memory
            batch_size = min(batch_size, max(1, PAIR_SCORES_PER_BATCH // features**2))
        return super().__call__(model, x, y, targets=targets, batch_size=batch_size, **kwargs)

    def _batch(self, forward: Forward, x: Any, target: Any, noise: Any, targeted: bool) -> tuple:
        if not targeted:
            raise ValueError("JSMA is targeted: call it through JSMA.__call__, which supplies targets")
        low, high = self.clip
        sign = 1.0 if self.theta > 0 else -1.0  # increasing or decreasing mode
        image_shape = tuple(int(d) for d in x.shape[1:])
        features = int(np.prod(image_shape))
        if features < 2:
            raise ValueError("JSMA changes pairs of features: inputs need at least 2")
        target = ops.cast(target, "int32")
        x_flat = ops.reshape(x, (-1, features))

        def fooled(logits: Any) -> Any:
            return ops.cast(ops.argmax(logits, axis=-1), "int32") == target

        def log_probability(z: Any) -> tuple[Any, Any]:
            logits = forward(ops.reshape(z, (-1, *image_shape)))
            log_p = ops.log_softmax(logits, axis=-1)
            return ops.take_along_axis(log_p, ops.expand_dims(target, -1), axis=1)[:, 0], fooled(logits)

        def target_and_others(z: Any) -> tuple[Any, Any]:
            """z: the batch twice; values: Z_t on the first copy, the sum of the other logits on the second."""
            logits = ops.reshape(forward(ops.reshape(z, (-1, *image_shape))), (2, ops.shape(x)[0], -1))
            is_target = ops.one_hot(target, ops.shape(logits)[-1])
            target_logit = ops.sum(logits[0] * is_target, axis=-1)
            other_logits = ops.sum(logits[1] * (1.0 - is_target), axis=-1)
            return ops.concatenate([target_logit, other_logits]), fooled(logits[0])

        def best_pair_of_probabilities(z: Any, domain: Any) -> tuple[Any, Any, Any]:
            # On the softmax, the other classes' derivatives sum to minus the target's, so beta = -alpha
            # and S(p, q) = alpha_pq**2 on {sign * alpha_pq > 0}: the map's maximum is the two domain
            # features with the largest sign * dF_t/dx. The derivative of log F_t ranks them the same
            # (one positive factor per sample) without underflow when F_t is tiny.
            _, done, grad = value_and_grad(log_probability, z)
            saliency = ops.where(domain, sign * grad, ops.full_like(grad, -np.inf))
            values, pair = ops.top_k(saliency, k=2)
            return done, ops.cast(pair, "int32"), values[:, 0] + values[:, 1] > 0

        def best_pair_of_logits(z: Any, domain: Any) -> tuple[Any, Any, Any]:
            doubled = ops.reshape(ops.tile(ops.expand_dims(z, 0), (2, 1, 1)), (-1, features))
            _, done, grad = value_and_grad(target_and_others, doubled)
            grad = ops.reshape(grad, (2, -1, features))
            alpha = ops.expand_dims(grad[0], 2) + ops.expand_dims(grad[0], 1)  # (n, features, features)
            beta = ops.expand_dims(grad[1], 2) + ops.expand_dims(grad[1], 1)
            admissible = ops.logical_and(sign * alpha > 0, sign * beta < 0)
            admissible = ops.logical_and(admissible, ops.expand_dims(domain, 2))
            admissible = ops.logical_and(admissible, ops.expand_dims(domain, 1))
            admissible = ops.logical_and(admissible, not_diagonal)
            scores = ops.where(admissible, -alpha * beta, ops.zeros_like(alpha))
            scores = ops.reshape(scores, (-1, features * features))
            best = ops.cast(ops.argmax(scores, axis=-1), "int32")
            pair = ops.stack([best // features, best % features], axis=1)
            return done, pair, ops.max(scores, axis=-1) > 0

        if self.logits:
            not_diagonal = ops.logical_not(ops.cast(ops.eye(features), "bool"))
            best_pair = best_pair_of_logits
        else:
            best_pair = best_pair_of_probabilities

        def step(i: Any, z: Any, domain: Any, active: Any) -> tuple[Any, Any, Any, Any]:
            done, pair, found = best_pair(z, domain)
            # stop on success, and when no pair is admissible (the sample is stuck)
            active = ops.logical_and(active, ops.logical_and(ops.logical_not(done), found))
            chosen = ops.sum(ops.one_hot(pair, features), axis=1) > 0
            chosen = ops.logical_and(chosen, ops.expand_dims(active, 1))
            z = ops.where(chosen, ops.clip(z + self.theta, low, high), z)
            return i + 1, z, ops.logical_and(domain, ops.logical_not(chosen)), active

        def keep_going(i: Any, z: Any, domain: Any, active: Any) -> Any:
            return ops.logical_and(i < self.max_pairs(features), ops.any(active))

        domain = x_flat < high if self.theta > 0 else x_flat > low
        active = ops.ones((ops.shape(x)[0],), dtype="bool")
        _, z, _, _ = ops.while_loop(keep_going, step, (ops.convert_to_tensor(0), x_flat, domain, active))
        x_adv = ops.reshape(z, ops.shape(x))
        return (x_adv, fooled(forward(x_adv)), *perturbation_norms(x, x_adv))
