"""Tests for foundation.validation's declared parameters: each constraint's description and
conversion, the one message format, every attack and detector family declaring all its
parameters, and the fingerprint memory of foundation.storage."""
from __future__ import annotations

import dataclasses
import inspect
import re

import keras
import numpy as np
import pytest

from attacks.adaptive import AdaptiveAPGD, AdaptivePGD
from attacks.orthogonal import OrthogonalPGD, SelectivePGD
from attacks.registry import ATTACKS
from detector import FAMILIES, InputDetector
from foundation import storage
from foundation.validation import (
    BOOLEAN,
    CLIP_RANGE,
    InstanceOf,
    Interval,
    Options,
    Parameterized,
    check_image_shape,
    check_param,
)

ATTACK_CLASSES = [*ATTACKS.values(), AdaptivePGD, AdaptiveAPGD, OrthogonalPGD, SelectivePGD]


@pytest.mark.parametrize(
    ("constraints", "value", "description"),
    [
        ([Interval(int, 1)], 0, "an integer >= 1"),
        ([Interval(int, 1)], True, "an integer >= 1"),
        ([Interval(int, 2)], 3.0, "an integer >= 2"),
        ([Interval(float, 0)], float("nan"), "a finite number >= 0"),
        ([Interval(float, 0)], "1", "a finite number >= 0"),
        ([Interval(float, 0, closed="neither")], 0.0, "a finite number > 0"),
        ([Interval(float, 0, 0.5, closed="neither")], 0.5, "a number in (0, 0.5)"),
        ([Interval(float, 0, 1, closed="right")], 0.0, "a number in (0, 1]"),
        ([Interval(float)], float("inf"), "a finite number"),
        ([None, Interval(float, 0, closed="neither")], "auto", "None or a finite number > 0"),
        ([Options("scale", "auto"), Interval(float, 0, closed="neither")], "wide", "one of ['auto', 'scale'] or a finite number > 0"),
        ([Options("ce", "dlr")], ["ce"], "one of ['ce', 'dlr']"),
        ([BOOLEAN], 1, "True or False"),
        ([CLIP_RANGE], (1.0, 0.0), "a finite range (low, high) with low < high"),
        ([CLIP_RANGE], "01", "a finite range (low, high) with low < high"),
        ([InstanceOf(str, "a string")], 3, "a string"),
    ],
)
def test_a_refused_value_gets_the_one_message(constraints, value, description):
    with pytest.raises(ValueError, match=f"^{re.escape(f'Owner: p must be {description}, got {value!r}')}$"):
        check_param("p", value, constraints, "Owner")


def test_accepted_values_are_converted_by_the_first_constraint_they_satisfy():
    assert check_param("p", np.int64(3), [Interval(int, 1)]) == 3 and type(check_param("p", np.int64(3), [Interval(int, 1)])) is int
    assert check_param("p", 2, [Interval(float, 0)]) == 2.0 and type(check_param("p", 2, [Interval(float, 0)])) is float
    assert check_param("p", np.bool_(True), [BOOLEAN]) is True
    assert check_param("p", [0, 1], [CLIP_RANGE]) == (0.0, 1.0)
    assert check_param("p", None, [None, Interval(int, 1)]) is None
    assert check_param("p", "scale", [Options("scale"), Interval(float, 0)]) == "scale"
    assert check_param("p", 0.0, [Interval(float, 0, 0.5, closed="left")]) == 0.0
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 0.5\), got 0.5"):
        check_param("p", 0.5, [Interval(float, 0, 0.5, closed="left")])


class Widget(Parameterized):
    _parameter_constraints = {"size": [Interval(int, 1)], "shape": [Options("round", "square")], "span": [CLIP_RANGE]}

    def __init__(self, *, size: int = 2, shape: str = "round", span: tuple = (0, 1)) -> None:
        self._set_params(locals())


def test_parameters_are_stored_converted_and_read_back_as_json():
    widget = Widget(size=np.int32(3), span=[0, 255])
    assert widget.size == 3 and widget.span == (0.0, 255.0)
    assert widget.get_params() == {"size": 3, "shape": "round", "span": [0.0, 255.0]}
    assert Widget(**widget.get_params()).get_params() == widget.get_params()
    with pytest.raises(ValueError, match=r"^Widget: shape must be one of \['round', 'square'\], got 'oval'$"):
        Widget(shape="oval")


@pytest.mark.parametrize("cls", ATTACK_CLASSES, ids=lambda cls: cls.__name__)
def test_every_attack_parameter_is_declared_and_recorded(cls):
    init_fields = [f.name for f in dataclasses.fields(cls) if f.init]
    assert set(init_fields) <= set(cls._parameter_constraints)
    attack = cls(**{name: 0.1 if name == "eps" else 0.0 for name in ("eps", "threshold") if name in init_fields})
    assert list(attack.get_params()) == ["attack", *init_fields]


@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=lambda cls: cls.kind)
def test_every_detector_parameter_is_declared(cls):
    """What the constructor takes (the classifier aside) is what the manifest records."""
    taken = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "classifier")]
    assert set(taken) == set(cls._parameter_constraints)


def test_a_detector_refuses_a_bad_parameter_by_name_and_class():
    with pytest.raises(ValueError, match=r"^InputDetector: validation_fraction must be a number in \(0, 0.5\), got 0.5$"):
        InputDetector(validation_fraction=0.5)
    with pytest.raises(ValueError, match=r"^InputDetector: highpass must be True or False, got 'no'$"):
        InputDetector(highpass="no")


def test_check_image_shape_reads_any_range_but_the_expected_shape():
    x = check_image_shape(np.full((2, 4, 4, 1), 200, np.uint8), (4, 4, None))
    assert x.dtype == np.float32 and x.max() == 200.0
    with pytest.raises(ValueError, match=r"images of shape \(4, 4\) do not fit the guard's input \(4, 4, 1\)"):
        check_image_shape(np.zeros((2, 4, 4)), (4, 4, 1), "the guard's input")
    with pytest.raises(ValueError, match="images must be numeric, got dtype <U1"):
        check_image_shape(np.full((1, 1), "a"), (1,))


def test_fingerprints_are_remembered_only_inside_the_block(monkeypatch):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    hashed = []
    convert = keras.ops.convert_to_numpy
    monkeypatch.setattr(storage.keras.ops, "convert_to_numpy", lambda v: hashed.append(1) or convert(v))
    with storage.remembered_fingerprints():
        first = storage.model_fingerprint(model)
        with storage.remembered_fingerprints():
            assert storage.model_fingerprint(model) == first
    assert len(hashed) == len(model.weights)  # the model was read once
    model.layers[-1].kernel.assign(np.ones((3, 2), np.float32))
    assert storage.model_fingerprint(model) != first  # outside the block: read again
