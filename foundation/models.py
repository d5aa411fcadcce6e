"""The model contract: attacks, detectors and guards all work on a classifier's logits.

A softmax squashes gradients towards zero once the model is confident, so every model that enters
safetynet goes through `logits_model`, which cuts a trailing softmax once: a final `Softmax` or
`Activation("softmax")` layer is dropped; a last layer with `activation="softmax"` is rebuilt with a
linear activation and the same weights. Models are loaded with Keras's `safe_mode` (no arbitrary
code) and saved as `.keras` files atomically.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import keras

from foundation.storage import atomic_write


def _is_softmax(activation: object) -> bool:
    return activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"


def logits_model(model: keras.Model) -> keras.Model:
    """Return `model` with a trailing softmax removed (the same model when it has none)."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax) or (
        isinstance(last, keras.layers.Activation) and _is_softmax(last.activation)
    ):
        return keras.Model(model.inputs, last.input, name=f"{model.name}_logits")
    if _is_softmax(getattr(last, "activation", None)):
        config = last.get_config() | {"activation": "linear", "name": f"{last.name}_logits"}
        linear = last.__class__.from_config(config)
        outputs = linear(last.input)
        linear.set_weights(last.get_weights())
        return keras.Model(model.inputs, outputs, name=f"{model.name}_logits")
    return model


def bfloat16_copy(model: keras.Model) -> keras.Model:
    """`model` computing in bfloat16 (Keras's "mixed_bfloat16" policy: float32 weights, bfloat16
    math), with the same weights: on GPUs and TPUs with bfloat16 units, attacks on it run faster,
    while the engine keeps the perturbation and its projection in float32. Check the attack's
    success against the float32 model before relying on it (benchmarks/attacks.py --bf16 does)."""

    def to_bfloat16(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config() | {"dtype": "mixed_bfloat16"})

    copy = keras.models.clone_model(model, clone_function=to_bfloat16)
    copy.set_weights(model.get_weights())
    return copy


def load_model(path: str | os.PathLike) -> keras.Model:
    """Load a `.keras` or `.h5` model safely (no arbitrary code) and return its logits model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier model not found: {path}")
    if path.suffix not in (".keras", ".h5"):
        raise ValueError(f"classifier must be a .keras or .h5 file, got {path.name}")
    if not _has_model_signature(path):
        kind = "zip archive" if path.suffix == ".keras" else "HDF5 file"
        raise ValueError(f"{path} is not a Keras model: a {path.suffix} model is a {kind}, and this file is not one")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load classifier {path}: {error}") from None
    return logits_model(model)


def _has_model_signature(path: Path) -> bool:
    """Whether the file starts as its suffix says (.keras: a zip archive, .h5: HDF5), so that another
    file gets an error naming the problem rather than Keras's "File not found" or h5py's signature error."""
    if path.suffix == ".keras":
        return zipfile.is_zipfile(path)
    with path.open("rb") as stream:  # HDF5's signature sits at byte 0 (or 512, 1024, ... after a user block)
        head = stream.read(1 << 16)
    return any(head[offset:offset + 8] == b"\x89HDF\r\n\x1a\n" for offset in (0, 512, 1024, 2048, 4096, 8192, 16384, 32768))


def save_model(model: keras.Model, path: str | os.PathLike) -> Path:
    """Save as a `.keras` file, atomically."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"classifiers are saved as .keras files, got {path.name}")
    return atomic_write(path, lambda temp: model.save(temp))
