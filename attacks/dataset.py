"""Adversarial datasets on disk: npz shards of clean/adversarial pairs plus a JSON manifest.

Layout of a dataset directory:

    manifest.json        format version, attack and parameters, classifier fingerprint, source,
                         counts, success rate, and each shard's file name, count and sha256
    shard-00000.npz      x_clean, x_adv (float32 NHWC), y, target, success, linf, l2, index

Shards are npz (no pickle: `allow_pickle=False` on load) because they need nothing beyond numpy,
load straight into `model.fit`, and each one is small enough to write atomically. The manifest is
rewritten (atomically) after every shard and says `"complete": true` only at the end, so a dataset
cut off mid-run is recognisable and the loader refuses it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm.auto import tqdm

from attacks.base import Attack, check_images, check_labels, check_model_input
from attacks.storage import (
    atomic_write,
    atomic_write_json,
    model_fingerprint,
    read_json,
    sha256_file,
)
from attacks.transfer import fools

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_KEYS = ("x_clean", "x_adv", "y", "target", "success", "linf", "l2", "index")


@dataclasses.dataclass(frozen=True)
class AdversarialDataset:
    """A loaded, verified adversarial dataset (all arrays in memory)."""

    manifest: dict[str, Any]
    x_clean: np.ndarray
    x_adv: np.ndarray
    y: np.ndarray
    target: np.ndarray
    success: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    index: np.ndarray

    @property
    def attack(self) -> str:
        return str(self.manifest["attack"]["attack"])


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def generate_dataset(
    model: keras.Model,
    attack: Attack,
    x: np.ndarray,
    y: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    targets: np.ndarray | str | None = None,
    index: np.ndarray | None = None,
    transfer_to: keras.Model | None = None,
    source: dict[str, Any] | None = None,
    shard_size: int = 10_000,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack `x` shard by shard and write the dataset to `out_dir`; return the final manifest.

    `index` records where each input came from in its source (default 0..n-1); `source` is any
    JSON-able description of the data (spec, split) kept in the manifest. With `transfer_to`, the
    examples are crafted on `model` (a surrogate) and their success flags say whether they fool
    `transfer_to` (the target), whose fingerprint the manifest then records as the classifier's.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if len(x) == 0:
        raise ValueError("the source data is empty: nothing to attack")
    # validate everything before the first byte is written
    x = check_images(x, attack.clip)
    num_classes = check_model_input(model, x)
    y = check_labels(y, len(x), num_classes)
    if targets is not None and not isinstance(targets, str):
        targets = check_labels(targets, len(x), num_classes, "targets")
    if transfer_to is not None:
        check_model_input(transfer_to, x)
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds a dataset; choose a new directory or delete it")
    index = np.arange(len(x)) if index is None else np.asarray(index)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "attack": attack.params(),
        "classifier_fingerprint": model_fingerprint(transfer_to or model),
        "crafted_on": model_fingerprint(model),
        "source": source or {},
        "targeted": targets is not None,
        "count": 0,
        "successes": 0,
        "success_rate": 0.0,
        "shards": [],
        "complete": False,
        "versions": _versions(),
        "started": _now(),
    }
    bar = tqdm(total=len(x), desc=attack.name, unit="img", disable=not progress)
    for number, start in enumerate(range(0, len(x), shard_size)):
        stop = start + shard_size
        result = attack(
            model, x[start:stop], y[start:stop],
            targets=targets if targets is None or isinstance(targets, str) else targets[start:stop],
            index=index[start:stop], batch_size=batch_size, progress=bar,
        )
        success = result.success
        if transfer_to is not None:
            success = fools(transfer_to, result.x_adv, y[start:stop], result.targets, batch_size)
        arrays = {
            "x_clean": x[start:stop].astype(np.float32),
            "x_adv": result.x_adv,
            "y": y[start:stop].astype(np.int64),
            "target": (y[start:stop] if result.targets is None else result.targets).astype(np.int64),
            "success": success,
            "linf": result.linf,
            "l2": result.l2,
            "index": index[start:stop].astype(np.int64),
        }
        name = f"shard-{number:05d}.npz"
        atomic_write(out / name, lambda temp, arrays=arrays: np.savez(temp, **arrays))
        manifest["shards"].append({"file": name, "count": len(success), "sha256": sha256_file(out / name)})
        manifest["count"] += len(success)
        manifest["successes"] += int(success.sum())
        manifest["success_rate"] = manifest["successes"] / manifest["count"]
        atomic_write_json(out / MANIFEST, manifest)
    bar.close()
    manifest["complete"] = True
    manifest["finished"] = _now()
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a dataset directory, checked for format and completeness."""
    manifest = read_json(Path(directory) / MANIFEST, "adversarial dataset manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"dataset {directory} has format version {version}; this safetynet reads {FORMAT_VERSION}"
        )
    if not manifest.get("complete"):
        raise ValueError(f"dataset {directory} is incomplete (its generation did not finish)")
    return manifest


def load_adversarial_dataset(directory: str | os.PathLike) -> AdversarialDataset:
    """Load every shard after checking its sha256 against the manifest; refuse corrupt data."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in SHARD_KEYS}
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"dataset shard missing: {path}")
        if sha256_file(path) != shard["sha256"]:
            raise ValueError(f"dataset shard {path} is corrupt: its sha256 does not match the manifest")
        with np.load(path, allow_pickle=False) as data:
            for key in SHARD_KEYS:
                parts[key].append(data[key])
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    return AdversarialDataset(manifest=manifest, **arrays)
