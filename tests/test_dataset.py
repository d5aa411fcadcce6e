"""Adversarial datasets on disk: shards, checksums, resume after a kill, parts and merge."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from attacks import FGSM, PGD
from attacks.dataset import (
    ArraySource, as_tf_dataset, generate_dataset, load_adversarial_dataset, merge_datasets, read_manifest,
    verify_dataset,
)
from foundation.shards import MANIFEST
from foundation.storage import model_fingerprint


@pytest.fixture(scope="module")
def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])


@pytest.fixture()
def source() -> ArraySource:
    rng = np.random.default_rng(0)
    return ArraySource(rng.uniform(0, 1, (25, 6, 6, 1)).astype("float32"), rng.integers(0, 3, 25), np.arange(100, 125))


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.npz"))}


def test_round_trip_keeps_every_array_and_the_manifest_describes_it(tmp_path, tiny_model, source):
    attack = PGD(eps=0.1, steps=3)
    manifest = generate_dataset(
        tiny_model, attack, source, tmp_path / "ds", shard_size=10, batch_size=8, progress=False,
        source_info={"data": "synthetic"},
    )
    data = load_adversarial_dataset(tmp_path / "ds")
    direct = attack(tiny_model, source.x, source.y, index=source.index, batch_size=7)
    np.testing.assert_array_equal(data.x_clean, source.x)
    np.testing.assert_array_equal(data.x_adv, direct.x_adv)
    np.testing.assert_array_equal(data.success, direct.success)
    np.testing.assert_array_equal(data.y, source.y)
    np.testing.assert_array_equal(data.index, source.index)
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["count"] == 25 and manifest["complete"]
    assert manifest["success_rate"] == pytest.approx(direct.success_rate)
    assert manifest["classifier_fingerprint"] == model_fingerprint(tiny_model)
    assert manifest["attack"] == attack.get_params() and manifest["source"] == {"data": "synthetic"}
    assert manifest["image_shape"] == [6, 6, 1] and data.attack == "pgd"


@pytest.mark.parametrize("count, shard_size, shards", [(25, 10, [10, 10, 5]), (7, 10, [7]), (20, 10, [10, 10]), (3, 1, [1, 1, 1])])
def test_shard_boundaries(tmp_path, tiny_model, source, count, shard_size, shards):
    part = ArraySource(source.x[:count], source.y[:count])
    manifest = generate_dataset(tiny_model, FGSM(eps=0.1), part, tmp_path / "ds", shard_size=shard_size, progress=False)
    assert [s["count"] for s in manifest["shards"]] == shards
    assert len(load_adversarial_dataset(tmp_path / "ds").x_adv) == count


def test_same_inputs_give_the_same_bytes(tmp_path, tiny_model, source):
    for name in ("a", "b"):
        generate_dataset(tiny_model, PGD(eps=0.1, steps=2), source, tmp_path / name, shard_size=10, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_a_flipped_byte_is_caught_by_verify_and_by_the_loader(tmp_path, tiny_model, source):
    generate_dataset(tiny_model, FGSM(eps=0.1), source, tmp_path / "ds", shard_size=10, progress=False)
    assert verify_dataset(tmp_path / "ds").ok
    shard = tmp_path / "ds" / "shard-00001.npz"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    report = verify_dataset(tmp_path / "ds")
    assert not report.ok and report.problems == {"shard-00001.npz": "corrupt (sha256 mismatch)"}
    with pytest.raises(ValueError, match="shard-00001.npz is corrupt"):
        load_adversarial_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "shard-00002.npz").unlink()
    assert verify_dataset(tmp_path / "ds").problems["shard-00002.npz"] == "missing"


def test_incomplete_newer_and_missing_datasets_are_refused(tmp_path, tiny_model, source):
    directory = tmp_path / "ds"
    generate_dataset(tiny_model, FGSM(eps=0.1), source, directory, shard_size=10, progress=False)
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps(manifest | {"complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        read_manifest(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        read_manifest(directory)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_adversarial_dataset(tmp_path / "nowhere")


def test_other_parameters_into_the_same_directory_are_refused(tmp_path, tiny_model, source):
    generate_dataset(tiny_model, FGSM(eps=0.1), source, tmp_path / "ds", shard_size=10, progress=False)
    before = shard_bytes(tmp_path / "ds")
    for attack, shard_size in ((FGSM(eps=0.2), 10), (FGSM(eps=0.1), 5)):
        with pytest.raises(ValueError, match="other parameters"):
            generate_dataset(tiny_model, attack, source, tmp_path / "ds", shard_size=shard_size, progress=False)
    assert shard_bytes(tmp_path / "ds") == before


def test_rerunning_a_complete_dataset_changes_nothing(tmp_path, tiny_model, source):
    first = generate_dataset(tiny_model, FGSM(eps=0.1), source, tmp_path / "ds", shard_size=10, progress=False)
    before = shard_bytes(tmp_path / "ds")
    again = generate_dataset(tiny_model, FGSM(eps=0.1), source, tmp_path / "ds", shard_size=10, progress=False)
    assert shard_bytes(tmp_path / "ds") == before and again["shards"] == first["shards"]


def test_empty_sources_and_bad_parts_are_refused(tmp_path, tiny_model, source):
    with pytest.raises(ValueError, match="source data is empty"):
        generate_dataset(tiny_model, FGSM(eps=0.1), ArraySource(source.x[:0], source.y[:0]), tmp_path / "e", progress=False)
    for part in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="part must be"):
            generate_dataset(tiny_model, FGSM(eps=0.1), source, tmp_path / "p", part=part, progress=False)
    with pytest.raises(ValueError, match="is empty"):
        generate_dataset(tiny_model, FGSM(eps=0.1), ArraySource(source.x[:2], source.y[:2]), tmp_path / "p", part=(0, 3), progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()


def test_a_corrupt_shard_is_redone_on_resume(tmp_path, tiny_model, source):
    generate_dataset(tiny_model, PGD(eps=0.1, steps=2), source, tmp_path / "ref", shard_size=10, progress=False)
    generate_dataset(tiny_model, PGD(eps=0.1, steps=2), source, tmp_path / "ds", shard_size=10, progress=False)
    (tmp_path / "ds" / "shard-00001.npz").write_bytes(b"torn")
    generate_dataset(tiny_model, PGD(eps=0.1, steps=2), source, tmp_path / "ds", shard_size=10, progress=False)
    assert shard_bytes(tmp_path / "ds") == shard_bytes(tmp_path / "ref")
    assert verify_dataset(tmp_path / "ds").ok


def test_parts_merge_to_the_content_of_one_run(tmp_path, tiny_model, source):
    attack = PGD(eps=0.1, steps=2)
    generate_dataset(tiny_model, attack, source, tmp_path / "whole", shard_size=4, progress=False)
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, path in enumerate(parts):
        generate_dataset(tiny_model, attack, source, path, shard_size=4, part=(i, 3), progress=False)
    with pytest.raises(ValueError, match="each of the 3 parts exactly once"):
        merge_datasets(parts[:2], tmp_path / "merged")
    merged = merge_datasets(list(reversed(parts)), tmp_path / "merged")
    whole, joined = load_adversarial_dataset(tmp_path / "whole"), load_adversarial_dataset(tmp_path / "merged")
    for key in ("x_clean", "x_adv", "y", "success", "index", "l2"):
        np.testing.assert_array_equal(getattr(joined, key), getattr(whole, key))
    assert merged["count"] == 25 and merged["part"] == [0, 1]
    generate_dataset(tiny_model, FGSM(eps=0.1), source, tmp_path / "other", shard_size=4, part=(1, 3), progress=False)
    with pytest.raises(ValueError, match="other parameters"):
        merge_datasets([parts[0], tmp_path / "other", parts[2]], tmp_path / "bad")


def test_tf_dataset_streams_clean_and_adversarial_pairs(tmp_path, tiny_model, source):
    pytest.importorskip("tensorflow")
    generate_dataset(tiny_model, FGSM(eps=0.1), source, tmp_path / "ds", shard_size=10, progress=False)
    data = load_adversarial_dataset(tmp_path / "ds")
    pairs = list(as_tf_dataset(tmp_path / "ds").as_numpy_iterator())
    assert len(pairs) == 50
    np.testing.assert_array_equal(np.stack([p[0] for p in pairs[0::2]]), data.x_clean)
    np.testing.assert_array_equal(np.stack([p[0] for p in pairs[1::2]]), data.x_adv)
    assert [p[1] for p in pairs[:4]] == [0.0, 1.0, 0.0, 1.0]


SCRIPT = """
import sys, numpy as np, keras
from attacks import PGD
from attacks.dataset import ArraySource, generate_dataset
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(8, 3), keras.layers.Flatten(), keras.layers.Dense(4)])
rng = np.random.default_rng(0)
source = ArraySource(rng.uniform(0, 1, (600, 16, 16, 1)).astype("float32"), rng.integers(0, 4, 600))
generate_dataset(model, PGD(eps=0.1, steps=40), source, sys.argv[1], shard_size=50, batch_size=25, progress=False)
"""


def _run(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], env=env)


@pytest.mark.slow  # 20 s on 2 cores: pytest -m slow
def test_kill_and_resume_gives_the_bytes_of_an_uninterrupted_run(tmp_path):
    assert _run(tmp_path / "ref").wait(timeout=300) == 0
    victim = _run(tmp_path / "ds")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((tmp_path / "ds").glob("shard-*.npz"))) < 3:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    landed = len(list((tmp_path / "ds").glob("shard-*.npz")))
    assert 0 < landed < 12, "the run must be killed mid-way"
    assert not read_manifest(tmp_path / "ds", complete=False)["complete"]
    assert _run(tmp_path / "ds").wait(timeout=300) == 0
    assert shard_bytes(tmp_path / "ds") == shard_bytes(tmp_path / "ref")
    assert verify_dataset(tmp_path / "ds").ok
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".")]
