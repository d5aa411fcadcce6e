"""Reviewing a quarantine store before export: list records, show one (its fields and its image), and
mark records adversarial, clean (a false positive: never exported) or unsure. `safetynet quarantine
list/show/mark` call these."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from serving.quarantine_index import REVIEWS, VERDICTS, open_index, record_pixels, utc_now

LIST_FIELDS = ("id", "time", "request_id", "model", "verdict", "reason", "score", "review")
REVIEW_FILTERS = (*REVIEWS, "unreviewed")


def list_records(store: str | os.PathLike, *, review: str | None = None, verdict: str | None = None,
                 limit: int = 50, after_id: int = 0) -> list[dict[str, Any]]:
    """Up to `limit` records after `after_id` (in id order), optionally only those with `review`
    ("adversarial", "clean", "unsure" or "unreviewed") and `verdict`, without their images."""
    if review is not None and review not in REVIEW_FILTERS:
        raise ValueError(f"review must be one of {list(REVIEW_FILTERS)}, got {review!r}")
    if verdict is not None and verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {list(VERDICTS)}, got {verdict!r}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    conditions, parameters = ["id > ?"], [after_id]
    if review == "unreviewed":
        conditions.append("review IS NULL")
    elif review is not None:
        conditions.append("review = ?")
        parameters.append(review)
    if verdict is not None:
        conditions.append("verdict = ?")
        parameters.append(verdict)
    connection = open_index(store)
    try:
        rows = connection.execute(f"SELECT {', '.join(LIST_FIELDS)} FROM records WHERE {' AND '.join(conditions)} "
                                  f"ORDER BY id LIMIT ?", [*parameters, limit]).fetchall()
    finally:
        connection.close()
    return [dict(zip(LIST_FIELDS, row, strict=True)) for row in rows]


def show_record(store: str | os.PathLike, record_id: int) -> tuple[dict[str, Any], np.ndarray]:
    """One record's fields and its image (checked against its sha256)."""
    connection = open_index(store)
    try:
        cursor = connection.execute("SELECT * FROM records WHERE id = ?", (record_id,))
        row = cursor.fetchone()
        names = [column[0] for column in cursor.description]
    finally:
        connection.close()
    if row is None:
        raise ValueError(f"quarantine store {store} has no record {record_id}")
    fields = dict(zip(names, row, strict=True))
    image = record_pixels(record_id, fields.pop("pixels"), fields["sha256"], fields["shape"])
    return fields, image


def write_png(image: np.ndarray, path: str | os.PathLike, clip: tuple[float, float] = (0.0, 1.0)) -> Path:
    """An HxWxC image whose pixels lie in `clip` as a PNG a reviewer can open (grey or RGB)."""
    low, high = clip
    if not high > low:
        raise ValueError(f"clip must be (low, high) with high > low, got {clip}")
    pixels = np.round((np.clip(image, low, high) - low) / (high - low) * 255).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif pixels.ndim == 3 and pixels.shape[2] != 1:
        raise ValueError(f"only grey or RGB images can be written as PNG, got shape {image.shape}")
    if not cv2.imwrite(str(path), pixels.reshape(pixels.shape[:2]) if pixels.shape[-1] == 1 else pixels):
        raise OSError(f"could not write {path}")
    return Path(path)


def mark_records(store: str | os.PathLike, record_ids: Iterable[int], review: str) -> int:
    """Mark records with a `review` ("adversarial", "clean" or "unsure"), all or none; returns how
    many were marked. ValueError names ids the store does not hold."""
    if review not in REVIEWS:
        raise ValueError(f"review must be one of {list(REVIEWS)}, got {review!r}")
    ids = sorted({int(record_id) for record_id in record_ids})
    if not ids:
        raise ValueError("no record ids given")
    connection = open_index(store)
    try:
        connection.execute("BEGIN IMMEDIATE")
        present = {row[0] for row in connection.execute(
            f"SELECT id FROM records WHERE id IN ({', '.join('?' * len(ids))})", ids)}
        missing = [record_id for record_id in ids if record_id not in present]
        if missing:
            connection.execute("ROLLBACK")
            raise ValueError(f"quarantine store {store} has no records {missing[:20]}")
        connection.execute(f"UPDATE records SET review = ?, reviewed_time = ? WHERE id IN ({', '.join('?' * len(ids))})",
                           [review, utc_now(), *ids])
        connection.execute("COMMIT")
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.close()
    return len(ids)


def describe_records(records: list[dict[str, Any]]) -> Iterator[str]:
    """One line per record, for `safetynet quarantine list`."""
    yield f"{'id':>8}  {'time':<32}  {'verdict':<8}  {'review':<11}  {'score':>10}  {'reason':<10}  request_id"
    for record in records:
        score = "-" if record["score"] is None else f"{record['score']:.4g}"
        yield (f"{record['id']:>8}  {record['time']:<32}  {record['verdict']:<8}  {record['review'] or '-':<11}  "
               f"{score:>10}  {record['reason'] or '-':<10}  {record['request_id']}")
    if not records:
        yield "(no records)"


def describe_record(store: str | os.PathLike, record_id: int, png: str | os.PathLike | None = None,
                    clip: tuple[float, float] = (0.0, 1.0)) -> Iterator[str]:
    """A record's fields and its pixel statistics, for `safetynet quarantine show`; with `png`, the
    image is written there too."""
    fields, image = show_record(store, record_id)
    for name, value in fields.items():
        yield f"{name + ':':<24}{'-' if value is None else value}"
    yield f"{'pixels:':<24}min {image.min():.4g}, max {image.max():.4g}, mean {image.mean():.4g}"
    if png is not None:
        yield f"{'image:':<24}{write_png(image, png, clip)}"
