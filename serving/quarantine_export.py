"""Reading a quarantine store back: its summary, and its records as a dataset for retraining.

`export_quarantine` turns records into an adversarial dataset in the `foundation.shards` format,
marked `"adversarial_only": true` because quarantined inputs have no clean counterparts. By default
it takes only records a reviewer marked adversarial (`serving.quarantine_review`); `unreviewed=True`
adds the records nobody reviewed yet. Records marked clean (false positives) or unsure are never
exported; the manifest's "left_out" counts what was left out and why:

    attack      {"attack": "quarantine", "include", "since", "model", "unreviewed"}
    source      {"data": "quarantine:<absolute store path>", "split": "quarantine", "n", "record_ids"}
    x_adv       the quarantined images;  x_clean: NaN (there is no clean version; NaN makes any
                use of it as clean data fail loudly);  index: the record id;  y, target: -1
                (unknown);  success: True (every exported input is to be treated as adversarial);
                linf, l2: NaN (no perturbation is known)

Retraining (`training.detector`) takes clean images only from ordinary datasets and puts these
images on the adversarial side, holding out a fraction of record ids to measure detection.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from foundation.shards import FORMAT_VERSION as DATASET_FORMAT_VERSION
from foundation.shards import MANIFEST, shard_name, write_shard
from foundation.storage import atomic_directory, atomic_write_json
from serving.quarantine import INCLUDE
from serving.quarantine_index import VERDICTS, open_index, record_pixels, utc_iso, utc_now


def export_quarantine(
    store: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    include: str = "rejected",
    since: str | dt.datetime | None = None,
    model: str | None = None,
    unreviewed: bool = False,
    shard_size: int = 10_000,
) -> dict[str, Any]:
    """Write the store's records (`include`: "rejected" or "all"; from `since` on; of one `model`;
    marked adversarial, plus the unreviewed ones with `unreviewed`) as an adversarial-only dataset
    at `out_dir` (a new directory); return its manifest, whose "left_out" counts the records that
    matched but were left out by their review."""
    if include not in INCLUDE:
        raise ValueError(f"include must be one of {sorted(INCLUDE)}, got {include!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    store, out = Path(store), Path(out_dir)
    since = None if since is None else utc_iso(since)
    conditions, parameters = [f"verdict IN ({', '.join('?' * len(INCLUDE[include]))})"], [*INCLUDE[include]]
    if since is not None:
        conditions.append("time >= ?")
        parameters.append(since)
    if model is not None:
        conditions.append("model = ?")
        parameters.append(model)
    where = " AND ".join(conditions)
    # IS, not =: NOT (NULL = 'adversarial') is NULL, which would hide the unreviewed from the counts
    taken = "review IS 'adversarial'" + (" OR review IS NULL" if unreviewed else "")
    connection = open_index(store)
    connection.execute("BEGIN")  # one snapshot for the rows, the counts and the images (WAL readers never block)
    try:
        rows = connection.execute(f"SELECT id, sha256, shape, classifier_fingerprint FROM records "
                                  f"WHERE {where} AND ({taken}) ORDER BY id", parameters).fetchall()
        left_out = dict(connection.execute(f"SELECT COALESCE(review, 'unreviewed'), COUNT(*) FROM records "
                                           f"WHERE {where} AND NOT ({taken}) GROUP BY 1", parameters).fetchall())
        left_out = {key: int(left_out.get(key, 0)) for key in ("clean", "unsure", "unreviewed")}
        if out.exists():
            raise FileExistsError(f"{out} already exists: export into a new directory")
        if not rows:
            hint = "; mark records with `safetynet quarantine mark`, or pass unreviewed" if left_out["unreviewed"] else ""
            raise ValueError(f"no quarantined records to export from {store} (include={include}, since={since}, "
                             f"model={model}; left out by review: {left_out}{hint})")
        fingerprints = {row[3] for row in rows}
        if None in fingerprints:
            raise ValueError(f"{sum(row[3] is None for row in rows)} of the records carry no classifier fingerprint, so "
                             "nobody can tell which classifier they were scored for: narrow the export with since/model")
        if len(fingerprints) > 1:
            raise ValueError(f"the records were scored for {len(fingerprints)} different classifiers "
                             f"({', '.join(sorted(f[:12] for f in fingerprints))}): export one at a time with since/model")
        shapes = {row[2] for row in rows}
        if len(shapes) > 1:
            raise ValueError(f"the records hold images of different shapes {sorted(shapes)}: export one model at a time")
        fingerprint, shape = fingerprints.pop(), json.loads(shapes.pop())
        ids = [row[0] for row in rows]
        config = {
            "attack": {"attack": "quarantine", "include": include, "since": since, "model": model, "unreviewed": unreviewed},
            "classifier_fingerprint": fingerprint,
            "crafted_on": fingerprint,
            "source": {"data": f"quarantine:{store.resolve()}", "split": "quarantine", "n": len(rows),
                       "record_ids": [ids[0], ids[-1]]},
            "source_count": len(rows),
            "shard_size": shard_size,
            "part": [0, 1],
            "targets": None,
        }
        manifest = {
            "format_version": DATASET_FORMAT_VERSION, **config, "adversarial_only": True,
            "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "image_shape": shape, "shards": [], "versions": {"python": platform.python_version(), "numpy": np.__version__},
            "left_out": left_out, "started": utc_now(),
        }
        with atomic_directory(out) as temp:
            images = connection.execute(f"SELECT id, pixels, sha256, shape FROM records WHERE {where} AND ({taken}) "
                                        f"ORDER BY id", parameters)
            for start in range(0, len(rows), shard_size):
                chunk = rows[start : start + shard_size]
                x = np.stack([record_pixels(*row) for row in images.fetchmany(len(chunk))]).astype(np.float32)
                n = len(chunk)
                arrays = {
                    "x_clean": np.full_like(x, np.nan), "x_adv": x, "y": np.full(n, -1, np.int64),
                    "target": np.full(n, -1, np.int64), "success": np.ones(n, bool), "linf": np.full(n, np.nan, np.float32),
                    "l2": np.full(n, np.nan, np.float32), "index": np.array([row[0] for row in chunk], np.int64),
                }
                name = shard_name(len(manifest["shards"]))
                manifest["shards"].append({"file": name, "count": n, "successes": n, "sha256": write_shard(temp / name, arrays)})
            manifest.update(count=len(rows), successes=len(rows), success_rate=1.0, range=[0, len(rows)],
                            complete=True, finished=utc_now())
            atomic_write_json(temp / MANIFEST, manifest)
        return manifest
    finally:
        connection.close()


def describe_quarantine(store: str | os.PathLike) -> Iterator[str]:
    """Human-readable summary lines of a store (for `safetynet quarantine info`)."""
    connection = open_index(store)
    try:
        verdicts = dict(connection.execute("SELECT verdict, COUNT(*) FROM records GROUP BY verdict").fetchall())
        reviews = dict(connection.execute("SELECT COALESCE(review, 'unreviewed'), COUNT(*) FROM records "
                                          "GROUP BY 1").fetchall())
        first, last = connection.execute("SELECT MIN(time), MAX(time) FROM records").fetchone()
        models = connection.execute("SELECT model, COUNT(*) FROM records GROUP BY model ORDER BY model").fetchall()
        classifiers = connection.execute("SELECT classifier_fingerprint, COUNT(*) FROM records "
                                         "GROUP BY classifier_fingerprint ORDER BY 2 DESC").fetchall()
    finally:
        connection.close()
    yield f"store:       {store}"
    yield "records:     " + ", ".join(f"{verdicts.get(v, 0)} {v}" for v in VERDICTS)
    yield "reviews:     " + ", ".join(f"{reviews.get(r, 0)} {r}" for r in ("adversarial", "clean", "unsure", "unreviewed"))
    yield f"time:        {first or '-'} .. {last or '-'}"
    yield "models:      " + (", ".join(f"{name} ({n})" for name, n in models) or "-")
    yield "classifiers: " + (", ".join(f"{(f or 'unknown')[:16]} ({n})" for f, n in classifiers) or "-")


def describe_left_out(manifest: dict[str, Any]) -> str:
    """One line saying how many matching records an export left out, and why."""
    left_out = manifest["left_out"]
    total = sum(left_out.values())
    if not total:
        return "left out:   none"
    return f"left out:   {total} ({left_out['clean']} marked clean, {left_out['unsure']} unsure, " \
           f"{left_out['unreviewed']} not reviewed)"
