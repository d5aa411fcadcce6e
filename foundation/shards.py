"""Adversarial datasets at rest: deterministic npz shards, the manifest, verification and loading.

Layout of a dataset directory:

    manifest.json        format version, config (attack and parameters, classifier fingerprint,
                         source, shard size, part) and its hash, each shard's file name, count and
                         sha256, totals, success rate, versions, start/end time
    shard-00000.npz      x_clean, x_adv (float32 NHWC), y, target, success, linf, l2, index

Why npz: shards need nothing beyond numpy to read (a JAX-only GPU machine has no TensorFlow for
TFRecord), load straight into `model.fit` or `tf.data`, and `np.load(allow_pickle=False)` can never
run code. The shards are written with fixed zip timestamps, so the same inputs give the same bytes
and an interrupted, resumed run is byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from foundation.storage import atomic_write, read_json, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_KEYS = ("x_clean", "x_adv", "y", "target", "success", "linf", "l2", "index")
_EPOCH = (1980, 1, 1, 0, 0, 0)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npz"


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write one shard atomically, byte-for-byte reproducible; return its sha256."""
    missing = set(SHARD_KEYS) - set(arrays)
    if missing:
        raise ValueError(f"shard arrays lack {sorted(missing)}")

    def write(temp: Path) -> None:
        with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED) as archive:
            for key in SHARD_KEYS:
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
                with archive.open(info, "w", force_zip64=True) as stream:
                    np.lib.format.write_array(stream, np.ascontiguousarray(arrays[key]), allow_pickle=False)

    atomic_write(path, write)
    return sha256_file(path)


def read_manifest(directory: str | os.PathLike, *, complete: bool = True) -> dict[str, Any]:
    """The manifest of a dataset directory, checked for format (and, by default, completeness)."""
    manifest = read_json(Path(directory) / MANIFEST, "adversarial dataset manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"dataset {directory} has format version {version}; this safetynet reads {FORMAT_VERSION}")
    if complete and not manifest.get("complete"):
        raise ValueError(f"dataset {directory} is incomplete (its generation did not finish; rerun it to resume)")
    return manifest


def shard_problem(directory: Path, shard: dict[str, Any]) -> str | None:
    """None when the shard is present and matches its checksum, else what is wrong with it."""
    path = directory / shard["file"]
    if not path.is_file():
        return "missing"
    if sha256_file(path) != shard["sha256"]:
        return "corrupt (sha256 mismatch)"
    return None


def read_shard(directory: Path, shard: dict[str, Any]) -> dict[str, np.ndarray]:
    """One shard's arrays, after checking it against the manifest (refuses corrupt data)."""
    problem = shard_problem(directory, shard)
    if problem == "missing":
        raise FileNotFoundError(f"dataset shard missing: {directory / shard['file']}")
    if problem:
        raise ValueError(f"dataset shard {directory / shard['file']} is corrupt: its sha256 does not match the manifest")
    with np.load(directory / shard["file"], allow_pickle=False) as data:
        return {key: data[key] for key in SHARD_KEYS}


@dataclasses.dataclass(frozen=True)
class Verification:
    """The outcome of checking every shard of a dataset against its manifest."""

    directory: str
    complete: bool
    checked: int
    problems: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems


def verify_dataset(directory: str | os.PathLike) -> Verification:
    """Check presence and sha256 of every shard the manifest lists (complete or not)."""
    directory = Path(directory)
    manifest = read_manifest(directory, complete=False)
    problems = {}
    for shard in manifest["shards"]:
        problem = shard_problem(directory, shard)
        if problem:
            problems[shard["file"]] = problem
    return Verification(str(directory), bool(manifest.get("complete")), len(manifest["shards"]), problems)


@dataclasses.dataclass(frozen=True)
class AdversarialDataset:
    """A loaded, verified adversarial dataset (all arrays in memory: for small sets)."""

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


def iter_shards(directory: str | os.PathLike) -> Iterator[dict[str, np.ndarray]]:
    """Each verified shard in order: streams a dataset of any size with one shard in memory."""
    directory = Path(directory)
    for shard in read_manifest(directory)["shards"]:
        yield read_shard(directory, shard)


def load_adversarial_dataset(directory: str | os.PathLike) -> AdversarialDataset:
    """Load every shard after checking its sha256 against the manifest."""
    parts: dict[str, list[np.ndarray]] = {key: [] for key in SHARD_KEYS}
    for arrays in iter_shards(directory):
        for key in SHARD_KEYS:
            parts[key].append(arrays[key])
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    return AdversarialDataset(manifest=read_manifest(directory), **arrays)


def as_tf_dataset(directory: str | os.PathLike, *, successful_only: bool = False) -> Any:
    """A `tf.data.Dataset` of (image, is_adversarial) pairs, streamed shard by shard, for
    `model.fit` on detectors: each clean image (label 0) followed by its adversarial one (label 1)."""
    import tensorflow as tf

    directory = Path(directory)
    shape = tuple(read_manifest(directory)["image_shape"])

    def pairs() -> Iterator[tuple[np.ndarray, np.float32]]:
        for arrays in iter_shards(directory):
            for clean, adversarial, success in zip(arrays["x_clean"], arrays["x_adv"], arrays["success"], strict=True):
                if successful_only and not success:
                    continue
                yield clean, np.float32(0.0)
                yield adversarial, np.float32(1.0)

    signature = (tf.TensorSpec(shape, tf.float32), tf.TensorSpec((), tf.float32))
    return tf.data.Dataset.from_generator(pairs, output_signature=signature)


def describe(directory: str | os.PathLike) -> Iterator[str]:
    """Human-readable summary lines of a dataset (for `safetynet dataset info`); "complete" only when
    every shard is present and matches its sha256, not merely when the manifest says so."""
    manifest = read_manifest(directory, complete=False)
    attack = dict(manifest["attack"])
    name = attack.pop("attack")
    problems = verify_dataset(directory).problems
    state = "complete" if manifest.get("complete") else "INCOMPLETE"
    if problems:
        state += f", {len(problems)} of {len(manifest['shards'])} shards missing or corrupt: see `safetynet dataset verify`"
    yield f"dataset:    {directory} ({state})"
    yield f"attack:     {name} {json.dumps(attack)}"
    yield f"source:     {json.dumps(manifest['source'])}, part {manifest['part'][0]} of {manifest['part'][1]}"
    yield f"examples:   {manifest['count']} in {len(manifest['shards'])} shards, image shape {manifest['image_shape']}"
    yield f"success:    {manifest['success_rate']:.4f} ({manifest['successes']} of {manifest['count']})"
    yield f"classifier: {manifest['classifier_fingerprint'][:16]}…" + (
        "" if manifest["crafted_on"] == manifest["classifier_fingerprint"] else f" (crafted on {manifest['crafted_on'][:16]}…)"
    )
    yield f"written:    {manifest.get('started')} .. {manifest.get('finished', 'unfinished')}"
