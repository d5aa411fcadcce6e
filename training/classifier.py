"""Reference classifiers: build and train a small CNN (logits out) for any loaded dataset, in the
standard way, adversarially (`training.adversarial`), or mixed with stored adversarial datasets.

Loading and saving existing models lives in `foundation.models`, beside the logits contract.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Callable

import keras
import numpy as np

from attacks import GradientSignAttack
from foundation.backend import Devices, replica_count, training_devices
from foundation.validation import check_images, check_labels, check_model_input
from training.adversarial import AdversarialTraining, mixed_batches
from training.augmented import augmentation, sgd
from training.collapse import CollapseCheck
from training.resume import EpochCheckpoint
from training.resnet import RESNET_WIDTH, build_resnet

# training images whose clean accuracy is checked after each adversarial epoch
COLLAPSE_CHECK_IMAGES = 1000


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


ARCHITECTURES = ("reference", "resnet")


def build_classifier(architecture: str, input_shape: tuple[int, ...], num_classes: int, *, width: int = RESNET_WIDTH,
                     seed: int | None = None) -> keras.Model:
    """The reference CNN or the ResNet (`training.resnet`, `width` channels in its first layer) by name;
    with `seed`, Keras' global generators are seeded first (as training does), so the initial weights follow it."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if architecture == "reference":
        return build_reference_cnn(input_shape, num_classes)
    if architecture == "resnet":
        return build_resnet(input_shape, num_classes, width=width)
    raise ValueError(f"unknown architecture {architecture!r}: expected one of {', '.join(ARCHITECTURES)}")


LearningRate = float | keras.optimizers.schedules.LearningRateSchedule


OPTIMIZERS = ("adam", "sgd")


def compile_classifier(model: keras.Model, learning_rate: LearningRate = 1e-3, optimizer: str = "adam",
                       ema: float | None = None) -> keras.Model:
    """Adam (or "sgd": `training.augmented.sgd`, the ResNet recipe's) on sparse cross-entropy from
    logits, reporting accuracy: every classifier trains so. `ema`: the optimizer also keeps an
    exponential moving average of the weights with this momentum per step (Keras's `use_ema`)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    check_momentum(ema)
    average = {} if ema is None else {"use_ema": True, "ema_momentum": ema}
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, **average) if optimizer == "adam" else sgd(learning_rate, **average),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _checked_model(model: keras.Model | None, x: np.ndarray, y: np.ndarray, num_classes: int, clip: tuple[float, float]) -> keras.Model:
    """The model to train (the reference CNN when None) after checking images, labels and its input."""
    x = check_images(x, clip)
    model = build_reference_cnn(x.shape[1:], num_classes) if model is None else model
    if not model.trainable_weights:
        raise ValueError(f"model {model.name!r} has no trainable weights: nothing to train")
    check_labels(y, len(x), check_model_input(model, x))
    return model


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
    model = compile_classifier(build_reference_cnn(x_train.shape[1:], num_classes), learning_rate)
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


def train_adversarial(
    x_train: np.ndarray,
    y_train: np.ndarray,
    num_classes: int,
    attack: GradientSignAttack,
    *,
    model: keras.Model | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    learning_rate: LearningRate = 1e-3,
    mix: float = 1.0,
    warmup_epochs: float = 0.0,
    trades_beta: float | None = None,
    augment: bool = False,
    optimizer: str = "adam",
    seed: int = 0,
    verbose: int | str = 2,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    ema: float | None = None,
    devices: Devices = 1,
    checkpoint: str | os.PathLike | None = None,
    log: Callable[[str], Any] = print,
) -> keras.Model:
    """Adversarial training (`training.adversarial.AdversarialTraining`) of `model` (default: a new
    reference CNN) with `model.fit`; eps ramps up over the first `warmup_epochs`. No validation
    split or early stopping: clean validation loss says nothing about robustness. Training that
    collapses (clean accuracy near chance, or far below a given model's, two epochs running) stops
    with `TrainingCollapsed`, which says what to change (`training.collapse`). `augment`: random
    shifts (and flips for colour images) before each batch's attack (`training.augmented.augmentation`);
    `optimizer`: "adam" or "sgd" (`compile_classifier`). `ema`: a momentum per step (0.99, 0.999):
    `model` gets the exponential moving average of the trained weights after each epoch (the trained
    copy goes on with its own), which smooths robust overfitting (Gowal et al. 2020, Rebuffi et al.
    2021); `callbacks` and the caller see only the average.

    `devices` (a count, "all" or device names) > 1 trains data-parallel (`foundation.backend.
    training_devices`): a copy of the model built inside that context is trained, and its weights are
    copied back into `model` after each epoch, before `callbacks` run, so they and the caller only
    ever see the plain single-device model. `batch_size` must then be a multiple of the device count,
    and the last (fewer than that count) images that would leave the last batch uneven are left out.

    `checkpoint`: a folder where the training state is kept after every epoch (`training.resume`):
    the same call after an interruption continues from the last finished epoch (messages go to `log`)."""
    if not (math.isfinite(warmup_epochs) and warmup_epochs >= 0):
        raise ValueError(f"warmup_epochs must be a finite number >= 0, got {warmup_epochs}")
    check_momentum(ema)
    keras.utils.set_random_seed(seed)
    given = model is not None
    model = _checked_model(model, x_train, y_train, num_classes, attack.clip)
    rows = np.random.default_rng(seed).permutation(len(x_train))[:COLLAPSE_CHECK_IMAGES]
    check = CollapseCheck(model, x_train[rows], y_train[rows], num_classes,
                          start_accuracy=accuracy(model, x_train[rows], y_train[rows]) if given else None,
                          advice=_collapse_advice(attack, warmup_epochs, learning_rate, batch_size))
    with training_devices(devices) as distributed:
        replicas = replica_count(distributed)
        if batch_size % replicas:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the {replicas} devices, which share each batch equally")
        usable = len(x_train) - len(x_train) % batch_size % replicas  # the last batch must split evenly too (JAX)
        x_train, y_train = x_train[:usable], y_train[:usable]
        warmup_steps = round(warmup_epochs * math.ceil(len(x_train) / batch_size))
        trained = model if distributed is None and ema is None else _copy_of(model)
        shifts = augmentation(x_train.shape[1:], seed=seed) if augment else None
        trainer = AdversarialTraining(trained, attack, mix=mix, warmup_steps=warmup_steps, trades_beta=trades_beta,
                                      augment=shifts, seed=seed)
        compile_classifier(trainer, learning_rate, optimizer, ema)
        back = [] if trained is model else [CopyWeights(trained, model, averaged=ema is not None)]
        every = [*back, *callbacks, check]
        if checkpoint is not None:
            every.append(EpochCheckpoint(checkpoint, every, log=log))
        trainer.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=verbose, callbacks=every)
    return model


def _copy_of(model: keras.Model) -> keras.Model:
    """The model rebuilt with its weights, in the current distribution context (its variables then
    live on every device of that context)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def check_momentum(ema: float | None) -> None:
    """An EMA momentum must lie in (0, 1), or be None (no average)."""
    if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 < ema < 1.0):
        raise ValueError(f"ema must be a momentum in (0, 1) such as 0.99 or 0.999, or None, got {ema!r}")


