"""Shared plumbing for the detector families that look inside the classifier.

- layer choice: `available_layers`, `default_layers` (the last representation layers before the
  logits) and `feature_extractor`, which works for functional and Sequential Keras models alike;
- the training pair's check (`check_training_pair`) and array files (`save_arrays` / `load_arrays`,
  never pickled);
- loading: `require_classifier` (the classifier is never stored beside a detector: it is supplied
  again at load time and checked against the fingerprint in the manifest).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression

from foundation.models import logits_model
from foundation.storage import model_fingerprint, read_json
from foundation.validation import Interval, Satisfies, check_image_shape

_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.DepthwiseConv2D,
         keras.layers.SeparableConv2D)
_POOL = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
         keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
         keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
         keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D)
_ACTIVATION = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.Add)
REPRESENTATION_LAYERS = _CONV + _POOL + _ACTIVATION + (keras.layers.Dense,)


def prepare_classifier(classifier: keras.Model) -> keras.Model:
    """The classifier under the logits contract (a trailing softmax cut), with a known input shape."""
    if not isinstance(classifier, keras.Model):
        raise ValueError(f"the classifier must be a keras.Model, got {type(classifier).__name__}")
    try:
        classifier.inputs  # noqa: B018 - raises for an unbuilt Sequential model
        shape = classifier.input_shape
    except (AttributeError, ValueError):
        raise ValueError(
            f"classifier {classifier.name!r} has no defined input yet: build it "
            "(model.build(input_shape), or start it with keras.Input) before making a detector"
        ) from None
    if not isinstance(shape, tuple) or len(shape) < 2:
        raise ValueError(f"the classifier must take a single image input, got input shape {shape}")
    return logits_model(classifier)


def image_shape(classifier: keras.Model) -> tuple[int | None, ...]:
    return tuple(classifier.input_shape[1:])


def check_training_pair(x_clean: Any, x_adversarial: Any, expected: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
    x_clean, x_adversarial = check_image_shape(x_clean, expected), check_image_shape(x_adversarial, expected)
    if len(x_clean) < 2 or len(x_adversarial) < 2:
        raise ValueError(f"fitting needs at least 2 clean and 2 adversarial images, got {len(x_clean)} and {len(x_adversarial)}")
    return x_clean, x_adversarial


def available_layers(classifier: keras.Model) -> list[str]:
    """Names of the layers whose outputs a detector may read (everything but the input)."""
    return [layer.name for layer in classifier.layers if not isinstance(layer, keras.layers.InputLayer)]


def _output_layers(classifier: keras.Model) -> set[str]:
    outputs = {id(t) for t in keras.tree.flatten(classifier.outputs)}
    return {layer.name for layer in classifier.layers if _safe_output_id(layer) in outputs}


def _safe_output_id(layer: keras.layers.Layer) -> int | None:
    try:
        return id(layer.output)
    except (AttributeError, ValueError):
        return None


def default_layers(classifier: keras.Model, count: int, accept: Callable[[keras.layers.Layer], bool] | None = None) -> list[str]:
    """The last `count` representation layers (conv, pooling, dense, activation, residual add) before
    the logits, optionally filtered by `accept`."""
    final = _output_layers(classifier) | {classifier.layers[-1].name}
    names = [
        layer.name for layer in classifier.layers
        if isinstance(layer, REPRESENTATION_LAYERS) and layer.name not in final and (accept is None or accept(layer))
    ]
    if not names:
        raise ValueError(f"classifier {classifier.name!r} has no suitable hidden layer; name some of {available_layers(classifier)}")
    return names[-count:]


def is_relu_layer(layer: keras.layers.Layer) -> bool:
    """True for layers whose output is a ReLU: `ReLU` layers and layers with activation='relu'."""
    if isinstance(layer, keras.layers.ReLU):
        return True
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.relu or getattr(activation, "__name__", "") == "relu"


def _layer_names(layers: Any) -> list[str]:
    if isinstance(layers, str) or not layers or not all(isinstance(n, str) for n in layers) or len(set(layers)) != len(layers):
        raise ValueError(layers)
    return list(layers)


# the `layers` parameter of the families that read the classifier's activations
LAYERS = Satisfies("a non-empty list of distinct layer names", _layer_names)
# the parameters those families share: which layers (None: the last `auto_layers` eligible ones)
LAYER_CONSTRAINTS = {"layers": [None, LAYERS], "auto_layers": [Interval(int, 1)]}


def resolve_layers(classifier: keras.Model, layers: list[str] | None, count: int,
                   accept: Callable[[keras.layers.Layer], bool] | None = None) -> list[str]:
    """`layers` (checked by `LAYERS`) found in the classifier, or the automatic choice when None."""
    if layers is None:
        return default_layers(classifier, count, accept)
    available = available_layers(classifier)
    unknown = [n for n in layers if n not in available]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} in classifier {classifier.name!r}; available layers: {available}")
    return layers


def feature_extractor(classifier: keras.Model, names: Sequence[str]) -> keras.Model:
    """A model from the classifier's input to the outputs of the named layers (shares its weights)."""
    if isinstance(classifier, keras.Sequential):
        # rebuild the chain on a fresh input: works however the Sequential model was built
        inputs = keras.Input(classifier.input_shape[1:])
        x, outputs = inputs, {}
        for layer in classifier.layers:
            x = layer(x)
            outputs[layer.name] = x
        return keras.Model(inputs, [outputs[n] for n in names], name=f"{classifier.name}_features")
    try:
        outputs = [classifier.get_layer(n).output for n in names]
    except (AttributeError, ValueError) as error:
        raise ValueError(f"cannot read the outputs of layers {list(names)} of {classifier.name!r}: {error}") from None
    inputs = classifier.inputs[0] if len(classifier.inputs) == 1 else classifier.inputs
    return keras.Model(inputs, outputs, name=f"{classifier.name}_features")


