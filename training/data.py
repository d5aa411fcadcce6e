"""Load image datasets as float32 NHWC arrays in [0, 1] with int64 labels, from a built-in name
or a path (.npz file, CIFAR pickle-batch folder, image folder). TensorFlow is imported only for
the keras.datasets names, so the module stays cheap to import."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from foundation.images import read_image
from training.cifar import load_cifar_batches

_DIGIT_NAMES = tuple(str(i) for i in range(10))
_KERAS_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": _DIGIT_NAMES,
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
}
BUILTIN_DATASETS: tuple[str, ...] = ("digits", *_KERAS_CLASS_NAMES)
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 4: cv2.COLOR_RGBA2RGB}  # from what `read_image` gives

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A train/test split of images (float32 NHWC in [0, 1]) and int64 class indices."""

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        """Reject inconsistent arrays here, so every loader shares one set of checks."""
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.dtype != np.float32 or x.ndim != 4 or y.dtype != np.int64 or y.ndim != 1:
                raise ValueError(f"x_{part} must be float32 (n, H, W, C) and y_{part} int64 (n,); "
                                 f"got {x.dtype} {x.shape} and {y.dtype} {y.shape}")
            if len(x) != len(y):
                raise ValueError(f"x_{part} has {len(x)} images but y_{part} has {len(y)} labels")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"y_{part} labels must be in [0, {self.num_classes}); "
                                 f"got range [{y.min()}, {y.max()}]")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"train images are {self.x_train.shape[1:]} but test images are "
                             f"{self.x_test.shape[1:]}")

    @property
    def num_classes(self) -> int:
        """Number of classes, i.e. the length of class_names."""
        return len(self.class_names)

    def fingerprint(self) -> str:
        """sha256 over the four arrays: which data a long run (harden, training) was started on."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (H, W, C) of one image, as a model's input layer wants it."""
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)


def load_dataset(spec: str, *, image_size: tuple[int, int] | None = None,
                 test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """Load a built-in dataset by name, or an .npz file, CIFAR batch folder or image folder by path.

    ``image_size=(H, W)`` resizes every image with area interpolation. ``test_fraction`` and
    ``seed`` drive the stratified split of sources that come without one (digits, image folders).
    """
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise ValueError(f"image_size must be two positive ints (H, W); got {image_size!r}")
    size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    names: tuple[str, ...] | None
    if spec == "digits":
        split, names = _load_digits(test_fraction, seed), _DIGIT_NAMES
    elif spec in _KERAS_CLASS_NAMES:
        split, names = _load_keras(spec), _KERAS_CLASS_NAMES[spec]
    else:
        split, names = _load_path(spec, size, test_fraction, seed)
    x_train, y_train, x_test, y_test = split
    y_train, y_test = _as_labels(y_train, "y_train"), _as_labels(y_test, "y_test")
    if names is None:
        num_classes = max(int(y.max(initial=-1)) for y in (y_train, y_test)) + 1
        names = tuple(str(i) for i in range(num_classes))
    return ImageDataset(spec, _as_images(x_train, "x_train", size), y_train,
                        _as_images(x_test, "x_test", size), y_test, names)


def _load_path(spec: str, size: tuple[int, int] | None, test_fraction: float,
               seed: int) -> tuple[Split, tuple[str, ...] | None]:
    """Dispatch a path spec on what it points to; tell a missing path from an unknown name."""
    path = Path(spec).expanduser()
    if not path.exists():
        if spec.endswith(".npz") or Path(spec).name != spec:
            raise FileNotFoundError(f"dataset path not found: {spec}")
        raise ValueError(f"unknown dataset {spec!r}: valid names are {', '.join(BUILTIN_DATASETS)}"
                         ", and no file or folder of that name was found")
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"unsupported dataset file {path}: expected an .npz file or a folder")
        return _load_npz(path)
    if any(path.glob("data_batch_*")):
        return load_cifar_batches(path)
    return _load_image_folder(path, size, test_fraction, seed)


def _load_digits(test_fraction: float, seed: int) -> Split:
    """scikit-learn's bundled 8x8 digits (pixel values 0..16), split with stratification."""
    digits = load_digits()
    return _split(digits.images[..., None] / 16.0, digits.target, test_fraction, seed)


def _load_keras(name: str) -> Split:
    """A keras.datasets loader (downloads on first use)."""
    import keras  # lazy: importing keras loads TensorFlow, which only these datasets need

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as error:  # keras.utils.get_file raises a bare Exception on a failed download
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"cannot load {name!r}: keras.datasets downloads it on first use and that failed ({reason}); "
            "offline, pass a local copy instead, e.g. --data path/to/mnist.npz (arrays x_train, y_train, x_test, y_test)"
        ) from error
    return x_train, y_train, x_test, y_test


