"""The serving side of the `safetynet` command as functions: each does one thing and says what it did.

guard -> a guard directory; export -> a SavedModel; demo --save-model -> the demo's classifier;
quarantine info|list|show|mark|verify|export -> a store's summary, records, reviews and dataset.
`safetynet.cli` maps its arguments onto these (and onto `serving.server.serve`) and nothing else.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

from foundation.shards import describe
from serving import quarantine_review
from serving.guard import Guard
from serving.quarantine_export import describe_left_out, describe_quarantine, export_quarantine
from serving.quarantine_index import verify_store

Log = Callable[[str], None]


def write_guard(model: str | os.PathLike | None, detector: str | os.PathLike, out: str | os.PathLike, *,
                name: str = "safetynet", policy: str = "reject", log: Log = print) -> Path:
    """A guard directory from a classifier (None: a remote one) and a detector directory."""
    path = Guard.from_paths(model, detector, name=name, policy=policy).save(out)
    log(f"guard {name!r} ({policy}) written to {path}")
    return path


def export_guard(guard: str | os.PathLike, out: str | os.PathLike, *, scores_for_rejected: bool = False,
                 log: Log = print) -> Path:
    """A guard directory as one SavedModel."""
    from serving.export import export_guard_directory  # needs TensorFlow, which serving on JAX does not

    path = export_guard_directory(guard, out, scores_for_rejected=scores_for_rejected)
    log(f"exported {path} (signature serving_default)")
    return path


def save_demo_model(path: str | os.PathLike, *, log: Log = print) -> Path:
    """The demo's default classifier as a .keras file (for `attack --model`)."""
    from serving.demo_model import save_default_model  # loads the ImageNet weights: only when asked

    saved = save_default_model(path)
    log(f"saved {saved} (ImageNet MobileNet taking [0, 1] RGB images)")
    return saved


def quarantine_info(store: str | os.PathLike, *, log: Log = print) -> None:
    log("\n".join(describe_quarantine(store)))


def quarantine_list(store: str | os.PathLike, *, review: str | None = None, verdict: str | None = None,
                    limit: int = 50, after_id: int = 0, log: Log = print) -> list[dict[str, Any]]:
    records = quarantine_review.list_records(store, review=review, verdict=verdict, limit=limit, after_id=after_id)
    log("\n".join(quarantine_review.describe_records(records)))
    return records


def quarantine_show(store: str | os.PathLike, record_id: int, png: str | os.PathLike | None = None,
                    clip: Sequence[float] = (0.0, 1.0), *, log: Log = print) -> None:
    log("\n".join(quarantine_review.describe_record(store, record_id, png, tuple(clip))))


def quarantine_mark(store: str | os.PathLike, record_ids: Iterable[int], review: str, *, log: Log = print) -> int:
    marked = quarantine_review.mark_records(store, record_ids, review)
    log(f"marked {marked} records {review}")
    return marked


def quarantine_verify(store: str | os.PathLike, *, log: Log = print) -> int:
    """Check the store (raises ValueError naming the first problem); return its record count."""
    records = verify_store(store)["records"]
    log(f"ok: {records} records verified")
    return records


def quarantine_to_dataset(store: str | os.PathLike, out: str | os.PathLike, *, include: str = "rejected",
                          since: str | None = None, model: str | None = None, unreviewed: bool = False,
                          log: Log = print) -> dict[str, Any]:
    """Export the store as an adversarial-only dataset (`export_quarantine`), then print the
    dataset's summary and what was left out."""
    manifest = export_quarantine(store, out, include=include, since=since, model=model, unreviewed=unreviewed)
    for line in describe(out):
        log(line)
    log(describe_left_out(manifest))
    return manifest
