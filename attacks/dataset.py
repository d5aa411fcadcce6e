"""Generating adversarial datasets: streamed, sharded, resumable, split across hosts and merged.

The source is streamed a shard at a time (never the whole dataset in memory). Every shard and the
manifest are written atomically; the manifest is rewritten after each shard. Rerunning the same
command after a crash skips the shards that landed intact and redoes the rest, giving the same bytes
as an uninterrupted run; a run with other parameters into the same directory is refused.

`part=(i, n)` makes this run produce only the i-th of n contiguous parts of the source, so n hosts
(a Kubernetes Job, a Slurm array) can each run one; `merge_datasets` joins the parts.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
from tqdm.auto import tqdm

from foundation.backend import local_strategy
from attacks.base import Attack
from foundation.validation import check_labels, check_model_input
from foundation.shards import (
    FORMAT_VERSION, MANIFEST, AdversarialDataset, Verification, as_tf_dataset, describe, iter_shards,
    load_adversarial_dataset, read_manifest, shard_name, shard_problem, verify_dataset, write_shard,
)
from foundation.storage import atomic_directory, atomic_write_json, model_fingerprint, remembered_fingerprints
from attacks.sources import ArraySource, NpySource, Source
from attacks.transfer import fools

__all__ = [
    "AdversarialDataset", "ArraySource", "NpySource", "Source", "Verification", "as_tf_dataset", "describe",
    "generate_dataset", "iter_shards", "load_adversarial_dataset", "merge_datasets", "read_manifest", "verify_dataset",
]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _part_range(count: int, part: tuple[int, int]) -> tuple[int, int]:
    i, n = part
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"part must be (i, n) with 0 <= i < n, got {part}")
    return i * count // n, (i + 1) * count // n


def _config(attack: Attack, model: keras.Model, transfer_to: keras.Model | None, source: dict, count: int,
            shard_size: int, part: tuple[int, int], targets: Any) -> dict[str, Any]:
    return {
        "attack": attack.get_params(),
        "classifier_fingerprint": model_fingerprint(transfer_to or model),
        "crafted_on": model_fingerprint(model),
        "source": source,
        "source_count": count,
        "shard_size": shard_size,
        "part": list(part),
        "targets": targets if isinstance(targets, str) or targets is None else "given",
    }


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _resume(out: Path, config_hash: str) -> dict[str, Any] | None:
    """The manifest of an earlier run with the same config (None when there is none); its shards
    that are missing or corrupt, and all after them, are dropped so they are redone."""
    if not (out / MANIFEST).exists():
        return None
    manifest = read_manifest(out, complete=False)
    for leftover in [*out.glob(".shard-*"), *out.glob(f".{MANIFEST}.*")]:  # temp files of a killed run
        leftover.unlink()
    if manifest.get("config_hash") != config_hash:
        raise ValueError(
            f"{out} holds a dataset made with other parameters (attack, model, source, shard size or part); "
            "choose a new directory or delete it"
        )
    kept = []
    for shard in manifest["shards"]:
        if shard_problem(out, shard):
            break
        kept.append(shard)
    manifest["shards"] = kept
    return manifest


@remembered_fingerprints()  # the model is hashed once for the manifest's two fingerprints
def generate_dataset(
    model: keras.Model,
    attack: Attack,
    source: Source,
    out_dir: str | os.PathLike,
    *,
    source_info: dict[str, Any] | None = None,
    targets: np.ndarray | str | None = None,
    transfer_to: keras.Model | None = None,
    part: tuple[int, int] = (0, 1),
    shard_size: int = 10_000,
    batch_size: int = 256,
    strategy: Any = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Attack the source shard by shard into `out_dir` (resuming an interrupted run); return the manifest.

    `targets`: None (untargeted), "random", "least_likely", or an array over the whole source.
    With `transfer_to`, examples are crafted on `model` (a surrogate) and `success` says whether they
    fool `transfer_to` (the target), whose fingerprint the manifest records as the classifier's.
    `strategy`: "auto" spreads each batch over all local GPUs (MirroredStrategy) when there are
    several; or a `tf.distribute` strategy; or None for one device.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    count = len(source)
    if count == 0:
        raise ValueError("the source data is empty: nothing to attack")
    first_x, _, _ = source.read(0, 1)
    num_classes = check_model_input(model, first_x)
    if transfer_to is not None:
        check_model_input(transfer_to, first_x)
    if targets is not None and not isinstance(targets, str):
        targets = check_labels(targets, count, num_classes, "targets")
    if strategy == "auto":
        strategy = local_strategy()
    lo, hi = _part_range(count, part)
    if hi <= lo:
        raise ValueError(f"part {part[0]} of {part[1]} of {count} source images is empty")
    config = _config(attack, model, transfer_to, source_info or {}, count, shard_size, part, targets)
    out = Path(out_dir)
    manifest = _resume(out, _config_hash(config)) or {
        "format_version": FORMAT_VERSION, **config, "config_hash": _config_hash(config),
        "image_shape": list(first_x.shape[1:]), "shards": [], "versions": _versions(), "started": _now(),
    }
    manifest.update(complete=False, range=[lo, hi])
    _update_totals(manifest)
    done = manifest["count"]
    starts = range(lo + done, hi, shard_size)
    bar = tqdm(total=hi - lo, initial=done, desc=attack.name, unit="img", disable=not progress, smoothing=0.1)
    began = time.perf_counter()

    def land(name: str, count: int, successes: int, written: Future) -> None:
        """Record a shard in the manifest once its file is on disk (in order, so resume stays exact)."""
        manifest["shards"].append({"file": name, "count": count, "successes": successes, "sha256": written.result()})
        _update_totals(manifest)
        atomic_write_json(out / MANIFEST, manifest)
        bar.set_postfix(success=f"{manifest['success_rate']:.3f}")

    # shard k is written by a background thread while shard k+1 is attacked (TensorFlow and JAX
    # release the GIL while they compute), so file I/O and checksums cost almost no attack time
    pending: tuple | None = None
    with ThreadPoolExecutor(max_workers=1) as writer:
        for start in starts:
            stop = min(start + shard_size, hi)
            arrays = _attack_shard(model, attack, source, start, stop, targets, transfer_to, batch_size, bar, strategy)
            if pending:
                land(*pending)
            name = shard_name(len(manifest["shards"]))
            pending = (name, len(arrays["y"]), int(arrays["success"].sum()), writer.submit(write_shard, out / name, arrays))
        if pending:
            land(*pending)
    bar.close()
    manifest.update(complete=True, finished=_now())
    atomic_write_json(out / MANIFEST, manifest)
    if progress and starts:
        seconds = time.perf_counter() - began
        done_now = manifest["count"] - done
        print(f"{attack.name}: {done_now} images in {seconds:.1f} s ({done_now / seconds:.1f} img/s), "
              f"success rate {manifest['success_rate']:.4f} -> {out}")
    return manifest


def _attack_shard(model: keras.Model, attack: Attack, source: Source, start: int, stop: int, targets: Any,
                  transfer_to: keras.Model | None, batch_size: int, bar: tqdm, strategy: Any) -> dict[str, np.ndarray]:
    """The arrays of one shard: source positions [start, stop) and their attack results."""
    x, y, index = source.read(start, stop)
    result = attack(
        model, x, y, index=index, batch_size=batch_size, progress=bar, strategy=strategy,
        targets=targets if targets is None or isinstance(targets, str) else targets[start:stop],
    )
    success = result.success if transfer_to is None else fools(transfer_to, result.x_adv, y, result.targets, batch_size)
    return {
        "x_clean": x, "x_adv": result.x_adv, "y": y.astype(np.int64),
        "target": (y if result.targets is None else result.targets).astype(np.int64),
        "success": success, "linf": result.linf, "l2": result.l2, "index": index.astype(np.int64),
    }


def _update_totals(manifest: dict[str, Any]) -> None:
    manifest["count"] = sum(s["count"] for s in manifest["shards"])
    manifest["successes"] = sum(s["successes"] for s in manifest["shards"])
    manifest["success_rate"] = manifest["successes"] / manifest["count"] if manifest["count"] else 0.0


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "numpy": np.__version__, "keras": keras.__version__,
            "backend": keras.backend.backend()}


def merge_datasets(parts: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Join the complete parts of a `part=(i, n)` run (all n of them) into one dataset at `out_dir`."""
    manifests = [read_manifest(p) for p in parts]
    if not manifests:
        raise ValueError("merge needs at least one dataset part")
    first = manifests[0]
    keys = ("attack", "classifier_fingerprint", "crafted_on", "source", "source_count", "shard_size", "targets")
    for path, manifest in zip(parts, manifests, strict=True):
        if any(manifest.get(k) != first.get(k) for k in keys):
            raise ValueError(f"{path} was made with other parameters than {parts[0]}: parts of one run only")
    total = first["part"][1]
    found = sorted(m["part"][0] for m in manifests)
    if found != list(range(total)) or any(m["part"][1] != total for m in manifests):
        raise ValueError(f"merge needs each of the {total} parts exactly once, got parts {found}")
    ordered = sorted(zip(manifests, parts, strict=True), key=lambda pair: pair[0]["part"][0])
    config = {k: first[k] for k in keys} | {"part": [0, 1]}
    merged = {"format_version": FORMAT_VERSION, **config, "config_hash": _config_hash(config),
              "image_shape": first["image_shape"], "shards": [], "merged_from": [str(p) for p in parts],
              "versions": _versions(), "started": min(m["started"] for m in manifests)}
    with atomic_directory(out_dir) as temp:
        for manifest, path in ordered:
            for shard in manifest["shards"]:
                if shard_problem(Path(path), shard):
                    raise ValueError(f"{Path(path) / shard['file']} is missing or corrupt: run `safetynet dataset verify`")
                name = shard_name(len(merged["shards"]))
                shutil.copyfile(Path(path) / shard["file"], temp / name)
                merged["shards"].append(shard | {"file": name})
        _update_totals(merged)
        merged.update(range=[0, first["source_count"]], complete=True, finished=_now())
        atomic_write_json(temp / MANIFEST, merged)
    return merged