def _load_npz(path: Path) -> tuple[Split, tuple[str, ...] | None]:
    """Arrays saved in keras.datasets layout, plus optional class_names."""
    with np.load(path, allow_pickle=False) as npz:
        missing = [key for key in _NPZ_KEYS if key not in npz.files]
        if missing:
            raise ValueError(f"{path} is missing key(s) {', '.join(missing)}; "
                             f"expected {', '.join(_NPZ_KEYS)}")
        names = tuple(str(n) for n in npz["class_names"]) if "class_names" in npz.files else None
        return (npz["x_train"], npz["y_train"], npz["x_test"], npz["y_test"]), names


def _load_image_folder(path: Path, size: tuple[int, int] | None, test_fraction: float,
                       seed: int) -> tuple[Split, tuple[str, ...]]:
    """Class sub-folders split with stratification, or train/ and test/ with class sub-folders."""
    has_split = (path / "train").is_dir() and (path / "test").is_dir()
    train = _class_files(path / "train" if has_split else path)
    test = _class_files(path / "test") if has_split else {}
    names = tuple(train)
    if set(test) - set(names):
        raise ValueError(f"{path / 'test'} has classes missing from train/: "
                         f"{sorted(set(test) - set(names))}")
    files = [(file, names.index(cls)) for part in (train, test)
             for cls, found in part.items() for file in found]
    x = _stack_images([file for file, _ in files], size)
    y = np.array([label for _, label in files])
    if not has_split:
        return _split(x, y, test_fraction, seed), names
    n_train = sum(len(found) for found in train.values())
    return (x[:n_train], y[:n_train], x[n_train:], y[n_train:]), names


def _class_files(root: Path) -> dict[str, list[Path]]:
    """Map each class sub-folder name, sorted, to its sorted non-hidden files."""
    files = {cls.name: [f for f in _visible(cls) if f.is_file()]
             for cls in _visible(root) if cls.is_dir()}
    if not files:
        raise ValueError(f"image folder {root} is empty: expected one sub-folder per class")
    for name, found in files.items():
        if not found:
            raise ValueError(f"class folder {root / name} has no images")
    return files


def _visible(folder: Path) -> list[Path]:
    """Sorted entries of folder, skipping hidden ones such as .DS_Store."""
    return [entry for entry in sorted(folder.iterdir()) if not entry.name.startswith(".")]


def _stack_images(paths: list[Path], size: tuple[int, int] | None) -> np.ndarray:
    """Read the files (`foundation.images`), as RGB (1-channel only if every image is grayscale),
    scaled to [0, 1], resized and stacked.

    Without ``size`` every image takes the size of the first one.
    """
    decoded = [read_image(path) for path in paths]  # truncated or undecodable files are refused
    gray = all(image.shape[2] == 1 for image in decoded)
    size = size or decoded[0].shape[:2]
    out = np.empty((len(decoded), *size, 1 if gray else 3), np.float32)
    for i, image in enumerate(decoded):
        if not gray and image.shape[2] in _TO_RGB:
            image = cv2.cvtColor(image, _TO_RGB[image.shape[2]])
        out[i] = _resize_image(_to_unit_float(image, str(paths[i])), size)
    return out


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Split:
    """Stratified split, so every class keeps its share in both parts."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return x_train, y_train, x_test, y_test


def _as_images(x: np.ndarray, what: str, size: tuple[int, int] | None) -> np.ndarray:
    """C-contiguous float32 (n, H, W, C) in [0, 1], resized to size; (n, H, W) gains a channel."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3, 4) or x.size == 0:
        raise ValueError(f"{what} must be a non-empty (n, H, W) or (n, H, W, C) array with "
                         f"C in (1, 3, 4); got shape {x.shape}")
    x = _to_unit_float(x, what)
    if size is not None and x.shape[1:3] != size:  # cv2 resizes one image at a time
        x = np.stack([_resize_image(image, size) for image in x])
    return np.ascontiguousarray(x)


def _to_unit_float(x: np.ndarray, what: str) -> np.ndarray:
    """Scale unsigned-integer pixels by their dtype's maximum; check float pixels are in [0, 1]."""
    if x.dtype.kind == "u":
        return np.divide(x, np.iinfo(x.dtype).max, dtype=np.float32)
    if x.dtype.kind != "f":
        raise ValueError(f"{what} has unsupported pixel dtype {x.dtype}: "
                         "expected unsigned integers or floats in [0, 1]")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"{what} float values must be in [0, 1]; got range [{x.min()}, {x.max()}]")
    return x.astype(np.float32, copy=False)


def _as_labels(y: np.ndarray, what: str) -> np.ndarray:
    """C-contiguous int64 (n,); keras's (n, 1) label columns are flattened."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 1-D array of integer class indices; "
                         f"got {y.dtype} {y.shape}")
    return np.ascontiguousarray(y, dtype=np.int64)


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one float image to (H, W, C) with area interpolation, clipped back into [0, 1]."""
    h, w = size
    if image.shape[:2] != (h, w):
        image = np.clip(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), 0.0, 1.0)
    return image.reshape(h, w, -1)
