"""Differentiable stand-ins for detector scores, so an adaptive attack can aim at every family.

| family | stand-in (`method`) |
|---|---|
| `input`, `activations` (any with `scoring_model`) | the score itself (`white-box`) |
| `mahalanobis` | its distances and regression in keras.ops (`white-box`; `bpda` when `noise` > 0: the noise step is skipped) |
| `squeeze` (bit depth, median) | exact forward pass, squeezers differentiated as the identity (`bpda`, Athalye et al. 2018) |
| `safetynet` | exact forward pass; the code quantiser differentiated as a sum of sigmoids (`bpda`) |
| `ensemble` | the stacker's linear map over its members' stand-ins |
| `joint` | its rule over the member's stand-in and the classifier's logit gap |
| anything else | a small CNN trained to mimic the scores (`surrogate`) |

Every stand-in is a Keras model from images to one score per image in the detector's own units, so
the detector's threshold applies unchanged. Adaptive results are always judged by the real detector.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from detector.base import Detector
from detector.ensemble import EnsembleDetector
from detector.input_detector import build_input_cnn
from detector.joint import JointDetector
from detector.mahalanobis import MahalanobisDetector
from detector.squeeze import SqueezeDetector
from detector.svm import SafetyNetDetector


@dataclasses.dataclass(frozen=True)
class StandIn:
    """A Keras model from images to the detector's score, and how it was obtained."""

    model: keras.Model
    method: str


def _constant(array: np.ndarray) -> Any:
    return ops.convert_to_tensor(np.asarray(array, np.float32))


def _outputs(model: keras.Model, inputs: Any) -> list[Any]:
    return keras.tree.flatten(model(inputs))


def _straight_through(x: Any, squeezed: Any) -> Any:
    """`squeezed` in the forward pass, the identity in the backward pass."""
    return x + ops.stop_gradient(squeezed - x)


