"""CIFAR-10/100 python batch folders (`data_batch_*`, `test_batch*`, `batches.meta`) as arrays, read
with an unpickler that resolves numpy's array globals only, so a crafted batch file cannot run code."""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

# All a pickled numpy array may reference (protocol 2 writes bytes via _codecs.encode, protocol 5
# uses _frombuffer), taken from numpy itself so numpy.core (1.x) and numpy._core (2.x) both load.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(1).__reduce_ex__(5)[0]
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


def load_cifar_batches(path: Path) -> tuple[tuple[np.ndarray, ...], tuple[str, ...] | None]:
    """(x_train, y_train, x_test, y_test) from data_batch_* and test_batch*, and the class names in
    batches.meta (None without it)."""
    x_train, y_train = _read_cifar_batches(path, "data_batch_*")
    x_test, y_test = _read_cifar_batches(path, "test_batch*")
    meta = path / "batches.meta"
    names = tuple(n.decode() for n in _unpickle(meta)[b"label_names"]) if meta.is_file() else None
    return (x_train, y_train, x_test, y_test), names


def _read_cifar_batches(path: Path, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batches; each row of b'data' is the R, G and B planes of a 32x32 image."""
    files = sorted(path.glob(pattern))
    if not files:
        raise ValueError(f"CIFAR folder {path} has no {pattern} file")
    images, labels = [], []
    for file in files:
        batch = _unpickle(file)
        data = batch.get(b"data") if isinstance(batch, dict) else None
        y = batch.get(b"labels", batch.get(b"fine_labels")) if isinstance(batch, dict) else None
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or y is None:
            raise ValueError(f"{file} is not a CIFAR batch: expected a dict with b'data' "
                             "(n, 3072) and b'labels'")
        if len(y) != len(data):
            raise ValueError(f"{file} has {len(data)} images but {len(y)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(y))
    return np.concatenate(images), np.concatenate(labels)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals in _SAFE_GLOBALS, so a crafted batch file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy global; refuse every other one by name."""
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: "
                                         "only numpy array data is allowed")
        return _SAFE_GLOBALS[(module, name)]


def _unpickle(path: Path) -> Any:
    """Read one CIFAR pickle (bytes keys, as written by Python 2) with the restricted unpickler."""
    with path.open("rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path}: {err}") from err
