"""A learning curve for the training benchmarks: after each epoch, what `measure` reports, beside the
training seconds (the measurement itself not counted), printed and written out as it grows."""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import keras
import numpy as np


class EpochCurve(keras.callbacks.Callback):
    """Subclasses implement `measure(logs)`: the figures of one epoch on (x, y) with `classifier`."""

    def __init__(self, classifier: keras.Model, x: np.ndarray, y: np.ndarray, write: Callable[[], None]) -> None:
        super().__init__()
        self.classifier, self.x, self.y, self.write = classifier, x, y, write
        self.points: list[dict[str, Any]] = []
        self.train_s = 0.0

    def measure(self, logs: dict) -> dict[str, Any]:
        raise NotImplementedError

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.train_s += time.perf_counter() - self.started
        self.points.append({"epoch": epoch + 1, "train_seconds": round(self.train_s, 1), **self.measure(logs or {})})
        print(json.dumps(self.points[-1]), file=sys.stderr, flush=True)
        self.write()
