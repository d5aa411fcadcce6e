"""The quarantine: inputs the guard rejected (and a sample of those it accepted), kept for review
and for retraining the detector on what production traffic actually sends.

`record` filters and queues a request's records and returns a future that completes when they are
committed; a writer thread commits whatever is queued in one SQLite transaction (WAL, synchronous
FULL: one fsync per batch, images inside the database, `serving.quarantine_index`), so under load
many requests share a commit. What was committed survives a SIGKILL or power loss whole; what was
queued but not yet committed is lost, and those are exactly the records whose futures had not
completed and that `stats()["stored"]` had not counted. When `max_queue` records wait, `record`
refuses the whole batch with `QuarantineFull` (the HTTP service answers 503 with Retry-After)
instead of dropping records silently.

Reading the store back lives in `serving.quarantine_export` (export, summary) and
`serving.quarantine_review` (list, show, mark).
"""
from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from serving.quarantine_index import COLUMNS, VERDICTS, connect, create_or_migrate, encode_image, open_index, utc_now

INCLUDE = {"rejected": ("rejected",), "all": VERDICTS}
_BATCH = 1024  # records per transaction at most

log = logging.getLogger(__name__)


class QuarantineFull(RuntimeError):
    """The writer is behind by `max_queue` records: the batch was not queued (retry later)."""


