"""The quarantine store's on-disk format: one SQLite database (WAL) holding every record with its image.

    index.sqlite    table `records`: id, request_id, model, time (UTC ISO), score (NULL when the
                    detector failed), verdict ("rejected"/"accepted"), reason (why it was kept, NULL
                    for the detector's own verdict), pixels (the image as a float32 `.npy`, lossless),
                    sha256 (of pixels), shape (JSON), classifier_fingerprint, review
                    ("adversarial"/"clean"/"unsure", NULL until someone reviewed it), reviewed_time;
                    `PRAGMA user_version` = the format version

Images live inside the database so that a batch of records, images included, is one transaction: a
crash leaves every batch whole or absent, with one fsync per batch rather than per image. Format 1
(an `images/` folder of `.npy` files, no review) is migrated in place the first time a store opens.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np

INDEX = "index.sqlite"
LEGACY_IMAGES = "images"  # format 1 kept each image as a file here
FORMAT_VERSION = 2
VERDICTS = ("rejected", "accepted")
REVIEWS = ("adversarial", "clean", "unsure")
COLUMNS = "request_id, model, time, score, verdict, reason, pixels, sha256, shape, classifier_fingerprint"
_SCHEMA = (
    """CREATE TABLE records (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        model TEXT NOT NULL,
        time TEXT NOT NULL,
        score REAL,
        verdict TEXT NOT NULL CHECK (verdict IN ('rejected', 'accepted')),
        reason TEXT,
        pixels BLOB NOT NULL,
        sha256 TEXT NOT NULL,
        shape TEXT NOT NULL,
        classifier_fingerprint TEXT,
        review TEXT CHECK (review IN ('adversarial', 'clean', 'unsure')),
        reviewed_time TEXT
    )""",
    "CREATE INDEX records_time ON records (time)",
    "CREATE INDEX records_review ON records (review)",
)
UTC = dt.timezone.utc  # noqa: UP017 - datetime.UTC is Python 3.11+, safetynet supports 3.10


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


def encode_image(image: np.ndarray) -> tuple[bytes, str]:
    """An image as `.npy` bytes (float32, lossless) and their sha256."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(image, np.float32), allow_pickle=False)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def record_pixels(record_id: int, pixels: bytes, sha256: str, shape: str) -> np.ndarray:
    """A record's image, checked against its sha256 and shape."""
    if hashlib.sha256(pixels).hexdigest() != sha256:
        raise ValueError(f"quarantine record {record_id} is corrupt: its image does not match its sha256")
    image = np.load(io.BytesIO(pixels), allow_pickle=False)
    if list(image.shape) != json.loads(shape):
        raise ValueError(f"quarantine record {record_id} has an image of shape {image.shape}, the index says {shape}")
    return image


def connect(directory: Path) -> sqlite3.Connection:
    """A connection to the index in autocommit mode (transactions are explicit), waiting on locks."""
    connection = sqlite3.connect(directory / INDEX, timeout=30.0, isolation_level=None)
    connection.execute("PRAGMA synchronous = FULL")  # a committed batch survives power loss too
    return connection


def create_or_migrate(directory: Path) -> None:
    """Create the index in `directory`, migrate a format 1 store, or check the format version."""
    directory.mkdir(parents=True, exist_ok=True)
    connection = connect(directory)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("BEGIN IMMEDIATE")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            for statement in _SCHEMA:  # not executescript: it would commit first, ending the lock
                connection.execute(statement)
        elif version == 1:
            _migrate_from_1(connection, directory)
        elif version != FORMAT_VERSION:
            raise ValueError(f"quarantine store {directory} has format version {version}; "
                             f"this safetynet reads {FORMAT_VERSION}")
        connection.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    finally:
        connection.close()
    shutil.rmtree(directory / LEGACY_IMAGES, ignore_errors=True)  # format 1's files, now inside the index


def _migrate_from_1(connection: sqlite3.Connection, directory: Path) -> None:
    """Copy format 1's rows and image files into the format 2 table, in the caller's transaction."""
    connection.execute("ALTER TABLE records RENAME TO records_v1")
    connection.execute("DROP INDEX IF EXISTS records_time")
    for statement in _SCHEMA:
        connection.execute(statement)
    rows = connection.execute("SELECT id, request_id, model, time, score, verdict, image, sha256, shape, "
                              "classifier_fingerprint FROM records_v1 ORDER BY id").fetchall()
    for record_id, request_id, model, time, score, verdict, name, sha256, shape, fingerprint in rows:
        pixels = (directory / LEGACY_IMAGES / name).read_bytes()
        record_pixels(record_id, pixels, sha256, shape)
        connection.execute(f"INSERT INTO records (id, {COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                           (record_id, request_id, model, time, score, verdict, pixels, sha256, shape, fingerprint))
    connection.execute("DROP TABLE records_v1")


def open_index(directory: str | os.PathLike) -> sqlite3.Connection:
    """A connection to an existing store's index, checked for its format version."""
    directory = Path(directory)
    if not (directory / INDEX).is_file():
        raise FileNotFoundError(f"quarantine store not found: {directory} (no {INDEX})")
    connection = connect(directory)
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version != FORMAT_VERSION:
        connection.close()
        hint = " (open it once with Quarantine to migrate it)" if version == 1 else ""
        raise ValueError(f"quarantine store {directory} has format version {version}; this safetynet reads "
                         f"{FORMAT_VERSION}{hint}")
    return connection


def verify_store(directory: str | os.PathLike) -> dict[str, int]:
    """Check SQLite's integrity and every record's image against its sha256 and shape; return the
    record count. Raises ValueError naming the first problem."""
    connection = open_index(directory)
    try:
        problems = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise ValueError(f"quarantine store {directory} fails SQLite's integrity check: {problems[:5]}")
        count = 0
        for row in connection.execute("SELECT id, pixels, sha256, shape FROM records ORDER BY id"):
            record_pixels(*row)
            count += 1
    finally:
        connection.close()
    return {"records": count}
