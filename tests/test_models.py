"""The logits contract, safe loading and atomic saving of classifiers."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from foundation.models import load_model, logits_model, save_model
from foundation.storage import model_fingerprint


def _softmax_models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    dense_softmax = keras.Sequential(
        [keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")]
    )
    inputs = keras.Input((4, 4, 1))
    logits = keras.layers.Dense(5)(keras.layers.Flatten()(inputs))
    activation = keras.Model(inputs, keras.layers.Activation("softmax")(logits))
    softmax_layer = keras.Model(inputs, keras.layers.Softmax()(logits))
    return {"dense": dense_softmax, "activation": activation, "softmax_layer": softmax_layer}


@pytest.mark.parametrize("kind", ["dense", "activation", "softmax_layer"])
def test_a_trailing_softmax_is_cut_and_the_logits_reproduce_the_probabilities(kind):
    model = _softmax_models()[kind]
    x = np.random.default_rng(0).uniform(0, 1, (8, 4, 4, 1)).astype("float32")
    logits = logits_model(model).predict(x, verbose=0)
    probabilities = model.predict(x, verbose=0)
    assert not np.allclose(logits.sum(axis=1), 1.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.softmax(logits)), probabilities, atol=1e-6)


def test_a_logits_model_is_returned_unchanged():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    assert logits_model(model) is model


def test_save_and_load_round_trip_keeps_weights_and_cuts_softmax(tmp_path):
    model = _softmax_models()["dense"]
    path = save_model(model, tmp_path / "m.keras")
    loaded = load_model(path)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert loaded.layers[-1].get_config()["activation"] == "linear"
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]


def test_loading_is_safe_and_bad_files_get_clear_errors(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="cannot load classifier"):
        load_model(tmp_path / "lambda.keras")  # safe_mode refuses to deserialize the lambda's code
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.keras")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.keras or \.h5"):
        load_model(tmp_path / "model.pt")
    (tmp_path / "corrupt.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"corrupt\.keras is not a Keras model: a \.keras model is a zip archive"):
        load_model(tmp_path / "corrupt.keras")
    (tmp_path / "random.h5").write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(ValueError, match=r"random\.h5 is not a Keras model: a \.h5 model is a HDF5 file"):
        load_model(tmp_path / "random.h5")
    model.save(tmp_path / "lambda.h5")  # a real HDF5 model passes the signature check and reaches Keras
    with pytest.raises(ValueError, match="cannot load classifier"):
        load_model(tmp_path / "lambda.h5")
    with pytest.raises(ValueError, match=r"\.keras files"):
        save_model(model, tmp_path / "model.h5")


def test_fingerprint_changes_with_any_weight():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = model_fingerprint(model)
    kernel, bias = model.layers[0].get_weights()
    bias[0] += 1e-3
    model.layers[0].set_weights([kernel, bias])
    assert model_fingerprint(model) != before


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """mkstemp creates 0600 files; written results must be readable like any other file."""
    import os

    from foundation.storage import atomic_write_json

    path = atomic_write_json(tmp_path / "report.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_directories_get_ordinary_permissions(tmp_path):
    """mkdtemp creates 0700 folders; a detector, guard or export must be readable by a server under another user."""
    import os

    from foundation.storage import atomic_directory

    with atomic_directory(tmp_path / "detector") as temp:
        (temp / "manifest.json").write_text("{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "detector").stat().st_mode & 0o777 == 0o777 & ~mask
