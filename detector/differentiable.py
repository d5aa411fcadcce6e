"""Differentiable stand-ins for detector scores, so an adaptive attack can aim at every family.

Every family's scoring graph (`Detector.score_graph`, written beside its NumPy score) is the first
choice; its gradient rule (`Detector.gradient`) names the method:

| family | stand-in (`method`) |
|---|---|
| `input`, `activations`, `mahalanobis`, `margin`, `odds` (its fixed noise) | the score itself (`white-box`) |
| `squeeze` (bit depth, median) | exact forward pass, squeezers differentiated as the identity (`bpda`, Athalye et al. 2018) |
| `safetynet` | exact forward pass; the code quantiser differentiated as a sum of sigmoids (`bpda`) |
| `ensemble`, `joint` | the stacker's or rule's map over the members' graphs or stand-ins |
| `mahalanobis` with `noise` > 0 | its graph without the noise step (`bpda`) |
| anything else (colour `squeeze` with non-local means) | a small CNN trained to mimic the scores (`surrogate`) |

Every stand-in is a Keras model from images to one score per image in the detector's own units, so
the detector's threshold applies unchanged. Adaptive results are always judged by the real detector.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from detector.base import Detector
from detector.ensemble import EnsembleDetector
from detector.input_detector import build_input_cnn
from detector.joint import JointDetector
from detector.mahalanobis import MahalanobisDetector


@dataclasses.dataclass(frozen=True)
class StandIn:
    """A Keras model from images to the detector's score, and how it was obtained."""

    model: keras.Model
    method: str


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
    scoring = detector.scoring_model(None)
    if scoring is not None:
        return StandIn(keras.Model(inputs, scoring(inputs)["score"], name=f"{detector.kind}_score"), detector.gradient())
    score, method = None, "bpda"
    if isinstance(detector, MahalanobisDetector):  # the noise step skipped
        score = detector.distance_graph(inputs)
    elif isinstance(detector, EnsembleDetector):
        members = [stand_in(m, x_fit, surrogate_epochs=surrogate_epochs, seed=seed) for m in detector.members]
        score = detector.stack(ops.stack([ops.reshape(m.model(inputs), (-1,)) for m in members], axis=-1))
        method = f"ensemble({', '.join(m.method for m in members)})"
    elif isinstance(detector, JointDetector):
        member = stand_in(detector.member, x_fit, surrogate_epochs=surrogate_epochs, seed=seed)
        score, method = detector.combine(member.model(inputs), detector.classifier(inputs)), f"joint({member.method})"
    if score is None:
        return StandIn(_surrogate(detector, x_fit, epochs=surrogate_epochs, seed=seed), "surrogate")
    return StandIn(keras.Model(inputs, score, name=f"{detector.kind}_stand_in"), method)
