"""Request inputs of the HTTP service (`serving.http`): `:predict` JSON bodies and `:classify` image files.

`parse_instances` turns a TF-Serving-style JSON body into one float64 array, `uploaded_image` a PNG
or JPEG into an HxWxC float32 image at the guard's input size and clip range. Both refuse malformed
input with `InputError` (which the service answers with 400) before any costly work: JSON is parsed
strictly, element types are checked, and image headers are read for their size and completeness
before OpenCV decodes anything (`foundation.images`).
"""
from __future__ import annotations

import contextlib
import io
import math

import cv2
import numpy as np
import orjson

from foundation.images import ImageError, decode_image

MAX_IMAGE_PIXELS = 40_000_000  # per uploaded image, read from its header before decoding (no pixel bombs)
MAX_NPY_HEADER = 10_000  # bytes of a .npy header (numpy's own default limit)
_NOT_NUMBERS = {"b": "booleans", "U": "strings", "O": "values that are not numbers (null, objects or huge integers)"}


class InputError(ValueError):
    """A malformed request input; the message says what is wrong."""


def parse_instances(body: bytes, max_batch: int) -> np.ndarray:
    """The instances of a `:predict` body as one float64 array, checked for form, batch size, rank
    and element types (numbers only, one shape for all)."""
    try:
        payload = orjson.loads(body)  # strict JSON: refuses NaN and Infinity, which Python's json accepts
    except orjson.JSONDecodeError as error:
        hint = " (JSON has no NaN or Infinity)" if b"NaN" in body or b"Infinity" in body else ""
        raise InputError(f"the body is not valid JSON{hint}: {error}") from None
    if not isinstance(payload, dict):
        raise InputError('the body must be a JSON object such as {"instances": [...]}')
    unknown = set(payload) - {"instances", "inputs", "signature_name"}
    if unknown:
        raise InputError(f'unknown keys {sorted(unknown)}: send {{"instances": [...]}}')
    if ("instances" in payload) == ("inputs" in payload):
        raise InputError('the body needs exactly one of "instances" (a list of images) and "inputs"')
    batch, names = payload.get("instances", payload.get("inputs")), [*payload, payload.get("signature_name")]
    if "inputs" in payload and isinstance(batch, dict):
        if len(batch) != 1:
            raise InputError(f'"inputs" names {len(batch)} inputs; this model has one')
        names += list(batch)
        (batch,) = batch.values()
    if not isinstance(batch, list):
        raise InputError("instances must be a list of images (HxWxC nested lists of numbers)")
    if not batch:
        raise InputError("empty batch: send at least one instance")
    if len(batch) > max_batch:
        raise InputError(f"batch of {len(batch)} instances is over the limit of {max_batch}")
    x = None
    if _numbers_only(body, names):
        with contextlib.suppress(ValueError, TypeError):  # ragged, or {} among the numbers
            x = np.asarray(batch, np.float64)
    if x is None:
        x = _inferred_array(batch, body)
    if x.ndim != 4:
        raise InputError(f"each instance must be an HxWxC array (rank 3), got instances of shape {x.shape[1:]}")
    return x


def parse_npy(body: bytes, max_batch: int) -> np.ndarray:
    """A `:predict` body sent as one `.npy` array (Content-Type application/x-npy): NHWC floats with no
    JSON to parse, for large images where parsing text costs more than the model. The header (shape,
    dtype, order) is checked against the body before any allocation: the array is a view of the
    body's bytes, so a header claiming terabytes costs nothing. Never unpickles."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream, max_header_size=MAX_NPY_HEADER)
    except (ValueError, OSError, EOFError, TypeError, SyntaxError) as error:
        raise InputError(f"the body is not a .npy array: {error}") from None
    if dtype.hasobject:
        raise InputError("the .npy array holds Python objects (a pickle): only float pixel arrays are accepted")
    if dtype.kind != "f" or dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(f"the .npy array must hold floating point pixels, got dtype {dtype}")
    if len(shape) != 4 or min(shape) < 0:
        raise InputError(f"the .npy array must be a batch of HxWxC images (rank 4), got shape {shape}")
    if shape[0] == 0:
        raise InputError("empty batch: send at least one instance")
    if shape[0] > max_batch:
        raise InputError(f"batch of {shape[0]} instances is over the limit of {max_batch}")
    declared, available = math.prod(shape) * dtype.itemsize, len(body) - stream.tell()
    if declared != available:
        raise InputError(f"the .npy header declares shape {shape} of {dtype} ({declared} bytes) but the body "
                         f"carries {available} bytes of data")
    x = np.frombuffer(body, dtype, math.prod(shape), stream.tell())
    return x.reshape(shape[::-1]).transpose() if fortran_order else x.reshape(shape)


def _numbers_only(body: bytes, names: list) -> bool:
    """Whether the body is nothing but numbers, brackets and its (quoted) key `names`: a C-speed scan
    that lets the instances convert with a fixed dtype, ten times faster than numpy inferring one
    (a fixed dtype would also turn "0.5" into 0.5 and true into 1.0, hence the scan)."""
    for name in names:
        if isinstance(name, str):
            body = body.replace(orjson.dumps(name), b"", 1)
    return not body.translate(None, b"0123456789.eE+-,[]{}: \t\r\n")


def _inferred_array(batch: list, body: bytes) -> np.ndarray:
    """The instances as an array of the dtype numpy infers, refused unless numeric (slow: for
    bodies that are not plain numbers, to say what is wrong)."""
    try:
        x = np.asarray(batch)
    except ValueError:  # numpy refuses ragged nested lists
        raise InputError("instances are ragged: each must be an HxWxC nested list, all of one shape") from None
    if x.dtype.kind not in "iuf":
        raise InputError(f"instances must hold numbers only, found {_NOT_NUMBERS.get(x.dtype.kind, x.dtype)}")
    # numpy turns booleans among numbers into 0 and 1: look for them when the body has the tokens
    if (b"true" in body or b"false" in body) and np.frompyfunc(lambda v: v is True or v is False, 1, 1)(
        np.asarray(batch, dtype=object)
    ).any():
        raise InputError("instances must hold numbers only, found booleans")
    return x.astype(np.float64, copy=False)


def uploaded_image(data: bytes, shape: tuple[int, int, int], clip: tuple[float, float]) -> np.ndarray:
    """A `:classify` upload (PNG or JPEG) as an HxWxC float32 image in `clip`: RGB (or grey for one
    channel), resized with INTER_AREA to the guard's input size."""
    rows, columns, channels = shape
    try:
        image = decode_image(data, channels, what="the upload", max_pixels=MAX_IMAGE_PIXELS)
    except ImageError as error:
        raise InputError(str(error)) from None
    image = cv2.resize(image, (columns, rows), interpolation=cv2.INTER_AREA).reshape(shape)
    low, high = clip
    return np.clip(low + image.astype(np.float32) / 255.0 * (high - low), low, high)
