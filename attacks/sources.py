"""Where a generated dataset's clean images come from: anything with a length and `read(start,
stop)`; `ArraySource` over arrays, `NpySource` over `.npy` files read through a memory map a range at
a time (`attacks.dataset.generate_dataset` streams them a shard at a time)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np


class Source(Protocol):
    """Where the clean images come from: a known count, and any contiguous range on demand."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images (float32 NHWC), labels and source indices of positions [start, stop)."""
        ...


class ArraySource:
    """A source over arrays (numpy or memory-mapped): positions are rows."""

    def __init__(self, x: np.ndarray, y: np.ndarray, index: np.ndarray | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y = x, y
        self.index = np.arange(len(x)) if index is None else np.asarray(index)

    def __len__(self) -> int:
        return len(self.x)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.asarray(self.x[start:stop], np.float32), np.asarray(self.y[start:stop]), self.index[start:stop]


class NpySource:
    """A source over `.npy` files on disk (images float32 NHWC or uint8, labels), read a range at a
    time through a memory map that is closed after each read: datasets far larger than RAM."""

    def __init__(self, images: str | os.PathLike, labels: str | os.PathLike, *, count: int | None = None) -> None:
        self.images, self.labels = Path(images), Path(labels)
        for path in (self.images, self.labels):
            if not path.is_file():
                raise FileNotFoundError(f"source file not found: {path}")
        x, y = self._open()
        if x.ndim != 4 or len(x) != len(y):
            raise ValueError(f"{self.images} must hold NHWC images, one per label in {self.labels}: got {x.shape} and {y.shape}")
        if count is not None and not 0 < count <= len(x):
            raise ValueError(f"count must lie in [1, {len(x)}], got {count}")
        self.count = len(x) if count is None else count  # the first `count` rows

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        return np.load(self.images, mmap_mode="r", allow_pickle=False), np.load(self.labels, mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y = self._open()
        images = np.array(x[start:stop])
        images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32, copy=False)
        labels = np.array(y[start:stop])
        del x, y  # unmap: pages read stay out of this process's resident memory
        return images, labels, np.arange(start, stop)
