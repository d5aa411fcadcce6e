"""Adversarial datasets on disk: round trip, checksums, completeness, no overwrites."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from attacks import FGSM, PGD
from attacks.dataset import MANIFEST, generate_dataset, load_adversarial_dataset, read_manifest
from attacks.storage import model_fingerprint


@pytest.fixture(scope="module")
def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])


@pytest.fixture()
def source() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (25, 6, 6, 1)).astype("float32"), rng.integers(0, 3, 25)


def test_round_trip_keeps_every_array_and_the_manifest_describes_it(tmp_path, tiny_model, source):
    x, y = source
    attack = PGD(eps=0.1, steps=3)
    manifest = generate_dataset(
        tiny_model, attack, x, y, tmp_path / "ds", shard_size=10, batch_size=8, progress=False,
        index=np.arange(100, 125), source={"data": "synthetic"},
    )
    data = load_adversarial_dataset(tmp_path / "ds")
    direct = attack(tiny_model, x, y, index=np.arange(100, 125), batch_size=7)
    np.testing.assert_array_equal(data.x_clean, x)
    np.testing.assert_array_equal(data.x_adv, direct.x_adv)
    np.testing.assert_array_equal(data.success, direct.success)
    np.testing.assert_array_equal(data.y, y)
    np.testing.assert_array_equal(data.index, np.arange(100, 125))
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["count"] == 25 and manifest["complete"]
    assert manifest["success_rate"] == pytest.approx(direct.success_rate)
    assert manifest["classifier_fingerprint"] == model_fingerprint(tiny_model)
    assert manifest["attack"] == attack.params() and manifest["source"] == {"data": "synthetic"}
    assert data.attack == "pgd"


def test_a_flipped_byte_in_a_shard_is_refused(tmp_path, tiny_model, source):
    x, y = source
    generate_dataset(tiny_model, FGSM(eps=0.1), x, y, tmp_path / "ds", shard_size=10, progress=False)
    shard = tmp_path / "ds" / "shard-00001.npz"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-00001.npz is corrupt"):
        load_adversarial_dataset(tmp_path / "ds")


def test_missing_shard_incomplete_and_newer_datasets_are_refused(tmp_path, tiny_model, source):
    x, y = source
    directory = tmp_path / "ds"
    generate_dataset(tiny_model, FGSM(eps=0.1), x, y, directory, shard_size=10, progress=False)
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps(manifest | {"complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        read_manifest(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        read_manifest(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    (directory / "shard-00002.npz").unlink()
    with pytest.raises(FileNotFoundError, match="shard missing"):
        load_adversarial_dataset(directory)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_adversarial_dataset(tmp_path / "nowhere")


def test_an_existing_dataset_is_never_overwritten_and_empty_sources_are_refused(tmp_path, tiny_model, source):
    x, y = source
    generate_dataset(tiny_model, FGSM(eps=0.1), x, y, tmp_path / "ds", progress=False)
    before = (tmp_path / "ds" / MANIFEST).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        generate_dataset(tiny_model, FGSM(eps=0.2), x, y, tmp_path / "ds", progress=False)
    assert (tmp_path / "ds" / MANIFEST).read_bytes() == before
    with pytest.raises(ValueError, match="source data is empty"):
        generate_dataset(tiny_model, FGSM(eps=0.1), x[:0], y[:0], tmp_path / "empty", progress=False)


def test_bad_data_is_refused_before_anything_is_written(tmp_path, tiny_model, source):
    x, y = source
    x_bad = x.copy()
    x_bad[15] = np.nan  # in the second shard
    with pytest.raises(ValueError, match="NaN"):
        generate_dataset(tiny_model, FGSM(eps=0.1), x_bad, y, tmp_path / "ds", shard_size=10, progress=False)
    assert not (tmp_path / "ds").exists()


def test_a_run_that_dies_mid_way_leaves_an_incomplete_dataset_and_no_temp_files(tmp_path, tiny_model, source):
    x, y = source
    calls = []

    class DiesOnSecondShard(FGSM):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return super().__call__(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tiny_model, DiesOnSecondShard(eps=0.1), x, y, tmp_path / "ds", shard_size=10, progress=False)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [MANIFEST, "shard-00000.npz"]
    with pytest.raises(ValueError, match="incomplete"):
        load_adversarial_dataset(tmp_path / "ds")
