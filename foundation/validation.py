"""Checks of what users hand us, each failing with a ValueError that names the problem before
anything is allocated: image batches (`check_images`: values in a range; `check_image_shape`: the
shape a model reads), labels, and parameters.

Parameters are declared once, scikit-learn style: a class lists each parameter's constraints in
`_parameter_constraints` (name -> the constraints it may satisfy, any one: `Interval`, `Options`,
`BOOLEAN`, `InstanceOf`, `Satisfies`, or None for "None allowed"); `Parameterized._set_params` checks
them all with one message format, "<Class>: <name> must be <constraint>, got <value!r>", and
`get_params` reads them back for manifests and reports.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar, Iterable, Sequence

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


def check_image_shape(x: Any, expected: Sequence[int | None], what: str = "the classifier's input") -> np.ndarray:
    """`x` as float32 numpy after checking it is a numeric batch whose items have the `expected`
    shape (None: any size); unlike `check_images`, any value range (a detector reads what it is given)."""
    x = np.asarray(x)
    _check_fits(x.shape, expected, what)
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"images must be numeric, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def check_model_input(model: keras.Model, x: Array) -> int:
    """Check that the NHWC batch `x` fits the model's (H, W, C) input; return how many classes it outputs."""
    _check_fits(tuple(x.shape), tuple(model.input_shape[1:]), "the model's input shape")
    return int(model.output_shape[-1])


def _check_fits(shape: tuple[int, ...], expected: Sequence[int | None], what: str) -> None:
    """ValueError unless a batch of `shape` holds items of the `expected` shape."""
    expected = tuple(expected)
    if len(shape) != len(expected) + 1 or any(e is not None and e != s for e, s in zip(expected, shape[1:])):
        raise ValueError(f"images of shape {tuple(shape[1:])} do not fit {what} {expected}")


# --------------------------------------------------------------------------------------------
# Declared parameter constraints
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interval:
    """Numbers of `kind` (int or float) from `low` to `high` (None: unbounded), the ends included as
    `closed` says ("both", "left", "right" or "neither"). Bools are not numbers here, floats must be
    finite, and an int kind refuses 3.0."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def convert(self, value: Any) -> int | float:
        wanted = numbers.Integral if self.kind is int else numbers.Real
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, wanted):
            raise TypeError(value)
        number = self.kind(value)
        low_open, high_open = self._open_ends()
        if (not math.isfinite(number)
                or self.low is not None and (number < self.low or low_open and number == self.low)
                or self.high is not None and (number > self.high or high_open and number == self.high)):
            raise ValueError(value)
        return number

    def _open_ends(self) -> tuple[bool, bool]:
        return self.closed in ("right", "neither"), self.closed in ("left", "neither")

    def __str__(self) -> str:
        low_open, high_open = self._open_ends()
        if self.kind is int:
            what = "an integer"
        else:
            what = "a number" if self.low is not None and self.high is not None else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if low_open else '['}{self.low:g}, {self.high:g}{')' if high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<' if high_open else '<='} {self.high:g}"
        return what


class Options:
    """One of a fixed set of values (e.g. strings naming a mode)."""

    def __init__(self, *values: Any) -> None:
        self.values = frozenset(values)

    def convert(self, value: Any) -> Any:
        if value not in self.values:  # an unhashable value raises TypeError: not an option either
            raise ValueError(value)
        return value

    def __str__(self) -> str:
        return f"one of {sorted(self.values, key=repr)}"


class _Boolean:
    def convert(self, value: Any) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(value)
        return bool(value)

    def __str__(self) -> str:
        return "True or False"


BOOLEAN = _Boolean()


@dataclasses.dataclass(frozen=True)
class InstanceOf:
    """An instance of `kind`, described as `description`."""

    kind: type
    description: str

    def convert(self, value: Any) -> Any:
        if not isinstance(value, self.kind):
            raise TypeError(value)
        return value

    def __str__(self) -> str:
        return self.description


@dataclasses.dataclass(frozen=True)
class Satisfies:
    """Whatever `convert` accepts (it returns the value to store, or raises ValueError or TypeError),
    described as `description`: for structured values (ranges, lists of names, weights)."""

    description: str
    convert: Callable[[Any], Any]

    def __str__(self) -> str:
        return self.description


def _finite_range(value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or len(value) != 2:
        raise ValueError(value)
    low, high = (Interval(float).convert(v) for v in value)
    if not low < high:
        raise ValueError(value)
    return low, high


CLIP_RANGE = Satisfies("a finite range (low, high) with low < high", _finite_range)


def param_error(owner: str | None, name: str, description: str, value: Any) -> ValueError:
    """The one message of a refused parameter: "<owner>: <name> must be <description>, got <value!r>"."""
    return ValueError(f"{owner + ': ' if owner else ''}{name} must be {description}, got {value!r}")


def check_param(name: str, value: Any, constraints: Sequence[Any], owner: str | None = None) -> Any:
    """`value`, converted by the first of `constraints` it satisfies (None: None is allowed), or
    ValueError naming them all."""
    for constraint in constraints:
        if constraint is None:
            if value is None:
                return None
            continue
        try:
            return constraint.convert(value)
        except (ValueError, TypeError):
            continue
    raise param_error(owner, name, " or ".join("None" if c is None else str(c) for c in constraints), value)


def validate_params(owner: str, constraints: dict[str, Sequence[Any]], values: dict[str, Any]) -> dict[str, Any]:
    """Every declared parameter's value in `values`, checked and converted (`check_param`)."""
    return {name: check_param(name, values[name], allowed, owner) for name, allowed in constraints.items()}


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """An integer parameter (bools refused) of at least `minimum`."""
    return check_param(name, value, [Interval(int, minimum)])


class Parameterized:
    """Parameters declared once: `_parameter_constraints` names every parameter and what it may be;
    `_set_params` checks them (one message format) and stores them as attributes; `get_params` gives
    their values as JSON (what manifests and reports record, and what the constructor takes back)."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}

    def _set_params(self, values: dict[str, Any]) -> None:
        """Check each declared parameter's value in `values` (e.g. a constructor's `locals()`) and
        store it, converted (through `object.__setattr__`, so frozen dataclasses work too)."""
        for name, value in validate_params(type(self).__name__, self._parameter_constraints, values).items():
            object.__setattr__(self, name, value)

    def _param_names(self) -> Iterable[str]:
        return self._parameter_constraints

    def _plain(self, value: Any) -> Any:
        """A parameter's value as JSON (tuples as lists)."""
        return [self._plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    def get_params(self) -> dict[str, Any]:
        """The parameters' values, JSON-able, in declaration order."""
        return {name: self._plain(getattr(self, name)) for name in self._param_names()}
