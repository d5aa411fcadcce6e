"""The quarantine: inputs the guard rejected (and a sample of those it accepted), kept for review
and for retraining the detector on what production traffic actually sends.

A store directory holds:

    index.sqlite    SQLite (WAL) table `records`: id, request_id, model, time (UTC ISO), score
                    (NULL when the detector failed), verdict ("rejected"/"accepted"), image (file
                    name), sha256, shape (JSON), classifier_fingerprint; `user_version` = format
    images/         one lossless float32 `.npy` per record
    lock            flock: shared by every open Quarantine, exclusive only for startup cleanup

`record` only queues: a background writer thread does all disk work, writing each image file
(atomically) before committing its row, so a crash never leaves a row without its file. Files
without a row (a crash between the two) are invisible to readers and deleted by the next
Quarantine that opens the store while no other one has it open.

Reading the store back (export as a dataset, summaries) lives in `serving.quarantine_export`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import os
import queue
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from attacks.storage import atomic_write

INDEX = "index.sqlite"
IMAGES = "images"
LOCK = "lock"
FORMAT_VERSION = 1
VERDICTS = ("rejected", "accepted")
INCLUDE = {"rejected": ("rejected",), "all": VERDICTS}
_COLUMNS = "request_id, model, time, score, verdict, image, sha256, shape, classifier_fingerprint"
_SCHEMA = (
    """CREATE TABLE records (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        model TEXT NOT NULL,
        time TEXT NOT NULL,
        score REAL,
        verdict TEXT NOT NULL CHECK (verdict IN ('rejected', 'accepted')),
        image TEXT NOT NULL UNIQUE,
        sha256 TEXT NOT NULL,
        shape TEXT NOT NULL,
        classifier_fingerprint TEXT
    )""",
    "CREATE INDEX records_time ON records (time)",
    f"PRAGMA user_version = {FORMAT_VERSION}",
)
_BATCH = 256  # records per transaction at most
_STOP = object()
UTC = dt.timezone.utc  # noqa: UP017 - datetime.UTC is Python 3.11+, safetynet supports 3.10

log = logging.getLogger(__name__)


def utc_now() -> str:
    return dt.datetime.now(UTC).isoformat(timespec="microseconds")


def utc_iso(moment: str | dt.datetime) -> str:
    """A time in the index's format (UTC, microseconds), so ISO strings compare as times; naive = UTC."""
    if not isinstance(moment, dt.datetime):
        try:  # Python 3.10's fromisoformat does not read "Z"
            moment = dt.datetime.fromisoformat(str(moment).replace("Z", "+00:00"))  # noqa: FURB162
        except ValueError:
            raise ValueError(f"since must be an ISO 8601 time such as 2024-05-01T00:00:00Z, got {moment!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _connect(directory: Path) -> sqlite3.Connection:
    """A connection to the index in autocommit mode (transactions are explicit), waiting on locks."""
    connection = sqlite3.connect(directory / INDEX, timeout=30.0, isolation_level=None)
    connection.execute("PRAGMA synchronous = FULL")  # a committed row survives power loss too
    return connection


def open_index(directory: str | os.PathLike) -> sqlite3.Connection:
    """A connection to an existing store's index, checked for its format version."""
    directory = Path(directory)
    if not (directory / INDEX).is_file():
        raise FileNotFoundError(f"quarantine store not found: {directory} (no {INDEX})")
    connection = _connect(directory)
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version != FORMAT_VERSION:
        connection.close()
        raise ValueError(f"quarantine store {directory} has format version {version}; this safetynet reads {FORMAT_VERSION}")
    return connection


class Quarantine:
    """Stores rejected inputs (and a `sample_accepted` fraction of accepted ones) in `directory`.

    Thread-safe; `record` never blocks: when `max_queue` records wait for the writer, further ones
    are dropped and counted. Use as a context manager, or call `close`, so queued records land.
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
        (self.directory / IMAGES).mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._open_store()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[Any] = queue.Queue(max_queue)
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)
        self._queued = self._done = self._dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name=f"quarantine:{self.directory}", daemon=True)
        self._thread.start()

    def _open_store(self) -> None:
        """Create or check the index; delete orphan files when no other Quarantine has the store open."""
        connection = _connect(self.directory)
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("BEGIN IMMEDIATE")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA:  # not executescript: it would commit first, ending the lock
                    connection.execute(statement)
            elif version != FORMAT_VERSION:
                raise ValueError(f"quarantine store {self.directory} has format version {version}; "
                                 f"this safetynet reads {FORMAT_VERSION}")
            connection.execute("COMMIT")
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process writes here: its in-flight files are not orphans
                pass
            else:
                indexed = {name for (name,) in connection.execute("SELECT image FROM records")}
                orphans = [p for p in (self.directory / IMAGES).iterdir() if p.name not in indexed]
                for path in orphans:
                    path.unlink()
                if orphans:
                    log.warning("quarantine %s: removed %d image files left without a record by a crash",
                                self.directory, len(orphans))
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        finally:
            connection.close()

    def record(
        self,
        images: np.ndarray,
        scores: np.ndarray,
        rejected: np.ndarray,
        *,
        request_id: str,
        model: str,
        classifier_fingerprint: str | None = None,
    ) -> None:
        """Queue the rejected inputs (and a `sample_accepted` fraction of accepted ones) for storage;
        returns at once (never blocks the response; if the queue is full, drop and count)."""
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
        items = [
            (image, (str(request_id), str(model), time, float(score), VERDICTS[0] if is_rejected else VERDICTS[1],
                     classifier_fingerprint))
            for image, score, is_rejected in zip(images[keep], scores[keep], rejected[keep], strict=True)
        ]
        with self._lock:
            for item in items:
                if self._closed:
                    self._drop("the quarantine is closed")
                    continue
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    self._drop("its queue is full")
                    continue
                self._queued += 1

    def _drop(self, why: str) -> None:
        if not self._dropped:
            log.warning("quarantine %s drops records: %s (counted in count()['dropped'])", self.directory, why)
        self._dropped += 1

    def _write_loop(self) -> None:
        """The writer thread: takes batches off the queue and stores them until `close`."""
        connection = _connect(self.directory)
        try:
            while True:
                batch = [self._queue.get()]
                with contextlib.suppress(queue.Empty):
                    while len(batch) < _BATCH:
                        batch.append(self._queue.get_nowait())
                items = [item for item in batch if item is not _STOP]
                failed = False
                try:
                    self._store(connection, items)
                except Exception:  # keep serving: a full disk must not stop the guard
                    log.exception("quarantine %s failed to store %d records", self.directory, len(items))
                    failed = True
                with self._written:
                    self._done += len(items)
                    if failed:
                        self._dropped += len(items)
                    self._written.notify_all()
                if len(items) < len(batch):
                    return
        finally:
            connection.close()

    def _store(self, connection: sqlite3.Connection, items: list[tuple[np.ndarray, tuple]]) -> None:
        """Write each image file, then commit all their rows in one transaction (or leave no file)."""
        rows, files = [], []
        try:
            for image, (request_id, model, time, score, verdict, fingerprint) in items:
                buffer = io.BytesIO()
                np.save(buffer, image, allow_pickle=False)
                data = buffer.getvalue()
                path = atomic_write(self.directory / IMAGES / f"{uuid.uuid4().hex}.npy",
                                    lambda temp, data=data: temp.write_bytes(data))
                files.append(path)
                rows.append((request_id, model, time, score, verdict, path.name, hashlib.sha256(data).hexdigest(),
                             json.dumps(list(image.shape)), fingerprint))
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            for path in files:
                path.unlink(missing_ok=True)
            raise

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record queued so far is committed (or counted as dropped on a write
        error); raise TimeoutError after `timeout` seconds."""
        with self._written:
            target = self._queued
            if not self._written.wait_for(lambda: self._done >= target, timeout):
                raise TimeoutError(f"quarantine {self.directory}: {target - self._done} records not yet written "
                                   f"after {timeout} s")

    def close(self) -> None:
        """Flush, stop the writer thread and release the store (later records are dropped)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)  # blocks only until the writer makes room
        self._thread.join()
        os.close(self._lock_fd)

    def __enter__(self) -> Quarantine:  # noqa: PYI034 - typing.Self is Python 3.11+
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def count(self) -> dict[str, int]:
        """Stored records by verdict (all of the store, earlier runs included), plus 'dropped'
        (records this instance could not store: queue full, closed, or a write error)."""
        connection = open_index(self.directory)
        try:
            counts = dict(connection.execute("SELECT verdict, COUNT(*) FROM records GROUP BY verdict").fetchall())
        finally:
            connection.close()
        with self._lock:
            dropped = self._dropped
        return {verdict: int(counts.get(verdict, 0)) for verdict in VERDICTS} | {"dropped": dropped}
