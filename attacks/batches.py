"""Fixed-size batches through a compiled function, with host copies overlapped with device work.

Every batch has the same size (the last one padded with copies of its first row), so nothing
recompiles. For numpy inputs a background thread prepares batch i+1 (slices, pads, draws its random
starts, copies it to the device) while batch i runs, and batch i's results are copied back only
after batch i+1 has been dispatched: on a GPU the copies in both directions hide behind the work
(JAX dispatches asynchronously; TensorFlow releases the GIL while a function runs). Backend arrays
(jax.Array, tf.Tensor) are sliced where they are and the results stay there.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import keras
import numpy as np
from tqdm.auto import tqdm

from foundation.backend import Array


def _pad(batch: Array, size: int) -> Array:
    count = int(batch.shape[0])
    if count == size:
        return batch
    if isinstance(batch, np.ndarray):
        return np.concatenate([batch, np.repeat(batch[:1], size - count, axis=0)])
    return keras.ops.concatenate([batch, keras.ops.repeat(batch[:1], size - count, axis=0)])


def run_batches(
    run: Callable[..., tuple], arrays: list[Array | None], size: int, *,
    extra: Callable[[slice, tuple[int, ...]], np.ndarray | None] | None = None,
    bar: tqdm | None = None, on_device: bool = False,
) -> list[Array | None]:
    """`run(*batch_arrays[, extra(rows, shape)])` over batches of `size` rows; each output joined with
    the padding dropped (None stays None). Arrays that are None pass through as None. `on_device`
    keeps the outputs as backend arrays; otherwise they come back as numpy."""
    n = int(arrays[0].shape[0])

    def prepare(start: int) -> tuple[list, int]:
        batch = [None if a is None else a[start : start + size] for a in arrays]
        count = int(batch[0].shape[0])
        batch = [None if b is None else _pad(b, size) for b in batch]
        if extra is not None:
            batch.append(extra(slice(start, start + size), tuple(batch[0].shape)))
        return [None if b is None else keras.ops.convert_to_tensor(b) for b in batch], count

    parts: list[list] | None = None  # on the device: the batches' outputs, joined at the end
    filled: list[np.ndarray | None] | None = None  # numpy: each output written into place

    def collect(values: tuple, start: int, count: int) -> None:
        nonlocal parts, filled
        if on_device:
            parts = parts or [[] for _ in values]
            for out, value in zip(parts, values, strict=True):
                if value is not None:
                    out.append(value[:count])
        else:
            host = [None if v is None else keras.ops.convert_to_numpy(v)[:count] for v in values]
            filled = filled or [None if h is None else np.empty((n, *h.shape[1:]), h.dtype) for h in host]
            for out, value in zip(filled, host, strict=True):
                if value is not None:
                    out[start : start + count] = value
        if bar is not None:
            bar.update(count)

    with ThreadPoolExecutor(1, thread_name_prefix="safetynet-batches") as pool:
        pending = pool.submit(prepare, 0)
        previous = None
        for start in range(0, n, size):
            batch, count = pending.result()
            if start + size < n:
                pending = pool.submit(prepare, start + size)
            values = run(*batch)
            if previous is not None:
                collect(*previous)
            previous = (values, start, count)
        collect(*previous)
    if not on_device:
        return filled
    return [None if not p else p[0] if len(p) == 1 else keras.ops.concatenate(p, axis=0) for p in parts]
