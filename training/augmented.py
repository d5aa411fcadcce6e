"""Training with data augmentation and a one-cycle learning rate: the recipe for the reference ResNet
(`training.resnet`), usable with any classifier.

Augmentation runs in Keras preprocessing layers (random shifts with zero fill, as padding and a
random crop; horizontal flips for colour images) inside a training-only wrapper around the
classifier: the layers act only in training (at inference they pass images through unchanged), the
wrapper is never saved, and the classifier returned is the plain model, uncompiled. Nothing here
needs TensorFlow: the layers run under JAX too.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np

from foundation.validation import check_images, check_labels, check_model_input

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_FRACTION = 0.25  # of all steps: the learning rate climbs linearly, then decays on a cosine


def default_shift(input_shape: tuple[int, ...]) -> int:
    """Largest shift in pixels: 1/8 of the smaller side (4 px for 32x32 CIFAR, 1 px for 8x8 digits)."""
    return max(1, round(min(input_shape[0], input_shape[1]) / 8))


def augmentation(input_shape: tuple[int, ...], *, shift: int | None = None, flip: bool | None = None, seed: int = 0) -> keras.Sequential:
    """Random integer shifts of up to `shift` px (zero fill: the same images as zero padding by
    `shift` and a random crop) and, for colour images by default, random horizontal flips
    (digits and letters are not mirror images of themselves; photos mostly are)."""
    height, width, channels = input_shape
    shift = default_shift(input_shape) if shift is None else shift
    flip = channels == 3 if flip is None else flip
    if not 0 <= shift < min(height, width):
        raise ValueError(f"shift must be in [0, {min(height, width)}) px for {height}x{width} images, got {shift}")
    layers: list[keras.layers.Layer] = [keras.Input(input_shape)]
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, name="flip"))
    if shift:
        layers.append(keras.layers.RandomTranslation(
            shift / height, shift / width, fill_mode="constant", fill_value=0.0, interpolation="nearest",
            seed=seed + 1, name="shift"))
    return keras.Sequential(layers, name="augmentation")


def training_wrapper(model: keras.Model, augment: keras.Sequential | None) -> keras.Model:
    """The model that `fit` trains: `augment`, then `model`, whose weights it shares. Compiling and
    fitting it leaves `model` itself uncompiled, so the saved file carries no optimizer state."""
    inputs = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(inputs, model(inputs if augment is None else augment(inputs)), name=f"{model.name}_training")


def one_cycle(peak: float, total_steps: int, warmup_fraction: float = WARMUP_FRACTION) -> keras.optimizers.schedules.CosineDecay:
    """Linear warm-up from peak/10 to `peak` over the first `warmup_fraction` of the steps, then a
    cosine decay to zero (a one-cycle schedule, Smith 2018, in a built-in Keras schedule)."""
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {peak}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup = round(warmup_fraction * total_steps)
    return keras.optimizers.schedules.CosineDecay(
        peak / 10, decay_steps=max(1, total_steps - warmup), alpha=0.0, warmup_target=peak, warmup_steps=warmup)


def train_augmented(
    model: keras.Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    learning_rate: float = 0.2,
    augment: bool = True,
    seed: int = 0,
    verbose: int | str = 2,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> keras.Model:
    """Train `model` for exactly `epochs` epochs: SGD with Nesterov momentum and weight decay on a
    one-cycle schedule peaking at `learning_rate`, on batches augmented when `augment` (no
    validation split or early stopping: the schedule sets the length). Returns the model, uncompiled."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    x_train = check_images(x_train, (0.0, 1.0))
    check_labels(y_train, len(x_train), check_model_input(model, x_train))
    keras.utils.set_random_seed(seed)
    trainer = training_wrapper(model, augmentation(model.input_shape[1:], seed=seed) if augment else None)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    optimizer = keras.optimizers.SGD(one_cycle(learning_rate, steps), momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    trainer.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    trainer.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=verbose, callbacks=list(callbacks))
    return model
