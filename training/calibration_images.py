"""Clean images to set a detector's threshold on, named as DATA:SPLIT:START:STOP.

A threshold is a quantile of the detector's scores on clean images, so it holds for images like
those it was set on. By default those are held-out source images of the adversarial datasets,
usually training images. Naming a sample of the images the guard will serve (or a slice like them
that neither model trained on) sets the threshold where it will be used: on MNIST the default
ensemble's FPR under 2-px shifts on test images 0-999, capped at 10%, is 11.0% calibrated on test
images 1000-2999 and 14.3% on test images 8000-9999, written by another population
(docs/benchmarks.md, "Calibration images").

Parsing imports nothing heavy (the command line checks the spec before loading anything).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class CalibrationImages:
    """Images START to STOP (STOP excluded; empty for the end of the split) of a dataset's split."""

    data: str
    split: str
    start: int
    stop: int | None

    @classmethod
    def parse(cls, text: str) -> CalibrationImages:
        parts = text.rsplit(":", 3)
        if len(parts) != 4 or not parts[0]:
            raise ValueError(f"expected DATA:SPLIT:START:STOP such as mnist.npz:test:1000:3000, got {text!r}")
        data, split, start, stop = parts
        if split not in SPLITS:
            raise ValueError(f"the split of {text!r} must be one of {SPLITS}, got {split!r}")
        if not start.isdigit() or stop and not stop.isdigit():
            raise ValueError(f"START and STOP of {text!r} must be image indices (STOP may be empty for the end)")
        if stop and int(stop) <= int(start):
            raise ValueError(f"STOP must be greater than START in {text!r}")
        return cls(data, split, int(start), int(stop) if stop else None)

    def __str__(self) -> str:
        return f"{self.data}:{self.split}:{self.start}:{'' if self.stop is None else self.stop}"

    def overlaps(self, data: str, split: str, count: int) -> bool:
        """Whether these images include any of the first `count` images of `data`'s `split` (the ones
        `evaluate` scores): a threshold judged on its own calibration images looks better than it is."""
        return split == self.split and self.start < count and _same_data(self.data, data)

    def load(self) -> np.ndarray:
        """The images, checked to be there: a range past the split's end is an error, not a short slice."""
        from training.data import load_dataset  # here, so that parsing stays light

        dataset = load_dataset(self.data)
        x = dataset.x_train if self.split == "train" else dataset.x_test
        stop = len(x) if self.stop is None else self.stop
        if stop > len(x) or self.start >= stop:
            raise ValueError(f"{self}: the {self.split} split of {self.data} has {len(x)} images")
        return x[self.start:stop]


def _same_data(first: str, second: str) -> bool:
    """The same data spec: the same file or folder when both are paths that exist, else the same name."""
    paths = [Path(spec).expanduser() for spec in (first, second)]
    return paths[0].resolve() == paths[1].resolve() if all(p.exists() for p in paths) else first == second


def named_images(text: str | None) -> tuple[str | None, np.ndarray | None]:
    """For a stage given DATA:SPLIT:START:STOP (or None): the spec to record, data path made
    absolute, and the images it names."""
    if text is None:
        return None, None
    named = CalibrationImages.parse(text)
    path = Path(named.data).expanduser()
    if path.exists():
        named = dataclasses.replace(named, data=str(path.resolve()))
    return str(named), named.load()
