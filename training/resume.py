"""Training that continues after an interruption instead of starting again.

`EpochCheckpoint` keeps, after every epoch, what `fit` needs to go on: the trained model's weights
with its optimizer's (Keras's own `.weights.h5`; the step count drives warm-up and the learning-rate
schedule), the number of finished epochs, and the state of the other callbacks that carry some
(early stopping's best epoch and its weights, the collapse check's history). `state.json` is written
last, atomically, and names the weights file it goes with, so a crash at any point leaves the last
finished epoch's state whole. Keras's `BackupAndRestore` keeps the weights and the epoch, but
neither atomically nor with other callbacks' state. A resumed run draws other batches than an
uninterrupted one would (the data pipeline starts afresh), as after any restart.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import keras

from foundation.storage import atomic_write_json

STATE = "state.json"
# in the folder of `progress_folder`: what the run is
RUN = "run.json"


@runtime_checkable
class Resumable(Protocol):
    """A callback whose state outlives the process: `state(directory)` returns it as JSON (arrays go
    into files of its own in `directory`), `restore(state, directory)` takes it back."""

    def state(self, directory: Path) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any], directory: Path) -> None: ...


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the training state into `directory` after each epoch and, when `fit` starts with a state
    there, restores it: fit then runs only the epochs left (none when training had been stopped).
    Put it after `callbacks` (the resumable ones among them are saved with it), so that it sees
    their state at the end of the epoch."""

    def __init__(self, directory: str | os.PathLike, callbacks: Sequence[keras.callbacks.Callback],
                 log: Callable[[str], Any] = print) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.resumable = {f"{i}:{type(c).__name__}": c for i, c in enumerate(callbacks) if isinstance(c, Resumable)}
        self.log = log

    def saved(self) -> dict[str, Any] | None:
        """The last finished epoch's state, or None when there is none (or it cannot be read)."""
        try:
            state = json.loads((self.directory / STATE).read_text(encoding="utf-8"))
            if set(state["callbacks"]) == set(self.resumable) and (self.directory / state["weights"]).is_file():
                return state
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def on_train_begin(self, logs: dict | None = None) -> None:
        state = self.saved()
        if state is None:
            if (self.directory / STATE).exists():
                self.log(f"{self.directory / STATE} cannot be read or belongs to other callbacks: training starts from the first epoch")
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.directory / state["weights"])
        for name, callback in self.resumable.items():
            callback.restore(state["callbacks"][name], self.directory)
        epochs = self.params.get("epochs", state["epoch"])
        # how `BackupAndRestore` tells fit where to start; a stopped run has no epochs left
        self.model._initial_epoch = epochs if state["stopped"] else min(state["epoch"], epochs)
        done = "training had stopped: no epochs left" if state["stopped"] else "continuing"
        self.log(f"resumed from {self.directory} after epoch {state['epoch']} ({done})")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        name = f"epoch-{epoch + 1}.weights.h5"
        partial = self.directory / f".partial-{name}"  # Keras wants the .weights.h5 ending
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model.save_weights(partial, overwrite=True)
        os.replace(partial, self.directory / name)
        states = {key: callback.state(self.directory) for key, callback in self.resumable.items()}
        atomic_write_json(self.directory / STATE, {"epoch": epoch + 1, "weights": name, "stopped": bool(self.model.stop_training),
                                                   "callbacks": states})
        for old in self.directory.glob("epoch-*.weights.h5"):
            if old.name != name:
                old.unlink()


def progress_folder(directory: str | os.PathLike, run: dict[str, Any], log: Callable[[str], Any] = print) -> Path:
    """`directory`, ready for the `EpochCheckpoint` of the run that `run` (JSON) describes: kept when
    it holds that run's progress, emptied when it holds another's (the log says so), since resuming
    a state made with other settings would train something else than asked."""
    directory, run = Path(directory), json.loads(json.dumps(run))
    try:
        earlier = json.loads((directory / RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if earlier != run:
        if directory.exists():
            log(f"{directory} holds the progress of another run (other settings or data): starting from the first epoch")
            shutil.rmtree(directory)
        atomic_write_json(directory / RUN, run)
    return directory
