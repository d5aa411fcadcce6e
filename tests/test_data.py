"""Tests for training.data: every source, the pickle allowlist, and one error per bad input."""
from __future__ import annotations

import builtins
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import pytest

import training.data as data_module
from training.data import ImageDataset, load_dataset

DIGITS = tuple("0123456789")
BLUE_BGR, RED_BGR = (255, 0, 0), (0, 0, 255)


def _check_layout(ds: ImageDataset) -> None:
    """The output contract shared by every source."""
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert x.ndim == 4 and x.shape[1:] == ds.input_shape and len(x) == len(y)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() < ds.num_classes


def _write_npz(path: Path, n_train: int = 5, n_test: int = 3, **overrides: Any) -> Path:
    """A small valid .npz in Keras layout; overrides replace (or, as None, drop) keys."""
    arrays = {"x_train": np.full((n_train, 6, 6), 200, np.uint8), "y_train": np.arange(n_train) % 2,
              "x_test": np.zeros((n_test, 6, 6), np.uint8), "y_test": np.arange(n_test) % 2}
    arrays.update(overrides)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def _write_images(folder: Path, color: tuple[int, ...] | int, sizes: list[tuple[int, int]]) -> None:
    """One uniform png per (H, W) in sizes; color is a BGR triple or a gray level."""
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        shape = (h, w) if isinstance(color, int) else (h, w, 3)
        assert cv2.imwrite(str(folder / f"img{i}.png"), np.full(shape, color, np.uint8))


def _write_batch(path: Path, data: Any, labels: Any, protocol: int = 4,
                 label_key: bytes = b"labels") -> None:
    """A CIFAR-style pickle batch: a dict with bytes keys."""
    with path.open("wb") as f:
        pickle.dump({b"data": data, label_key: labels}, f, protocol=protocol)


# --- built-in names ------------------------------------------------------------------------------

def test_digits_shape_range_and_stratified_split() -> None:
    ds = load_dataset("digits")
    _check_layout(ds)
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10 and ds.class_names == DIGITS
    assert (len(ds.x_train), len(ds.x_test)) == (1437, 360)
    assert ds.x_train.max() == 1.0  # pixel 16 -> 1.0: scaled by 16
    np.testing.assert_allclose(ds.x_train * 16, np.round(ds.x_train * 16), atol=1e-5)
    counts = np.bincount(ds.y_test, minlength=10) / np.bincount(
        np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    np.testing.assert_allclose(counts, 0.2, atol=0.02)


def test_digits_split_follows_seed_and_fraction() -> None:
    a, b, c = (load_dataset("digits", seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)
    assert len(load_dataset("digits", test_fraction=0.5).x_test) == 899
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        load_dataset("digits", test_fraction=1.5)


@pytest.mark.parametrize("name, image_shape, label_shape, first_class", [
    ("mnist", (28, 28), (4,), "0"),
    ("fashion_mnist", (28, 28), (4,), "T-shirt/top"),
    ("cifar10", (32, 32, 3), (4, 1), "airplane"),
])
def test_keras_names_dispatch_to_keras_datasets(monkeypatch: pytest.MonkeyPatch, name: str,
                                                image_shape: tuple[int, ...],
                                                label_shape: tuple[int, ...],
                                                first_class: str) -> None:
    calls = []

    def fake_load_data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        calls.append(name)
        x, y = np.full((4, *image_shape), 255, np.uint8), np.arange(4, dtype=np.uint8)
        return (x, y.reshape(label_shape)), (x[:2], y[:2].reshape(2, *label_shape[1:]))

    monkeypatch.setattr(getattr(keras.datasets, name), "load_data", fake_load_data)
    ds = load_dataset(name)
    assert calls == [name]
    _check_layout(ds)
    assert ds.input_shape == (*image_shape[:2], 3 if len(image_shape) == 3 else 1)
    assert ds.class_names[0] == first_class and ds.num_classes == 10
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 3])
    assert ds.x_train.max() == 1.0


def test_module_import_does_not_load_tensorflow() -> None:
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('data_probe', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); sys.modules['data_probe'] = module; "
            "spec.loader.exec_module(module); "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, data_module.__file__],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- shared real data ----------------------------------------------------------------------------

