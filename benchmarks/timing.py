"""Timing helpers the benchmarks share: best-of-N wall clock, device synchronisation."""
from __future__ import annotations

import time
from typing import Any, Callable

import keras


def best_time(run: Callable[[], Any], repeats: int) -> float:
    """Best wall-clock time of `repeats` runs, after one warm-up run (compilation)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def rate(run: Callable[[], Any], n: int, repeats: int) -> float:
    return n / best_time(run, repeats)


def sync(value: Any) -> None:
    """Wait until a backend array is computed (JAX and GPUs run asynchronously)."""
    if hasattr(value, "block_until_ready"):
        value.block_until_ready()
    else:
        keras.ops.convert_to_numpy(value[:1])


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
