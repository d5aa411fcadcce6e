"""Per-sample norms and projections in `keras.ops`, shared by every attack."""
from __future__ import annotations

from typing import Any

from keras import ops

from foundation.validation import Satisfies

NORMS = ("inf", "2")


def check_norm(norm: Any) -> str:
    """'inf' or '2' from any of inf, 2, "linf", "L2", ...; anything else is a ValueError."""
    name = str(norm).lower().removeprefix("l")
    if name not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: expected one of 'inf', '2'")
    return name


NORM = Satisfies("'inf' or '2' (also written inf, 2, 'Linf', 'L2')", check_norm)


def per_sample_norm(values: Any, norm: str) -> Any:
    """The L-inf or L2 norm of each sample of an NHWC batch, shape (n,)."""
    flat = ops.reshape(values, (ops.shape(values)[0], -1))
    if norm == "inf":
        return ops.max(ops.abs(flat), axis=1)
    return ops.sqrt(ops.sum(ops.square(flat), axis=1))


def per_image(per_sample: Any) -> Any:
    """Reshape (n,) to (n, 1, 1, 1) so it broadcasts over NHWC images."""
    return ops.reshape(per_sample, (-1, 1, 1, 1))


def project(x0: Any, x: Any, *, eps: Any, norm: str, clip: tuple[float, float]) -> Any:
    """Move `x` back into the eps-ball around `x0` (in `norm`) and into the clip range; `eps` is a
    number or one radius per image (shape (n, 1, 1, 1))."""
    delta = x - x0
    if norm == "inf":
        delta = ops.minimum(ops.maximum(delta, -eps), eps)
    else:
        length = per_image(per_sample_norm(delta, "2"))
        delta = delta * ops.minimum(1.0, eps / ops.maximum(length, 1e-12))
    return ops.clip(x0 + delta, clip[0], clip[1])


def steepest_direction(grad: Any, norm: str) -> Any:
    """The unit-norm ascent direction for `grad`: its sign (L-inf) or its L2-normalised value."""
    if norm == "inf":
        return ops.sign(grad)
    return grad / ops.maximum(per_image(per_sample_norm(grad, "2")), 1e-12)


def perturbation_norms(x0: Any, x_adv: Any) -> tuple[Any, Any]:
    """(L-inf, L2) norms of each sample's perturbation."""
    delta = x_adv - x0
    return per_sample_norm(delta, "inf"), per_sample_norm(delta, "2")