def test_mnist_npz_from_shared_data(shared_data: Path) -> None:
    ds = load_dataset(str(shared_data / "mnist" / "mnist_keras_arrays.npz"))
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert abs(ds.x_train.mean(dtype=np.float64) * 255 - 33.318) < 1e-3
    np.testing.assert_array_equal(ds.y_train[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    assert ds.class_names == DIGITS
    _check_layout(ds)


def test_cifar_batches_from_shared_data(shared_data: Path) -> None:
    ds = load_dataset(str(shared_data / "cifar10"))
    assert ds.x_train.shape == (20000, 32, 32, 3) and ds.x_test.shape == (1000, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train[:10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3])
    np.testing.assert_array_equal(ds.y_test[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
    assert ds.class_names[:2] == ("airplane", "automobile") and ds.num_classes == 10
    # the first 10 red-plane bytes of image 0 form the top row of its red channel
    np.testing.assert_array_equal(np.round(ds.x_train[0, 0, :10, 0] * 255),
                                  [59, 43, 50, 68, 98, 119, 139, 145, 149, 149])
    _check_layout(ds)


# --- CIFAR pickles -------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_planes_to_nhwc_for_any_protocol(tmp_path: Path, protocol: int) -> None:
    data = np.random.default_rng(0).integers(0, 256, (6, 3072), dtype=np.uint8)
    _write_batch(tmp_path / "data_batch_1", data[:2], [0, 1], protocol)
    _write_batch(tmp_path / "data_batch_2", data[2:4], [2, 1], protocol)
    _write_batch(tmp_path / "test_batch", data[4:], [2, 0], protocol, label_key=b"fine_labels")
    ds = load_dataset(str(tmp_path))
    expected = data.reshape(6, 3, 32, 32).transpose(0, 2, 3, 1) / 255
    np.testing.assert_allclose(ds.x_train, expected[:4], atol=1e-6)
    np.testing.assert_allclose(ds.x_test, expected[4:], atol=1e-6)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 1])
    assert ds.class_names == ("0", "1", "2")  # no batches.meta
    _check_layout(ds)


class _Exploit:
    """Pickles as a call to func(arg) -- what a crafted batch file would do."""

    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.func, (self.arg,)


@pytest.mark.parametrize("file_name", ["data_batch_1", "batches.meta"])
def test_cifar_pickle_with_os_system_is_refused(tmp_path: Path, file_name: str) -> None:
    marker = tmp_path / "pwned"
    _write_batch(tmp_path / "data_batch_1", np.zeros((1, 3072), np.uint8), [0])
    _write_batch(tmp_path / "test_batch", np.zeros((1, 3072), np.uint8), [0])
    exploit = _Exploit(os.system, f"touch {shlex.quote(str(marker))}")
    with (tmp_path / file_name).open("wb") as f:
        pickle.dump({b"data": exploit, b"labels": [0], b"label_names": exploit}, f)
    with pytest.raises(pickle.UnpicklingError, match=rf"{file_name}.*(posix|nt|os)\.system"):
        load_dataset(str(tmp_path))
    assert not marker.exists()


def test_cifar_pickle_with_builtin_eval_is_refused(tmp_path: Path) -> None:
    _write_batch(tmp_path / "data_batch_1", _Exploit(builtins.eval, "1 + 1"), [0])
    _write_batch(tmp_path / "test_batch", np.zeros((1, 3072), np.uint8), [0])
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        load_dataset(str(tmp_path))


# --- image folders -------------------------------------------------------------------------------

def test_image_folder_classes_size_range_and_rgb_order(tmp_path: Path) -> None:
    _write_images(tmp_path / "cat", BLUE_BGR, [(12, 10), (20, 20), (9, 14), (12, 10), (30, 8)])
    _write_images(tmp_path / "dog", RED_BGR, [(5, 5), (12, 10), (40, 30), (7, 11), (16, 16)])
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\x00junk")  # hidden files are skipped
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes
    ds = load_dataset(str(tmp_path))
    _check_layout(ds)
    assert ds.class_names == ("cat", "dog")
    assert ds.input_shape == (12, 10, 3)  # the size of the first image, cat/img0.png
    assert (len(ds.x_train), len(ds.x_test)) == (8, 2) and sorted(ds.y_test) == [0, 1]
    x_all, y_all = np.concatenate([ds.x_train, ds.x_test]), np.concatenate([ds.y_train, ds.y_test])
    for x, y in zip(x_all, y_all, strict=True):
        expected_rgb = [0, 0, 1] if y == 0 else [1, 0, 0]  # blue cats, red dogs
        np.testing.assert_allclose(x.reshape(-1, 3), np.broadcast_to(expected_rgb, (120, 3)))


def test_image_folder_keeps_one_channel_only_when_all_gray(tmp_path: Path) -> None:
    _write_images(tmp_path / "gray" / "a", 128, [(6, 6)] * 2)
    _write_images(tmp_path / "gray" / "b", 64, [(6, 6)] * 2)
    gray = load_dataset(str(tmp_path / "gray"), test_fraction=0.5)
    assert gray.input_shape == (6, 6, 1)
    np.testing.assert_allclose(np.unique(gray.x_train), [64 / 255, 128 / 255], atol=1e-6)

    _write_images(tmp_path / "mixed" / "a", 128, [(6, 6)] * 2)
    _write_images(tmp_path / "mixed" / "b", RED_BGR, [(6, 6)] * 2)
    mixed = load_dataset(str(tmp_path / "mixed"), test_fraction=0.5)
    assert mixed.input_shape == (6, 6, 3)
    gray_images = np.concatenate([mixed.x_train, mixed.x_test])[
        np.concatenate([mixed.y_train, mixed.y_test]) == 0]
    np.testing.assert_allclose(gray_images, 128 / 255, atol=1e-6)


def test_train_test_folder_layout_is_used_as_split(tmp_path: Path) -> None:
    _write_images(tmp_path / "train" / "cat", BLUE_BGR, [(8, 8)] * 3)
    _write_images(tmp_path / "train" / "dog", RED_BGR, [(8, 8)] * 2)
    _write_images(tmp_path / "test" / "dog", RED_BGR, [(4, 4), (16, 16)])
    ds = load_dataset(str(tmp_path), test_fraction=0.5)
    _check_layout(ds)
    assert ds.class_names == ("cat", "dog") and ds.input_shape == (8, 8, 3)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ds.y_test, [1, 1])
    np.testing.assert_allclose(ds.x_test[..., 0], 1.0)

    _write_images(tmp_path / "test" / "fox", RED_BGR, [(8, 8)])
    with pytest.raises(ValueError, match=r"classes missing from train/: \['fox'\]"):
        load_dataset(str(tmp_path))


def test_image_size_resizes_every_source(tmp_path: Path) -> None:
    small = load_dataset("digits", image_size=(4, 4))
    full = load_dataset("digits")
    assert small.input_shape == (4, 4, 1)
    blocks = full.x_train[:, :, :, 0].reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(small.x_train[..., 0], blocks, atol=1e-6)  # area interpolation

    npz = load_dataset(str(_write_npz(tmp_path / "a.npz")), image_size=(3, 9))
    assert npz.input_shape == (3, 9, 1) and npz.x_test.shape == (3, 3, 9, 1)
    _write_images(tmp_path / "imgs" / "a", BLUE_BGR, [(10, 10), (20, 5)])
    _write_images(tmp_path / "imgs" / "b", RED_BGR, [(10, 10), (20, 5)])
    assert load_dataset(str(tmp_path / "imgs"), image_size=(7, 5), test_fraction=0.5).input_shape \
        == (7, 5, 3)
    with pytest.raises(ValueError, match="image_size must be two positive ints"):
        load_dataset("digits", image_size=(0, 4))


# --- npz ------------------------------------------------------------------------------------------

def test_npz_with_class_names_and_rgb(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "rgb.npz", x_train=np.full((5, 4, 4, 3), 255, np.uint8),
                      x_test=np.zeros((3, 4, 4, 3), np.uint8), class_names=np.array(["no", "yes"]))
    ds = load_dataset(str(path))
    _check_layout(ds)
    assert ds.class_names == ("no", "yes") and ds.input_shape == (4, 4, 3)
    assert ds.x_train.min() == 1.0 and ds.x_test.max() == 0.0
    assert ds.name == str(path)


# --- errors ---------------------------------------------------------------------------------------

def test_unknown_name_lists_valid_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"unknown dataset 'mnits'.*digits, mnist, fashion_mnist, "
                                         r"cifar10.*no file or folder"):
        load_dataset("mnits")