def _median(x: Any, size: int) -> Any:
    """cv2.medianBlur in keras.ops: replicated borders, the middle of the sorted size x size window
    (on 8-bit levels for windows above 5, as OpenCV does for float images)."""
    if size > 5:
        x = ops.round(ops.clip(x, 0.0, 1.0) * 255.0) / 255.0
    pad = size // 2
    height, width = x.shape[1], x.shape[2]
    rows = ops.concatenate([ops.repeat(x[:, :1], pad, axis=1), x, ops.repeat(x[:, -1:], pad, axis=1)], axis=1)
    padded = ops.concatenate([ops.repeat(rows[:, :, :1], pad, axis=2), rows, ops.repeat(rows[:, :, -1:], pad, axis=2)], axis=2)
    windows = [padded[:, i:i + height, j:j + width] for i in range(size) for j in range(size)]
    return ops.sort(ops.stack(windows, axis=-1), axis=-1)[..., size * size // 2]


def _squeezer(spec: str) -> Callable[[Any], Any] | None:
    """The keras.ops version of a squeezer spec, or None when there is none (non-local means)."""
    name, *args = spec.split(":")
    if name == "bit_depth":
        levels = 2 ** int(args[0]) - 1
        return lambda x: ops.round(ops.clip(x, 0.0, 1.0) * levels) / levels
    if name == "median":
        return lambda x: _median(x, int(args[0]))
    return None


def _squeeze(detector: SqueezeDetector, inputs: Any) -> Any | None:
    functions = [_squeezer(spec) for spec in detector.squeezers]
    if any(f is None for f in functions):
        return None
    plain = ops.softmax(detector.classifier(inputs))
    distances = [ops.sum(ops.abs(plain - ops.softmax(detector.classifier(_straight_through(inputs, f(inputs))))), axis=-1)
                 for f in functions]
    return ops.max(ops.stack(distances, axis=-1), axis=-1)


def _mahalanobis(detector: MahalanobisDetector, inputs: Any) -> Any:
    a, total = detector.arrays, 0.0
    for index, features in enumerate(_outputs(detector.extractor, inputs)):
        if len(features.shape) > 2:
            features = ops.mean(features, axis=tuple(range(1, len(features.shape) - 1)))
        centred = features[:, None, :] - _constant(a[f"means_{index}"])[None]
        distance = ops.maximum(ops.min(ops.sum(ops.matmul(centred, _constant(a[f"precision_{index}"])) * centred, axis=-1), axis=1), 0.0)
        standardised = (ops.log(distance + 1e-12) - float(a["score_mean"][index])) / float(a["score_scale"][index])
        total = total + float(a["coef"][0, index]) * standardised
    return total + float(a["intercept"][0])


def _safetynet(detector: SafetyNetDetector, inputs: Any) -> Any:
    a = detector.arrays
    activations = ops.concatenate([ops.reshape(f, (-1, int(np.prod(f.shape[1:])))) for f in _outputs(detector.extractor, inputs)], axis=1)
    thresholds = np.asarray(a["thresholds"], np.float64)
    finite = np.where(np.isfinite(thresholds), thresholds, 0.0)
    temperature = _constant(np.maximum(finite.max(axis=0), 1e-3) / 4.0)  # a quarter of each unit's top level
    hard = soft = 0.0
    for level in np.minimum(thresholds, 1e30).astype(np.float32):  # never-on units: a level no activation reaches
        hard = hard + ops.cast(activations > _constant(level), "float32")
        soft = soft + ops.sigmoid((activations - _constant(level)) / temperature)
    codes = soft + ops.stop_gradient(hard - soft)
    support = np.asarray(a["support_vectors"], np.float32)
    distances = (ops.sum(ops.square(codes), axis=1, keepdims=True) + _constant((support ** 2).sum(axis=1))[None]
                 - 2.0 * ops.matmul(codes, _constant(support.T)))
    kernel = ops.exp(-float(a["gamma"]) * ops.maximum(distances, 0.0))
    return ops.matmul(kernel, _constant(a["dual_coef"][0])) + float(a["intercept"][0])


def _ensemble(detector: EnsembleDetector, inputs: Any, members: list[StandIn]) -> Any:
    a = detector.arrays
    scores = ops.stack([ops.reshape(m.model(inputs), (-1,)) for m in members], axis=-1)
    standardised = (scores - _constant(a["score_mean"])) / _constant(a["score_scale"])
    return ops.matmul(standardised, _constant(a["coef"][0])) + float(a["intercept"][0])


def _surrogate(detector: Detector, x_fit: np.ndarray, *, epochs: int, seed: int) -> keras.Model:
    """A high-pass CNN regressing the detector's scores (standardised around the threshold) on
    `x_fit`; its output is mapped back to the detector's units."""
    scores = np.asarray(detector.score(x_fit), np.float64)
    finite = np.isfinite(scores)
    spread = float(scores[finite].std()) if finite.sum() > 1 else 1.0
    spread = spread if spread > 0 else 1.0
    targets = np.clip(np.nan_to_num((scores - detector.threshold) / spread, nan=10.0), -10.0, 10.0)
    keras.utils.set_random_seed(seed)
    network = build_input_cnn(tuple(x_fit.shape[1:]))
    network.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    network.fit(x_fit, targets.astype(np.float32), epochs=epochs, batch_size=128, shuffle=True, verbose=0)
    inputs = keras.Input(tuple(x_fit.shape[1:]))
    outputs = network(inputs)[:, 0] * spread + detector.threshold
    return keras.Model(inputs, outputs, name=f"{detector.kind}_surrogate")


def stand_in(detector: Detector, x_fit: np.ndarray, *, surrogate_epochs: int = 10, seed: int = 0) -> StandIn:
    """The most faithful differentiable stand-in for `detector` (see the module table). `x_fit`
    (clean and adversarial images) trains a surrogate when one is needed."""
    inputs = keras.Input(tuple(x_fit.shape[1:]), name="images")
    scoring = detector.scoring_model(None) if callable(getattr(detector, "scoring_model", None)) else None
    if scoring is not None:
        outputs = scoring(inputs)
        score = outputs["score"] if isinstance(outputs, dict) else outputs
        return StandIn(keras.Model(inputs, score, name=f"{detector.kind}_score"), "white-box")
    score, method = None, "white-box"
    if isinstance(detector, MahalanobisDetector):
        score, method = _mahalanobis(detector, inputs), "bpda" if detector.noise > 0 else "white-box"
    elif isinstance(detector, SafetyNetDetector):
        score, method = _safetynet(detector, inputs), "bpda"
    elif isinstance(detector, SqueezeDetector):
        score, method = _squeeze(detector, inputs), "bpda"
    elif isinstance(detector, EnsembleDetector):
        members = [stand_in(m, x_fit, surrogate_epochs=surrogate_epochs, seed=seed) for m in detector.members]
        score, method = _ensemble(detector, inputs, members), f"ensemble({', '.join(m.method for m in members)})"
    elif isinstance(detector, JointDetector):
        member = stand_in(detector.member, x_fit, surrogate_epochs=surrogate_epochs, seed=seed)
        score, method = detector.combine(member.model(inputs), detector.classifier(inputs)), f"joint({member.method})"
    if score is None:
        return StandIn(_surrogate(detector, x_fit, epochs=surrogate_epochs, seed=seed), "surrogate")
    return StandIn(keras.Model(inputs, score, name=f"{detector.kind}_stand_in"), method)
