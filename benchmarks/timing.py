"""Helpers the benchmarks share: best-of-N wall clock, device synchronisation, the JSON result.

Keras is imported only by `sync`: some benchmarks set KERAS_HOME before it loads, and the serving
benchmarks never need it in the client.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable


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


def interleaved_rates(runs: dict[str, Callable[[], Any]], n: int, repeats: int) -> dict[str, float]:
    """Images/s (n images a run) of each run: the best of `repeats` rounds in which every run is timed
    once in turn, after one warm-up each. Ratios between runs then compare like with like: a machine
    that speeds up or slows down mid-benchmark (turbo, heat, a neighbour) affects all alike."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: n / seconds for name, seconds in best.items()}


def sync(value: Any) -> None:
    """Wait until a backend array is computed (JAX and GPUs run asynchronously)."""
    if hasattr(value, "block_until_ready"):
        value.block_until_ready()
    else:
        import keras

        keras.ops.convert_to_numpy(value[:1])


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def emit(result: dict[str, Any], out: str | os.PathLike | None = None) -> None:
    """Print the benchmark's result as indented JSON on stdout and, with `out`, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