@pytest.mark.parametrize("spec", ["no/such/folder", "missing.npz"])
def test_missing_path_raises_file_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            spec: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"dataset path not found: {spec}"):
        load_dataset(spec)


@pytest.mark.parametrize("overrides, message", [
    ({"x_test": None}, r"missing key\(s\) x_test"),
    ({"x_train": np.full((5, 6, 6), 2.0, np.float32)}, r"x_train float values must be in \[0, 1\]"),
    ({"x_test": np.full((3, 6, 6), np.nan)}, "x_test contains NaN"),
    ({"y_train": np.arange(4) % 2}, "x_train has 5 images but y_train has 4 labels"),
    ({"x_train": np.zeros((5, 36), np.uint8)}, r"x_train must be .*got shape \(5, 36\)"),
    ({"x_train": np.zeros((5, 6, 6, 2), np.uint8)}, r"C in \(1, 3, 4\)"),
    ({"y_test": np.array([0.0, 1.0, 0.0])}, "y_test must be a 1-D array of integer class indices"),
    ({"y_test": np.array([0, 1, 5]), "class_names": np.array(["a", "b"])},
     r"y_test labels must be in \[0, 2\)"),
    ({"x_train": np.zeros((5, 6, 6), np.int16)}, "unsupported pixel dtype int16"),
])
def test_bad_npz_is_rejected(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(ValueError, match=message):
        load_dataset(str(path))


def test_unsupported_file_type(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported dataset file"):
        load_dataset(str(tmp_path / "data.csv"))


def test_cifar_folder_without_test_batch(tmp_path: Path) -> None:
    _write_batch(tmp_path / "data_batch_1", np.zeros((1, 3072), np.uint8), [0])
    with pytest.raises(ValueError, match=r"no test_batch\* file"):
        load_dataset(str(tmp_path))


def test_cifar_batch_with_wrong_row_size(tmp_path: Path) -> None:
    _write_batch(tmp_path / "data_batch_1", np.zeros((1, 100), np.uint8), [0])
    _write_batch(tmp_path / "test_batch", np.zeros((1, 3072), np.uint8), [0])
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR batch"):
        load_dataset(str(tmp_path))


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    _write_images(tmp_path / "a", BLUE_BGR, [(4, 4)] * 2)
    _write_images(tmp_path / "b", RED_BGR, [(4, 4)] * 2)
    (tmp_path / "b" / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot decode image file .*broken\.png"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_is_refused_not_trained_on(tmp_path: Path, suffix: str) -> None:
    """OpenCV decodes a truncated file with only libjpeg's warning; the loader must refuse it."""
    _write_images(tmp_path / "a", BLUE_BGR, [(16, 16)] * 5)
    _write_images(tmp_path / "b", RED_BGR, [(16, 16)] * 4)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    ok, encoded = cv2.imencode(suffix, image)
    assert ok
    (tmp_path / "b" / f"whole{suffix}").write_bytes(encoded.tobytes())
    assert load_dataset(str(tmp_path), image_size=(16, 16)).x_train.shape[0] > 0
    (tmp_path / "b" / f"cut{suffix}").write_bytes(encoded.tobytes()[: len(encoded) // 2])
    with pytest.raises(ValueError, match=rf"image file .*cut\{suffix} is truncated"):
        load_dataset(str(tmp_path), image_size=(16, 16))


def test_failed_keras_download_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline() -> None:
        raise Exception("URL fetch failure on https://storage.googleapis.com/mnist.npz: None -- [Errno -3] "
                        "Temporary failure in name resolution\nmore lines")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(ValueError, match=r"cannot load 'mnist': .*URL fetch failure.*resolution\); offline, pass a local copy") as error:
        load_dataset("mnist")
    assert "\n" not in str(error.value)


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no class folders here")
    with pytest.raises(ValueError, match="is empty: expected one sub-folder per class"):
        load_dataset(str(tmp_path))


def test_class_folder_without_images(tmp_path: Path) -> None:
    _write_images(tmp_path / "a", BLUE_BGR, [(4, 4)] * 2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ".hidden.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"class folder .*b has no images"):
        load_dataset(str(tmp_path))


def test_dataset_checks_lengths_when_built_directly() -> None:
    x = np.zeros((3, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="x_test has 3 images but y_test has 2 labels"):
        ImageDataset("direct", x, np.zeros(3, np.int64), x, np.zeros(2, np.int64), ("a",))
