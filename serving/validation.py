"""A request's batch, read and validated in one place: the body or the uploads parsed
(`serving.inputs`), then the guard's input checks, once per batch. Every refusal is an `ApiError`."""
from __future__ import annotations

import anyio
import numpy as np
from fastapi import Request

from serving.asgi import ApiError
from serving.guard import Guard
from serving.inputs import parse_instances, parse_npy, uploaded_image

NPY = "application/x-npy"  # a binary :predict body: one .npy array (no JSON numbers to parse)
# TF Serving reads the body as JSON whatever its declared type; so does this, for the two types
# clients send by default (curl -d: form-urlencoded), and refuses the rest
PREDICT_TYPES = ("", "application/json", "application/x-www-form-urlencoded", NPY)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def checked(guard: Guard, x: np.ndarray) -> np.ndarray:
    """`x` after the guard's input checks (float32), whose errors become 400s."""
    try:
        return guard.check(x)
    except ValueError as error:
        raise ApiError(400, str(error)) from None


def _parse_predict(guard: Guard, body: bytes, max_batch: int, npy: bool) -> np.ndarray:
    """A `:predict` body (JSON, or one .npy array) as checked images (run in a worker thread:
    parsing is the costly part)."""
    return checked(guard, (parse_npy if npy else parse_instances)(body, max_batch))


async def predict_batch(request: Request, guard: Guard, max_batch: int) -> np.ndarray:
    """The checked images of a `:predict` request."""
    kind = media_type(request)
    if kind not in PREDICT_TYPES:
        raise ApiError(415, f"content type {kind!r} is not supported: send application/json or {NPY}")
    body = await request.body()
    return await anyio.to_thread.run_sync(_parse_predict, guard, body, max_batch, kind == NPY)


async def _read_uploads(request: Request, max_batch: int) -> list[bytes]:
    """The image files of a `:classify` request: a raw image body, or every file of a form."""
    kind = media_type(request)
    if kind in ("image/jpeg", "image/png"):
        return [await request.body()]
    if kind != "multipart/form-data":
        raise ApiError(415, f"content type {kind or 'none'!r} is not supported: send image/jpeg, "
                       "image/png or multipart/form-data with image files")
    async with request.form(max_files=max_batch + 1, max_fields=max_batch + 1) as form:
        fields = [key for key, value in form.multi_items() if isinstance(value, str)]
        if fields:
            raise ApiError(400, f"form fields {fields} are not files: send images only")
        files = [await value.read() for _, value in form.multi_items()]
    if not files:
        raise ApiError(400, "empty batch: the form holds no image files")
    if len(files) > max_batch:
        raise ApiError(400, f"batch of {len(files)} images is over the limit of {max_batch}")
    return files


async def classify_batch(request: Request, guard: Guard, max_batch: int, decoders: anyio.CapacityLimiter) -> np.ndarray:
    """The checked images of a `:classify` request, decoded to the guard's input size in threads
    limited by `decoders`."""
    shape = guard.input_shape
    if len(shape) != 3 or None in shape[:2] or shape[2] not in (1, 3):
        raise ApiError(400, f":classify needs a fixed HxW input with 1 or 3 channels; this guard takes {shape}")
    images = []
    for data in await _read_uploads(request, max_batch):
        images.append(await anyio.to_thread.run_sync(uploaded_image, data, shape, guard.clip, limiter=decoders))
    return checked(guard, np.stack(images))
