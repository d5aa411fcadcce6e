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
from typing import Any

import keras
import numpy as np
from keras import ops

from attacks.backend import Forward, value_and_grad
from attacks.base import (
    Attack,
    AttackResult,
    check_finite_nonnegative,
    check_integer,
    check_labels,
    fooled,
)
from attacks.norms import (
    check_norm,
    per_image,
    perturbation_norms,
    project,
    steepest_direction,
)


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
class AdaptivePGD(Attack):
    """PGD on the classifier's loss minus lambda times the detector's softplus margin, swept over
    `lambdas`; called on a `joint_model`.

    eps, norm, steps, step_size (default 2.5 * eps / steps), random_start: as for PGD.
    threshold: the detector rejects scores above it. score_scale: the score's typical spread.
    loss: "margin" (C&W logit margin capped at `confidence`) or "ce" (cross-entropy).
    """

    name = "adaptive_pgd"
    eps: float
    threshold: float
    score_scale: float = 1.0
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0)
    norm: str = "inf"
    steps: int = 40
    step_size: float | None = None
    random_start: bool = False
    loss: str = "margin"
    confidence: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "norm", check_norm(self.norm))
        eps = check_finite_nonnegative("eps", self.eps)
        if self.norm == "inf" and eps > self.clip[1] - self.clip[0]:
            raise ValueError(f"eps must lie in [0, {self.clip[1] - self.clip[0]}] for L-inf, got {eps}")
        object.__setattr__(self, "eps", eps)
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
        object.__setattr__(self, "steps", check_integer("steps", self.steps))
        if self.loss not in ("margin", "ce"):
            raise ValueError(f"loss must be 'margin' or 'ce', got {self.loss!r}")
        object.__setattr__(self, "confidence", check_finite_nonnegative("confidence", self.confidence))
        step_size = 2.5 * eps / self.steps if self.step_size is None else self.step_size
        object.__setattr__(self, "step_size", check_finite_nonnegative("step_size", step_size))

    def __call__(self, model: keras.Model, x: Any, y: Any, *, targets: Any = None, **kwargs: Any) -> AttackResult:
        """As `Attack.__call__`, with `model` a `joint_model` (labels and targets are checked against
        its K classes, not its K + 1 outputs)."""
        classes = int(model.output_shape[-1]) - 1
        if classes < 2:
            raise ValueError(f"the joint model must output K >= 2 logits and a score, got {classes + 1} columns")
        check_labels(y, len(np.asarray(y)), classes)
        if targets is not None and not isinstance(targets, str):
            check_labels(targets, len(np.asarray(y)), classes, "targets")
        return super().__call__(model, x, y, targets=targets, **kwargs)

    def _choose_targets(self, mode: str, model: keras.Model, x: np.ndarray, y: np.ndarray, index: np.ndarray,
                        num_classes: int, batch_size: int) -> np.ndarray:
        if mode == "least_likely":
            return np.argmin(model.predict(x, batch_size=batch_size, verbose=0)[:, :-1], axis=-1)
        return super()._choose_targets(mode, model, x, y, index, num_classes - 1, batch_size)

    def _batch_noise(self, shape: tuple[int, ...], index: np.ndarray) -> np.ndarray:
        """(batch, lambdas, H, W, C) random starts in the eps-ball, per input from (seed, index)."""
        noise = np.zeros((shape[0], len(self.lambdas), *shape[1:]), np.float32)
        if self.random_start:
            for row, key in enumerate(index):
                rng = self.input_rng(key)
                for column in range(len(self.lambdas)):
                    if self.norm == "inf":
                        noise[row, column] = rng.uniform(-self.eps, self.eps, shape[1:])
                    else:  # a uniform direction, radius eps * u^(1/d)
                        direction = rng.standard_normal(shape[1:])
                        radius = self.eps * rng.uniform() ** (1.0 / direction.size)
                        noise[row, column] = direction * (radius / (np.linalg.norm(direction) + 1e-12))
        return noise

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool) -> tuple:
        def evaluate(z: Any, weight: float) -> tuple[Any, tuple[Any, Any]]:
            outputs = forward(z)
            logits, score = outputs[:, :-1], outputs[:, -1]
            if self.loss == "ce":
                loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
                loss = -loss if targeted else loss
            else:  # the best other class's logit over the goal's (targeted: the goal's over the best other)
                goal = ops.one_hot(y, ops.shape(logits)[-1], dtype=logits.dtype)
                gap = ops.max(logits - 1e9 * goal, axis=-1) - ops.sum(logits * goal, axis=-1)
                loss = ops.minimum(-gap if targeted else gap, self.confidence)
            margin = (score - self.threshold) / self.score_scale
            objective = loss - weight * ops.softplus(margin)
            return objective, (fooled(logits, y, targeted), margin)

        def keep(best: tuple, candidate: Any, now_fooled: Any, margin: Any) -> tuple:
            """Rank: evades (fooled, margin <= 0) > fooled > neither; then the lower margin."""
            best_x, best_rank, best_margin = best
            rank = ops.cast(now_fooled, "int32") + ops.cast(ops.logical_and(now_fooled, margin <= 0), "int32")
            better = ops.logical_or(rank > best_rank, ops.logical_and(rank == best_rank, margin < best_margin))
            return (ops.where(per_image(better), candidate, best_x), ops.where(better, rank, best_rank),
                    ops.where(better, margin, best_margin))

        n = ops.shape(x)[0]
        best = (x, ops.full((n,), -1, dtype="int32"), ops.full((n,), float("inf")))
        for column, weight in enumerate(self.lambdas):
            def step(x_adv: Any, *best: Any, weight: float = weight) -> tuple:
                _, (now_fooled, margin), grad = value_and_grad(lambda z: evaluate(z, weight), x_adv)
                best = keep(best, x_adv, now_fooled, margin)
                moved = project(x, x_adv + self.step_size * steepest_direction(grad, self.norm),
                                eps=self.eps, norm=self.norm, clip=self.clip)
                return (moved, *best)

            start = project(x, x + ops.take(noise, column, axis=1), eps=self.eps, norm=self.norm, clip=self.clip)
            # a real loop (not unrolled): steps x lambdas unrolled would compile slowly
            last, *best = ops.fori_loop(0, self.steps, lambda _, carried: step(*carried), (start, *best))
            _, (now_fooled, margin) = evaluate(last, weight)
            best = keep(tuple(best), last, now_fooled, margin)
        x_adv, rank, _ = best
        return (x_adv, rank == 2, *perturbation_norms(x, x_adv))
