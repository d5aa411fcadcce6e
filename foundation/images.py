"""Image files and bytes decoded in one place, with OpenCV: the HTTP service's uploads
(`serving.inputs`), the demo's pictures (`serving.demo_engine`) and image-folder datasets
(`training.data`).

A PNG or JPEG is checked for its end before OpenCV sees it: OpenCV decodes a truncated file with
only a warning and grey filler, which would then be classified or trained on. Whatever cannot be
decoded is refused with `ImageError`, whose message names the image and the problem.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8"
_READ_MODES = {None: cv2.IMREAD_UNCHANGED, 1: cv2.IMREAD_GRAYSCALE, 3: cv2.IMREAD_COLOR}
_TO_RGB = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}  # OpenCV decodes to BGR(A)


class ImageError(ValueError):
    """An image that cannot be decoded: not an image, corrupt, truncated or too large."""


def image_size(data: bytes, what: str = "the image") -> tuple[int, int]:
    """(width, height) of a whole PNG or JPEG, read from its header without decoding. ImageError for
    other bytes and for a file without its end (a PNG its IEND chunk, a JPEG an end marker after
    its first scan)."""
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError(f"{what} is corrupt (the PNG has no IHDR header)")
        if data.find(b"IEND", 33) < 0:
            raise ImageError(f"{what} is truncated (the PNG has no IEND chunk)")
        return struct.unpack(">II", data[16:24])
    if not data.startswith(JPEG_SIGNATURE):
        raise ImageError(f"{what} is not a PNG or JPEG image")
    size, position = None, 2  # walk the marker segments (an EXIF thumbnail inside APP1 has its own scan and end)
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker, (length,) = data[position + 1], struct.unpack(">H", data[position + 2 : position + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and position + 9 <= len(data):
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            size = (width, height)
        if marker == 0xDA:  # start of scan: the end marker cannot occur in the entropy-coded data after it
            if size is not None and data.find(b"\xff\xd9", position) >= 0:
                return size
            break
        position += 2 + length
    raise ImageError(f"{what} is truncated or corrupt (the JPEG lacks its frame header, scan or end marker)")


def decode_image(data: bytes, channels: int | None = None, *, what: str = "the image",
                 max_pixels: int | None = None) -> np.ndarray:
    """The pixels of an image file's bytes (any format OpenCV reads) as (H, W, C), colour in RGB
    order. `channels`: 1 gives 8-bit grey, 3 gives 8-bit RGB, whatever the file holds; None keeps
    what it holds (8 or 16 bit; grey, RGB or RGBA). A PNG or JPEG without its end is refused. With
    `max_pixels`, only PNG and JPEG are accepted, and the size in their header is checked before
    anything is decoded (no pixel bombs). `what` names the image in error messages."""
    if channels not in _READ_MODES:
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if max_pixels is not None:
        width, height = image_size(data, what)
        if not 0 < width * height <= max_pixels:
            raise ImageError(f"{what} is {width}x{height} pixels; at most {max_pixels} are accepted")
    elif data.startswith((PNG_SIGNATURE, JPEG_SIGNATURE)):
        image_size(data, what)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _READ_MODES[channels]) if data else None
    if image is None:
        raise ImageError(f"cannot decode {what} (corrupt, or not an image)")
    if image.ndim == 2:
        return image[..., None]
    return cv2.cvtColor(image, _TO_RGB[image.shape[2]]) if image.shape[2] in _TO_RGB else image


def read_image(path: str | os.PathLike, channels: int | None = None) -> np.ndarray:
    """`decode_image` of the file at `path`, named in error messages."""
    path = Path(path)
    return decode_image(path.read_bytes(), channels, what=f"image file {path}")


def quiet_decoder() -> None:
    """Keep OpenCV from logging a warning line per corrupt image (errors only; process-wide)."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
