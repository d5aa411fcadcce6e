"""Reading a quarantine store back: its summary, and its records as a dataset for retraining.

`export_quarantine` turns records into an adversarial dataset in the `attacks.shards` format,
marked `"adversarial_only": true` because quarantined inputs have no clean counterparts:

    attack      {"attack": "quarantine", "include", "since", "model"}
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
import io
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attacks.shards import FORMAT_VERSION as DATASET_FORMAT_VERSION
from attacks.shards import MANIFEST, shard_name, write_shard
from attacks.storage import atomic_directory, atomic_write_json
from serving.quarantine import IMAGES, INCLUDE, VERDICTS, open_index, utc_iso, utc_now


def _read_image(store: Path, name: str, sha256: str, shape: list[int]) -> np.ndarray:
    """One record's image, checked against the sha256 in the index."""
    path = store / IMAGES / name
    if not path.is_file():
        raise FileNotFoundError(f"quarantine image missing: {path}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"quarantine image {path} is corrupt: its sha256 does not match the index")
    image = np.load(io.BytesIO(data), allow_pickle=False)
    if list(image.shape) != shape:
        raise ValueError(f"quarantine image {path} has shape {image.shape}, the index says {shape}")
    return image


def export_quarantine(
    store: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    include: str = "rejected",
    since: str | dt.datetime | None = None,
    model: str | None = None,
    shard_size: int = 10_000,
) -> dict[str, Any]:
    """Write the store's records (`include`: "rejected" or "all"; from `since` on; of one `model`)
    as an adversarial-only dataset at `out_dir` (a new directory); return its manifest."""
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
    connection = open_index(store)
    try:
        rows = connection.execute(f"SELECT id, image, sha256, shape, classifier_fingerprint FROM records "
                                  f"WHERE {' AND '.join(conditions)} ORDER BY id", parameters).fetchall()
    finally:
        connection.close()
    if out.exists():
        raise FileExistsError(f"{out} already exists: export into a new directory")
    if not rows:
        raise ValueError(f"no quarantined records to export from {store} (include={include}, since={since}, model={model})")
    fingerprints = {row[4] for row in rows}
    if None in fingerprints:
        raise ValueError(f"{sum(row[4] is None for row in rows)} of the records carry no classifier fingerprint, so "
                         "nobody can tell which classifier they were scored for: narrow the export with since/model")
    if len(fingerprints) > 1:
        raise ValueError(f"the records were scored for {len(fingerprints)} different classifiers "
                         f"({', '.join(sorted(f[:12] for f in fingerprints))}): export one at a time with since/model")
    shapes = {row[3] for row in rows}
    if len(shapes) > 1:
        raise ValueError(f"the records hold images of different shapes {sorted(shapes)}: export one model at a time")
    fingerprint, shape = fingerprints.pop(), json.loads(shapes.pop())
    ids = [row[0] for row in rows]
    config = {
        "attack": {"attack": "quarantine", "include": include, "since": since, "model": model},
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
        "started": utc_now(),
    }
    with atomic_directory(out) as temp:
        for start in range(0, len(rows), shard_size):
            chunk = rows[start : start + shard_size]
            x = np.stack([_read_image(store, name, digest, shape) for _, name, digest, _, _ in chunk]).astype(np.float32)
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


def describe_quarantine(store: str | os.PathLike) -> Iterator[str]:
    """Human-readable summary lines of a store (for `safetynet quarantine info`)."""
    connection = open_index(store)
    try:
        verdicts = dict(connection.execute("SELECT verdict, COUNT(*) FROM records GROUP BY verdict").fetchall())
        first, last = connection.execute("SELECT MIN(time), MAX(time) FROM records").fetchone()
        models = connection.execute("SELECT model, COUNT(*) FROM records GROUP BY model ORDER BY model").fetchall()
        classifiers = connection.execute("SELECT classifier_fingerprint, COUNT(*) FROM records "
                                         "GROUP BY classifier_fingerprint ORDER BY 2 DESC").fetchall()
    finally:
        connection.close()
    yield f"store:       {store}"
    yield "records:     " + ", ".join(f"{verdicts.get(v, 0)} {v}" for v in VERDICTS)
    yield f"time:        {first or '-'} .. {last or '-'}"
    yield "models:      " + (", ".join(f"{name} ({n})" for name, n in models) or "-")
    yield "classifiers: " + (", ".join(f"{(f or 'unknown')[:16]} ({n})" for f, n in classifiers) or "-")
