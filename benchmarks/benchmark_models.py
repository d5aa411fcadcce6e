"""The fixed models the benchmarks share."""
from __future__ import annotations

import keras


def cifar_cnn() -> keras.Model:
    """The benchmark model: four 3x3 convolutions on 32x32x3, two poolings, two dense layers (logits)."""
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="cifar_cnn")
