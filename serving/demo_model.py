"""The demo's default classifier: the ImageNet MobileNet v1 in Keras's weight cache, taking [0, 1]
RGB images, and its class names. Nothing is downloaded: the files must be in the cache already."""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import keras

from foundation.models import logits_model, save_model

IMAGENET_WEIGHTS = "mobilenet_7_5_224_tf.h5"
IMAGENET_INDEX = "imagenet_class_index.json"


def keras_models_dir() -> Path:
    """Where Keras caches application weights: `$KERAS_HOME/models`, else `~/.keras/models`
    (read at call time, so that a KERAS_HOME set after importing keras still counts)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser() / "models"


def imagenet_class_names(path: str | os.PathLike) -> list[str]:
    """The 1000 ImageNet class names from Keras's imagenet_class_index.json, spaces for
    underscores; a name that occurs twice ("crane", "maillot") gets its index appended."""
    index = json.loads(Path(path).read_text())
    names = [index[str(i)][1].replace("_", " ") for i in range(len(index))]
    counts = collections.Counter(names)
    return [f"{name} ({i})" if counts[name] > 1 else name for i, name in enumerate(names)]


def imagenet_mobilenet(models_dir: str | os.PathLike | None = None) -> tuple[keras.Model, list[str]]:
    """ImageNet MobileNet v1 (alpha 0.75, 224x224) taking [0, 1] RGB images (a Rescaling layer maps
    them to MobileNet's [-1, 1]) and returning logits, with its class names. Reads the weights and
    class index from the Keras cache (`keras_models_dir()`); never downloads."""
    folder = Path(models_dir) if models_dir is not None else keras_models_dir()
    missing = [name for name in (IMAGENET_WEIGHTS, IMAGENET_INDEX) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the default ImageNet MobileNet needs {IMAGENET_WEIGHTS} and {IMAGENET_INDEX} in {folder} "
            f"(missing: {', '.join(missing)}); copy both there (set KERAS_HOME to use another folder), "
            "or pass --model / --guard"
        )
    base = logits_model(keras.applications.MobileNet(alpha=0.75, weights=str(folder / IMAGENET_WEIGHTS)))
    inputs = keras.Input((224, 224, 3), name="image")
    logits = base(keras.layers.Rescaling(2.0, offset=-1.0, name="to_mobilenet_range")(inputs))
    return keras.Model(inputs, logits, name="mobilenet_imagenet"), imagenet_class_names(folder / IMAGENET_INDEX)


def save_default_model(path: str | os.PathLike) -> Path:
    """Write the default classifier (the wrapped MobileNet) as a .keras file, for `safetynet attack`."""
    return save_model(imagenet_mobilenet()[0], path)
