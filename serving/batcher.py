"""Request merging: the inputs of concurrent requests run through the guard in one call."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools

import anyio
import numpy as np

from serving.guard import Guard, GuardResult


class Batcher:
    """Runs the guard on the inputs of concurrent requests merged into one call (up to `max_images`).
    Keras' predict costs milliseconds per call whatever the batch, so merging multiplies throughput
    under load; a request that finds the guard idle runs at once (no waiting for company). One call
    at a time: Keras does not promise a thread-safe predict, and TensorFlow spreads one call over
    every core."""

    def __init__(self, guard: Guard, max_images: int) -> None:
        self.guard = guard
        self.max_images = max_images
        self.pending: collections.deque[tuple[np.ndarray, asyncio.Future]] = collections.deque()
        self.ready = asyncio.Event()

    async def predict(self, x: np.ndarray) -> GuardResult:
        """The guard's result for `x`, one request's images as `Guard.check` returned them."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((x, future))
        self.ready.set()
        return await future

    async def run(self) -> None:
        """The loop that owns the guard: take what is waiting, predict, hand out the parts."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.pending:
                batch = [self.pending.popleft()]
                size = len(batch[0][0])
                while (self.pending and size + len(self.pending[0][0]) <= self.max_images
                       and self.pending[0][0].shape[1:] == batch[0][0].shape[1:]):
                    batch.append(self.pending.popleft())
                    size += len(batch[-1][0])
                try:
                    inputs = np.concatenate([x for x, _ in batch]) if len(batch) > 1 else batch[0][0]
                    # each request's images passed `Guard.check` on arrival (serving.validation)
                    result = await anyio.to_thread.run_sync(functools.partial(self.guard.predict, inputs, checked=True))
                except Exception as error:  # noqa: BLE001 (each request raises it: logged, answered 500)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                start = 0
                for x, future in batch:
                    if not future.done():  # done: the client went away
                        future.set_result(GuardResult(**{
                            field.name: None if value is None else value[start : start + len(x)]
                            for field in dataclasses.fields(result) for value in [getattr(result, field.name)]
                        }))
                    start += len(x)