class CopyWeights(keras.callbacks.Callback):
    """Copies the weights of the model being trained into `target` after each epoch and at the end;
    with `averaged`, each trainable weight's moving average that the optimizer keeps (`use_ema`)
    in its place (the non-trainable ones, such as BatchNorm's statistics, as they are)."""

    def __init__(self, source: keras.Model, target: keras.Model, *, averaged: bool = False) -> None:
        super().__init__()
        self.source, self.target, self.averaged = source, target, averaged

    def weights(self) -> list[np.ndarray]:
        if not self.averaged:
            return self.source.get_weights()
        optimizer = self.model.optimizer  # its averages sit in the order of its variables (as in SwapEMAWeights)
        averages = optimizer._model_variables_moving_average
        average = {id(v): averages[optimizer._get_variable_index(v)] for v in self.source.trainable_variables}
        return [keras.ops.convert_to_numpy(average.get(id(v), v)) for v in self.source.weights]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.target.set_weights(self.weights())

    def on_train_end(self, logs: dict | None = None) -> None:
        self.target.set_weights(self.weights())


def _collapse_advice(attack: GradientSignAttack, warmup_epochs: float, learning_rate: LearningRate, batch_size: int) -> str:
    """What to change after a collapse, starting from what this run did."""
    learning_rate = float(getattr(learning_rate, "initial_learning_rate", learning_rate))  # a schedule: its peak
    steps = []
    if warmup_epochs < 5:
        steps.append(f"ramp eps up over more epochs (eps warm-up {warmup_epochs:g} -> 5: --eps-warmup 5)")
    steps.append(f"lower the learning rate ({learning_rate:g} -> {learning_rate / 3:.2g})")
    if batch_size > 128:
        steps.append(f"use smaller batches ({batch_size} -> 128)")
    steps.append(f"or a smaller eps than {attack.eps:g} first")
    return "; ".join(steps)


def train_on_adversarial_data(
    x_train: np.ndarray,
    y_train: np.ndarray,
    num_classes: int,
    directories: Sequence[str | os.PathLike],
    *,
    model: keras.Model | None = None,
    mix: float = 0.5,
    epochs: int = 10,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    verbose: int | str = 2,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> keras.Model:
    """Train on clean images mixed with stored adversarial datasets (true labels), streamed through
    tf.data: `mix` of each batch is adversarial; an epoch is as many batches as the clean data fills."""
    keras.utils.set_random_seed(seed)
    model = compile_classifier(_checked_model(model, x_train, y_train, num_classes, (0.0, 1.0)), learning_rate)
    batches = mixed_batches(x_train, y_train, directories, mix=mix, batch_size=batch_size, seed=seed)
    steps = math.ceil(len(x_train) / batch_size)
    model.fit(batches, epochs=epochs, steps_per_epoch=steps, shuffle=False, verbose=verbose, callbacks=list(callbacks))
    return model


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))
