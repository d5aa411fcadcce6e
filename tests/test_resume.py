"""`training.resume.EpochCheckpoint`: a fit cut off after some epochs continues where it stopped."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from training.resume import STATE, EpochCheckpoint

EPOCHS, BATCH, N = 5, 16, 64  # 4 optimizer steps an epoch


class Interrupted(Exception):
    pass


class Epochs(keras.callbacks.Callback):
    """Records the epochs run, and what the model held when fit began; resumable (`state`)."""

    def __init__(self, interrupt_at: int | None = None, stop_after: int | None = None) -> None:
        super().__init__()
        self.interrupt_at, self.stop_after = interrupt_at, stop_after
        self.seen: list[int] = []
        self.began: tuple[list[np.ndarray], int] | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.began is None:  # after every on_train_begin: what the first epoch starts from
            self.began = (self.model.get_weights(), int(self.model.optimizer.iterations.numpy()))
        if epoch == self.interrupt_at:
            raise Interrupted
        self.seen.append(epoch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == self.stop_after:
            self.model.stop_training = True

    def state(self, directory: Path) -> dict[str, Any]:
        return {"seen": self.seen}

    def restore(self, state: dict[str, Any], directory: Path) -> None:
        self.seen = list(state["seen"])


def model(seed: int, **optimizer: Any) -> keras.Model:
    keras.utils.set_random_seed(seed)
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    net.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(0.01, EPOCHS * N // BATCH), **optimizer),
                "sparse_categorical_crossentropy")
    return net


def fit(net: keras.Model, directory: Path, epochs: Epochs, lines: list[str]) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)).astype("float32"), rng.integers(0, 3, N)
    net.fit(x, y, epochs=EPOCHS, batch_size=BATCH, verbose=0, callbacks=[epochs, EpochCheckpoint(directory, [epochs], log=lines.append)])


def test_an_interrupted_fit_continues_from_its_last_finished_epoch(tmp_path):
    """The resumed fit starts from the saved weights and optimizer step (the schedule goes on), runs
    only the epochs left, and the resumable callback's state comes back with it."""
    first, lines = model(0), []
    with pytest.raises(Interrupted):
        fit(first, tmp_path, Epochs(interrupt_at=2), lines)
    saved = first.get_weights()
    assert int(first.optimizer.iterations.numpy()) == 2 * N // BATCH
    assert [p.name for p in tmp_path.glob("*.weights.h5")] == ["epoch-2.weights.h5"]  # older epochs removed

    second, epochs = model(1), Epochs()
    fit(second, tmp_path, epochs, lines)
    weights, step = epochs.began
    for got, want in zip(weights, saved, strict=True):
        np.testing.assert_array_equal(got, want)
    assert step == 2 * N // BATCH and int(second.optimizer.iterations.numpy()) == EPOCHS * N // BATCH
    assert epochs.seen == [0, 1, 2, 3, 4]  # 0 and 1 restored, 2-4 run
    assert lines == [f"resumed from {tmp_path} after epoch 2 (continuing)"]


def test_a_stopped_fit_resumes_with_no_epochs_left(tmp_path):
    """Early stopping had ended training: the same fit again trains no further."""
    first, lines = model(0), []
    fit(first, tmp_path, Epochs(stop_after=2), lines)
    second, epochs = model(1), Epochs()
    fit(second, tmp_path, epochs, lines)
    assert epochs.began is None and epochs.seen == [0, 1]
    for got, want in zip(second.get_weights(), first.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert lines == [f"resumed from {tmp_path} after epoch 2 (training had stopped: no epochs left)"]


def test_an_unreadable_state_starts_training_over(tmp_path):
    first, lines = model(0), []
    with pytest.raises(Interrupted):
        fit(first, tmp_path, Epochs(interrupt_at=3), lines)
    (tmp_path / STATE).write_text("{not json")
    epochs = Epochs()
    fit(model(1), tmp_path, epochs, lines)
    assert epochs.seen == [0, 1, 2, 3, 4] and epochs.began[1] == 0
    assert lines == [f"{tmp_path / STATE} cannot be read or belongs to other callbacks: training starts from the first epoch"]


def test_the_optimizers_moving_average_comes_back_too(tmp_path):
    """`harden --ema` keeps the weights' average in the optimizer: a resumed fit goes on from it."""
    def averages(net: keras.Model) -> list[np.ndarray]:
        return [keras.ops.convert_to_numpy(v) for v in net.optimizer._model_variables_moving_average]

    class Averages(Epochs):  # the same callbacks in both fits, or the saved state is not theirs
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if self.began is None and self.model.optimizer.built:
                self.average = averages(self.model)
            super().on_epoch_begin(epoch, logs)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.ended = (averages(self.model), self.model.get_weights())

    first = Averages(interrupt_at=2)
    with pytest.raises(Interrupted):
        fit(model(0, use_ema=True, ema_momentum=0.5), tmp_path, first, [])
    saved, weights = first.ended  # after the second epoch, the last one saved
    assert not np.allclose(saved[0], weights[0])  # an average, not the weights
    resumed = Averages()
    fit(model(1, use_ema=True, ema_momentum=0.5), tmp_path, resumed, [])
    for got, want in zip(resumed.average, saved, strict=True):
        np.testing.assert_array_equal(got, want)