def predict(model: keras.Model, x: Any, batch_size: int = 256) -> list[np.ndarray]:
    """The model's outputs on `x` in batches, always as a list (one array per output).

    `predict_on_batch` reuses one compiled function; `model.predict` sets up a data pipeline on every
    call, which costs about 0.15 s each time, i.e. most of the time on small inputs."""
    if len(x) == 0:
        raise ValueError("no images given (empty batch)")
    parts = []
    for start in range(0, len(x), batch_size):
        out = model.predict_on_batch(x[start:start + batch_size])
        parts.append([np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else [np.asarray(out)])
    return [np.concatenate(column) for column in zip(*parts)]


def extract(extractor: keras.Model, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """The extractor's outputs on `x`, always as a list (one array per layer)."""
    return predict(extractor, x, batch_size)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def fit_linear_rule(features: Callable[[np.ndarray], np.ndarray], x_clean: np.ndarray, x_adversarial: np.ndarray, *,
                    C: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A balanced logistic regression, clean (0) vs adversarial (1), on standardised `features` of
    the images: (mean, scale, coef, intercept). `what` names the source of the features in errors."""
    if len(x_clean) < 2 or len(x_adversarial) < 2:
        raise ValueError(f"fitting needs at least 2 clean and 2 adversarial images, got {len(x_clean)} and {len(x_adversarial)}")
    values = np.concatenate([features(x_clean), features(x_adversarial)])
    if not np.isfinite(values).all():
        raise ValueError(f"{what} returned NaN or infinite scores on the training images")
    mean, scale = values.mean(axis=0), np.maximum(values.std(axis=0), 1e-12)
    labels = np.r_[np.zeros(len(x_clean)), np.ones(len(x_adversarial))]
    regression = LogisticRegression(C=C, class_weight="balanced", max_iter=1000, random_state=seed)
    regression.fit((values - mean) / scale, labels)
    return mean, scale, regression.coef_.astype(np.float64), regression.intercept_.astype(np.float64)


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Plain numeric arrays in an .npz (no object arrays, so loading never needs pickle)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for name, value in arrays.items():
        if value.dtype == object:
            raise ValueError(f"array {name!r} is an object array; detectors store numeric arrays only")
    np.savez(path, **arrays)


def load_arrays(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"detector model file missing: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [n for n in names if n not in data.files]
            if missing:
                raise ValueError(f"arrays {missing} missing")
            return {n: data[n] for n in names}
    except (OSError, ValueError) as error:
        raise ValueError(f"detector model file {path} is corrupt: {error}") from None


def require_classifier(directory: Path, classifier: keras.Model | None, kind: str) -> keras.Model:
    """The classifier given at load time, checked against the one the detector was trained for."""
    if classifier is None:
        raise ValueError(f"the {kind} detector needs the classifier it was trained for: pass classifier=...")
    classifier = prepare_classifier(classifier)
    manifest_path = Path(directory) / "manifest.json"
    expected = read_json(manifest_path, "detector manifest").get("classifier_fingerprint") if manifest_path.is_file() else None
    if expected is not None and expected != model_fingerprint(classifier):
        raise ValueError(f"the {kind} detector in {directory} was trained for a different classifier (fingerprint mismatch)")
    return classifier