class Quarantine:
    """Stores rejected inputs (and a `sample_accepted` fraction of accepted ones) in `directory`.

    Thread-safe; `record` never blocks on the disk. Use as a context manager, or call `close`, so
    queued records land.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        sample_accepted: float = 0.0,
        seed: int | None = None,
        max_queue: int = 10_000,
    ) -> None:
        if not 0.0 <= sample_accepted <= 1.0:
            raise ValueError(f"sample_accepted must lie in [0, 1], got {sample_accepted}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.directory = Path(directory)
        self.sample_accepted = float(sample_accepted)
        self.max_queue = max_queue
        create_or_migrate(self.directory)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: collections.deque[tuple[list[tuple[np.ndarray, tuple]], Future]] = collections.deque()
        self._depth = self._queued = self._done = 0
        self._stored = dict.fromkeys(VERDICTS, 0)
        self._dropped = self._refused = self._commits = 0
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name=f"quarantine:{self.directory}", daemon=True)
        self._thread.start()

    def record(
        self,
        images: np.ndarray,
        scores: np.ndarray,
        rejected: np.ndarray,
        *,
        request_id: str,
        model: str,
        classifier_fingerprint: str | None = None,
        reason: str | None = None,
    ) -> Future:
        """Queue the rejected inputs (and a `sample_accepted` fraction of accepted ones); the future
        gives the number of records committed once they are (or the write error). Raises
        `QuarantineFull` when the writer is `max_queue` records behind; after `close`, drops and counts."""
        images = np.asarray(images, np.float32)
        scores = np.asarray(scores, np.float64).reshape(-1)
        rejected = np.asarray(rejected, bool).reshape(-1)
        if images.ndim < 2 or not len(images) == len(scores) == len(rejected):
            raise ValueError(f"record needs a batch of images with one score and one verdict each, got "
                             f"images {images.shape}, {len(scores)} scores, {len(rejected)} verdicts")
        time = utc_now()
        with self._lock:  # numpy generators are not thread-safe
            draws = self._rng.random(len(rejected)) if self.sample_accepted > 0.0 else None
        keep = rejected if draws is None else rejected | (draws < self.sample_accepted)
        # images[keep] copies the kept rows only: the caller's arrays may change once this returns
        items = [
            (image, (str(request_id), str(model), time, float(score), VERDICTS[0] if is_rejected else VERDICTS[1],
                     reason, classifier_fingerprint))
            for image, score, is_rejected in zip(images[keep], scores[keep], rejected[keep], strict=True)
        ]
        future: Future = Future()
        with self._lock:
            if self._closed:
                self._drop(len(items), "the quarantine is closed")
                future.set_result(0)
                return future
            if not items:
                future.set_result(0)
                return future
            if self._depth + len(items) > self.max_queue:
                self._refused += len(items)
                raise QuarantineFull(f"quarantine {self.directory}: {self._depth} records wait for the disk "
                                     f"(at most {self.max_queue})")
            self._pending.append((items, future))
            self._depth += len(items)
            self._queued += len(items)
            self._changed.notify_all()
        return future

    def _drop(self, count: int, why: str) -> None:
        if count and not self._dropped:
            log.warning("quarantine %s drops records: %s (counted in stats()['dropped'])", self.directory, why)
        self._dropped += count

    def _write_loop(self) -> None:
        """The writer thread: commits everything queued, a transaction at a time, until `close`."""
        connection = connect(self.directory)
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._pending or self._closed)
                    if not self._pending:
                        return
                    batch = [self._pending.popleft()]
                    size = len(batch[0][0])
                    while self._pending and size + len(self._pending[0][0]) <= _BATCH:
                        batch.append(self._pending.popleft())
                        size += len(batch[-1][0])
                items = [item for part, _ in batch for item in part]
                error = None
                try:
                    self._store(connection, items)
                except Exception as caught:  # keep serving: a full disk must not stop the guard
                    log.exception("quarantine %s failed to store %d records", self.directory, len(items))
                    error = caught
                with self._changed:
                    self._depth -= len(items)
                    self._done += len(items)
                    if error is None:
                        self._commits += 1
                        for _, (_, _, _, _, verdict, _, _) in items:
                            self._stored[verdict] += 1
                    else:
                        self._drop(len(items), "a write failed")
                    self._changed.notify_all()
                for part, future in batch:
                    if future.cancelled():
                        continue
                    if error is None:
                        future.set_result(len(part))
                    else:
                        future.set_exception(error)
        finally:
            connection.close()

    def _store(self, connection: sqlite3.Connection, items: list[tuple[np.ndarray, tuple]]) -> None:
        """Commit the records, images included, in one transaction (all or none)."""
        rows = []
        for image, (request_id, model, time, score, verdict, reason, fingerprint) in items:
            pixels, digest = encode_image(image)
            rows.append((request_id, model, time, score, verdict, reason, pixels, digest,
                         f"[{', '.join(map(str, image.shape))}]", fingerprint))
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(f"INSERT INTO records ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record queued so far is committed (or counted as dropped on a write
        error); raise TimeoutError after `timeout` seconds."""
        with self._changed:
            target = self._queued
            if not self._changed.wait_for(lambda: self._done >= target, timeout):
                raise TimeoutError(f"quarantine {self.directory}: {target - self._done} records not yet written "
                                   f"after {timeout} s")

    def close(self) -> None:
        """Commit what is queued, stop the writer thread (later records are dropped and counted)."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def __enter__(self) -> Quarantine:  # noqa: PYI034 - typing.Self is Python 3.11+
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """This instance's counters: records committed by verdict ('stored_rejected', 'stored_accepted'),
        'queue_depth' (queued, not yet committed), 'dropped' (write errors, or after close), 'refused'
        (turned away by `QuarantineFull`) and 'commits' (transactions)."""
        with self._lock:
            return {**{f"stored_{verdict}": n for verdict, n in self._stored.items()}, "queue_depth": self._depth,
                    "dropped": self._dropped, "refused": self._refused, "commits": self._commits}

    def count(self) -> dict[str, int]:
        """Stored records by verdict (all of the store, earlier runs included), plus 'dropped'
        (records this instance could not store: a write error, or recorded after close)."""
        connection = open_index(self.directory)
        try:
            counts = dict(connection.execute("SELECT verdict, COUNT(*) FROM records GROUP BY verdict").fetchall())
        finally:
            connection.close()
        with self._lock:
            dropped = self._dropped
        return {verdict: int(counts.get(verdict, 0)) for verdict in VERDICTS} | {"dropped": dropped}
