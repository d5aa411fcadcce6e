"""Checks of what users hand us (image batches, labels, integer and real parameters), each failing
with a ValueError that names the problem before anything is allocated."""
from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from foundation.backend import Array, is_backend_array


def check_images(x: Any, clip: tuple[float, float]) -> Array:
    """`x` as float32 NHWC after checking rank, dtype, finiteness and range: numpy stays numpy, a
    backend array stays on its device (checked there). One min and one max pass: NaN fails the range
    test and infinities lie outside it, so no separate finiteness pass is needed on the host."""
    on_device = is_backend_array(x)
    if not on_device and not isinstance(x, np.ndarray):
        x = np.asarray(x)
    shape = tuple(x.shape)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if len(shape) != 4:
        raise ValueError(f"images must be a 4-D NHWC array, got shape {shape}")
    if "float" not in dtype:
        raise ValueError(f"images must be floating point in {list(clip)}, got dtype {dtype}")
    if shape[0] == 0:
        raise ValueError("no images given (empty batch)")
    if on_device:
        x = keras.ops.cast(x, "float32")
        low, high = (float(v) for v in keras.ops.convert_to_numpy(keras.ops.stack([keras.ops.min(x), keras.ops.max(x)])))
        if not bool(keras.ops.all(keras.ops.isfinite(x))):
            low = math.nan
    else:
        low, high = float(x.min()), float(x.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("images contain NaN or infinite values")
    if low < clip[0] or high > clip[1]:
        raise ValueError(f"images must lie in {list(clip)}, found values in [{low:.4g}, {high:.4g}]")
    return x if on_device else x.astype(np.float32, copy=False)


def check_labels(y: Any, n: int, num_classes: int, what: str = "labels") -> np.ndarray:
    """Return `y` as int32 class indices after checking length, dtype and range."""
    y = keras.ops.convert_to_numpy(y) if is_backend_array(y) else np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{what} must be a 1-D array of {n} class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must be integer class indices, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{what} must lie in [0, {num_classes - 1}] for this model, "
            f"found [{y.min()}, {y.max()}]"
        )
    return y.astype(np.int32)


def check_model_input(model: keras.Model, x: Array) -> int:
    """Check that `x` fits the model's input and return the number of classes it outputs."""
    expected = tuple(model.input_shape[1:])
    shape = tuple(x.shape[1:])
    if len(expected) != 3 or any(e is not None and e != a for e, a in zip(expected, shape, strict=True)):
        raise ValueError(
            f"images of shape {shape} do not fit the model's input shape {expected}"
        )
    return int(model.output_shape[-1])


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """An integer parameter (bools refused) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_finite_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value
