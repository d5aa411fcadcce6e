"""Reference classifiers: build and train a small CNN (logits out) for any loaded dataset.

Loading and saving existing models lives in `attacks.models`, beside the logits contract.
"""
from __future__ import annotations

import keras
import numpy as np


def build_reference_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """A small CNN that outputs logits: two conv blocks (each pooling only while the image is large
    enough, so 8x8 digits work too), then a dense layer with dropout. About 99% on MNIST in a few
    epochs, and cheap enough to train and attack on two CPU cores."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        if min(x.shape[1], x.shape[2]) >= 8:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="reference_cnn")


def train_classifier(
    x_train: np.ndarray,
    y_train: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    validation_split: float = 0.1,
    seed: int = 0,
    verbose: int | str = 2,
) -> keras.Model:
    """Train the reference CNN with `model.fit`, keeping the weights of the best validation epoch."""
    keras.utils.set_random_seed(seed)
    model = build_reference_cnn(x_train.shape[1:], num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        validation_split=validation_split,
        callbacks=[keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)],
        verbose=verbose,
    )
    return model


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))
