"""Writes that never leave half a file behind, and checksums to prove a file is what was written.

Every artifact safetynet stores (datasets, models, detectors, reports) goes through these helpers:
files are written to a temporary name in the same folder and renamed into place, directories are
built under a temporary name and renamed whole, so a crash leaves either the old state or the new.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import keras
import numpy as np


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# within `remembered_fingerprints`: each model's fingerprint, computed once
_remembered: contextvars.ContextVar[weakref.WeakKeyDictionary | None] = contextvars.ContextVar("fingerprints", default=None)


def model_fingerprint(model: keras.Model) -> str:
    """sha256 over a model's weights (shapes and values, in order): which model data was made for.
    Inside `remembered_fingerprints()` each model is hashed once."""
    remembered = _remembered.get()
    if remembered is not None and model in remembered:
        return remembered[model]
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    if remembered is not None:
        remembered[model] = digest.hexdigest()
    return digest.hexdigest()


@contextlib.contextmanager
def remembered_fingerprints() -> Iterator[None]:
    """Within the block, `model_fingerprint` hashes each model object once (loading a guard, one
    evaluation: the classifier is checked against the detector, recorded in the report and hashed
    into the detector's fingerprint). No model's weights may change inside the block. Nested blocks
    share the outer one's memory."""
    if _remembered.get() is not None:
        yield
        return
    token = _remembered.set(weakref.WeakKeyDictionary())
    try:
        yield
    finally:
        _remembered.reset(token)


def _read_umask() -> int:
    """The process umask (read by setting it, so set it straight back): once, at import, because
    the umask is process-wide and writer threads must never see it changed."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(temp_path)` to produce the file, then rename it to `path` (same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(temp))
        with open(temp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make results unreadable to others
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` whole, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(temp, 0o777 & ~_UMASK)  # mkdtemp's 0700 would hide results from a server under another user
    try:
        yield temp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(temp, path)
            shutil.rmtree(old)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Load a JSON object from a file, with errors that say which file is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} is corrupt ({path}): {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} is corrupt ({path}): expected a JSON object, got {type(data).__name__}")
    return data
