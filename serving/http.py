"""The HTTP service: a TF-Serving-compatible REST API in front of a Guard (`safetynet serve`).

    POST /v1/models/<name>:predict    {"instances": [HxWxC nested lists]}, or TF Serving's columnar
                                      {"inputs": [...]} / {"inputs": {"<input name>": [...]}}; or, as
                                      application/x-npy, one .npy NHWC float array (no JSON to parse)
    POST /v1/models/<name>:classify   image files (multipart/form-data, any field names) or one raw
                                      image/jpeg or image/png body, decoded and resized to the guard's input
    GET  /v1/models/<name>            TF Serving model status
    GET  /healthz                     liveness (open even when a token is required)
    GET  /metrics                     Prometheus text format

Both POST endpoints answer {"predictions": [{"probabilities", "label", "adversarial_score",
"flagged", "rejected"}, ...]}, one per input, in order, with HTTP 200 even when some inputs are
rejected. A rejected input gets "probabilities" and "label" null: the classifier's answer on a
suspected adversarial input is withheld (it would also serve an attacker as an oracle).
"adversarial_score" is null where the detector failed (such inputs are flagged: the guard fails
closed). Without a local classifier and without an upstream, every "probabilities" and "label" is
null. The inputs of concurrent requests are merged into one guard call (`_Batcher`).

With `upstream` (a TF Serving model URL such as http://host:8501/v1/models/x) only the accepted inputs
are sent on, in one `:predict` call, and its predictions (one class-score vector each) fill in
"probabilities"; rejected inputs never leave this process. An unreachable or failing upstream
answers 502 (504 on a timeout). Every error is JSON {"error": message, "request_id": id}; every
answer carries an `X-Request-ID` header (the id quarantine records carry too). Bodies and image
files are parsed and decoded by `serving.inputs`, whose `InputError`s are answered with 400.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import hmac
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

try:
    import anyio
    import httpx
    import orjson
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as error:  # pragma: no cover
    raise ImportError(f"the HTTP service needs the serve extra: pip install 'safetynet[serve]' ({error})") from error

from attacks.storage import model_fingerprint
from serving.guard import Guard, GuardResult, GuardStats
from serving.inputs import InputError, decode_image, parse_instances, parse_npy, quiet_decoder
from serving.metrics import ServiceMetrics
from serving.quarantine import Quarantine

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
MERGE_IMAGES = 256  # most inputs of concurrent requests merged into one guard call
TOKEN_ENV = "SAFETYNET_TOKEN"
NPY = "application/x-npy"  # a binary :predict body: one .npy array (no JSON numbers to parse)
MODEL_VERSION = "1"

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal: answered with HTTP `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _BodyTooLarge(Exception):
    pass


def _checked(guard: Guard, x: np.ndarray) -> np.ndarray:
    """`x` after the guard's input checks (float32), whose errors become 400s."""
    try:
        return guard.check(x)
    except ValueError as error:
        raise ApiError(400, str(error)) from None


def _parse_predict(guard: Guard, body: bytes, max_batch: int, npy: bool) -> np.ndarray:
    """A `:predict` body (JSON, or one .npy array) as checked images (run in a worker thread:
    parsing is the costly part)."""
    return _checked(guard, (parse_npy if npy else parse_instances)(body, max_batch))


class _Batcher:
    """Runs the guard on the inputs of concurrent requests merged into one call (up to `max_images`).
    Keras' predict costs milliseconds per call whatever the batch, so merging multiplies throughput
    under load; a request that finds the guard idle runs at once (no waiting for company). One call
    at a time: Keras does not promise a thread-safe predict, and TensorFlow spreads one call over
    every core."""

    def __init__(self, guard: Guard, max_images: int) -> None:
        self.guard = guard
        self.max_images = max_images
        self.pending: collections.deque[tuple[np.ndarray, asyncio.Future]] = collections.deque()
        self.ready = asyncio.Event()

    async def predict(self, x: np.ndarray) -> GuardResult:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((x, future))
        self.ready.set()
        return await future

    async def run(self) -> None:
        """The loop that owns the guard: take what is waiting, predict, hand out the parts."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.pending:
                batch = [self.pending.popleft()]
                size = len(batch[0][0])
                while (self.pending and size + len(self.pending[0][0]) <= self.max_images
                       and self.pending[0][0].shape[1:] == batch[0][0].shape[1:]):
                    batch.append(self.pending.popleft())
                    size += len(batch[-1][0])
                try:
                    inputs = np.concatenate([x for x, _ in batch]) if len(batch) > 1 else batch[0][0]
                    result = await anyio.to_thread.run_sync(self.guard.predict, inputs)
                except Exception as error:  # noqa: BLE001 (each request raises it: logged, answered 500)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                start = 0
                for x, future in batch:
                    if not future.done():  # done: the client went away
                        future.set_result(GuardResult(**{
                            field.name: None if value is None else value[start : start + len(x)]
                            for field in dataclasses.fields(result) for value in [getattr(result, field.name)]
                        }))
                    start += len(x)


def _predictions(result: GuardResult, probabilities: np.ndarray | None) -> list[dict[str, Any]]:
    """The response rows; `probabilities` has a row per input (rows of rejected inputs are withheld)."""
    rows = labels = None
    if probabilities is not None:
        rows, labels = probabilities.tolist(), probabilities.argmax(axis=1).tolist()
    return [
        {
            "probabilities": rows[i] if rows is not None and not rejected else None,
            "label": labels[i] if labels is not None and not rejected else None,
            "adversarial_score": score if math.isfinite(score) else None,
            "flagged": flagged,
            "rejected": rejected,
        }
        for i, (score, flagged, rejected) in enumerate(
            zip(result.scores.tolist(), result.flagged.tolist(), result.rejected.tolist(), strict=True)
        )
    ]


def _endpoint(path: str) -> str:
    """The metrics label of a path (a fixed set, whatever clients send)."""
    if path.startswith("/v1/models/"):
        return next((verb for verb in ("predict", "classify") if path.endswith(f":{verb}")), "status")
    return path[1:] if path in ("/healthz", "/metrics") else "other"


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class _Gate:
    """ASGI middleware around the app: request ids, the bearer token, the body size limit (from
    Content-Length and while reading), request metrics, and a catch-all that logs an unexpected
    exception and answers 500 without its trace."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, token: str | None, max_body_bytes: int,
                 metrics: ServiceMetrics) -> None:
        self.app = app
        self.token = None if token is None else token.encode()
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _refusal(self, scope: dict) -> tuple[int, str] | None:
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] != "/healthz":
            scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                return 401, "missing or wrong bearer token (send Authorization: Bearer <token>)"
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return 413, f"the request body is over the limit of {self.max_body_bytes} bytes"
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started, status, received, responded = time.perf_counter(), 500, 0, False

        async def send_with_id(message: dict) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _BodyTooLarge
            return message

        async def answer(code: int, message: str) -> None:
            headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
            response = JSONResponse({"error": message, "request_id": request_id}, code, headers)
            await response(scope, receive, send_with_id)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await answer(*refusal)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            await answer(413, f"the request body is over the limit of {self.max_body_bytes} bytes")
        except ClientDisconnect:
            status = 499  # the client left; nobody to answer
        except Exception:
            log.exception("request %s failed", request_id)
            if not responded:
                await answer(500, "internal error")
        finally:
            self.metrics.observe_request(_endpoint(scope["path"]), status, time.perf_counter() - started)


async def _read_uploads(request: Request, max_batch: int) -> list[bytes]:
    """The image files of a `:classify` request: a raw image body, or every file of a form."""
    media_type = _media_type(request)
    if media_type in ("image/jpeg", "image/png"):
        return [await request.body()]
    if media_type != "multipart/form-data":
        raise ApiError(415, f"content type {media_type or 'none'!r} is not supported: send image/jpeg, "
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


def create_app(
    guard: Guard,
    *,
    upstream: str | None = None,
    token: str | None = None,
    quarantine: Any | None = None,
    max_batch: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    upstream_timeout: float = 10.0,
) -> FastAPI:
    """The service for one guard (served under `guard.name`). `quarantine`: a `serving.quarantine.Quarantine`
    (or anything with its `record`) that receives every guarded batch with its verdicts."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if token is not None and not token:
        raise ValueError("token must be a non-empty string (or None for no authentication)")
    if upstream is not None:
        upstream = upstream.rstrip("/")
        url = httpx.URL(upstream)
        if url.scheme not in ("http", "https") or not url.host or upstream.endswith(":predict"):
            raise ValueError(f"upstream must be a model URL such as http://host:8501/v1/models/name, got {upstream!r}")
    metrics = ServiceMetrics(guard, max_batch)
    fingerprint = model_fingerprint(guard.classifier) if guard.classifier is not None else guard.detector.classifier_fingerprint
    shape = guard.input_shape
    resources: dict[str, Any] = {}  # made in the server's event loop, at startup

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resources["decode"] = anyio.CapacityLimiter(os.cpu_count() or 1)  # image decoding: one per core
        resources["batcher"] = batcher = _Batcher(guard, max(MERGE_IMAGES, max_batch))
        async with httpx.AsyncClient(timeout=upstream_timeout) as client, anyio.create_task_group() as tasks:
            resources["upstream"] = client
            tasks.start_soon(batcher.run)
            yield
            tasks.cancel_scope.cancel()

    app = FastAPI(title="safetynet", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Gate, token=token, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    @app.exception_handler(HTTPException)
    @app.exception_handler(InputError)
    async def refuse(request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, ApiError):
            status, message = error.status, error.message
        elif isinstance(error, InputError):
            status, message = 400, str(error)
        else:
            status, message = error.status_code, error.detail
        return JSONResponse({"error": message, "request_id": request.state.request_id}, status)

    def check_name(name: str) -> None:
        if name != guard.name:
            raise ApiError(404, f"model {name!r} not found; this server serves {guard.name!r}")

    async def forward(x: np.ndarray, request_id: str) -> np.ndarray:
        """The upstream's class-score vectors for the accepted inputs `x`."""
        try:
            response = await resources["upstream"].post(
                f"{upstream}:predict", content=orjson.dumps({"instances": x}, option=orjson.OPT_SERIALIZE_NUMPY),
                headers={"Content-Type": "application/json", "X-Request-ID": request_id})
        except httpx.TimeoutException:
            metrics.upstream_errors.inc()
            raise ApiError(504, f"the upstream model server did not answer within {upstream_timeout} s") from None
        except httpx.HTTPError as error:
            metrics.upstream_errors.inc()
            raise ApiError(502, f"the upstream model server is unreachable ({type(error).__name__})") from None
        try:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            predictions = np.asarray(response.json()["predictions"], np.float64)
            if predictions.ndim != 2 or len(predictions) != len(x) or not np.isfinite(predictions).all():
                raise ValueError(f"predictions of shape {predictions.shape} for {len(x)} inputs")
        except (ValueError, KeyError, TypeError) as error:
            metrics.upstream_errors.inc()
            log.warning("request %s: upstream answered %s: %.500s", request_id, error, response.text)
            raise ApiError(502, f"the upstream model server failed ({error}; expected one class-score vector "
                           "per input)") from None
        return predictions

    async def respond(request: Request, x: np.ndarray) -> Response:
        """Guard the checked batch, hand it to the quarantine, ask the upstream about the accepted inputs."""
        request_id = request.state.request_id
        result = await resources["batcher"].predict(x)
        metrics.observe_result(result)
        if quarantine is not None:
            try:
                # flagged, not rejected: under --policy flag the quarantine still collects the suspects
                quarantine.record(x, result.scores, result.flagged, request_id=request_id, model=guard.name,
                                  classifier_fingerprint=fingerprint)
            except Exception:  # the quarantine is for review later: never fail the answer over it
                log.exception("request %s: the quarantine refused the batch", request_id)
                metrics.quarantine_errors.inc()
        probabilities = result.probabilities
        if upstream is not None:
            accepted = ~result.rejected
            probabilities = None
            if accepted.any():
                scores = await forward(x[accepted], request_id)
                probabilities = np.zeros((len(x), scores.shape[1]))
                probabilities[accepted] = scores
        return Response(orjson.dumps({"predictions": _predictions(result, probabilities)}), media_type="application/json")

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request) -> Response:
        check_name(name)
        # TF Serving reads the body as JSON whatever its declared type; so does this, for the two types
        # clients send by default (curl -d: form-urlencoded), and refuses the rest
        media_type = _media_type(request)
        if media_type not in ("", "application/json", "application/x-www-form-urlencoded", NPY):
            raise ApiError(415, f"content type {media_type!r} is not supported: send application/json or {NPY}")
        body = await request.body()
        x = await anyio.to_thread.run_sync(_parse_predict, guard, body, max_batch, media_type == NPY)
        return await respond(request, x)

    @app.post("/v1/models/{name}:classify")
    async def classify(name: str, request: Request) -> Response:
        check_name(name)
        if len(shape) != 3 or None in shape[:2] or shape[2] not in (1, 3):
            raise ApiError(400, f":classify needs a fixed HxW input with 1 or 3 channels; this guard takes {shape}")
        images = []
        for data in await _read_uploads(request, max_batch):
            images.append(await anyio.to_thread.run_sync(decode_image, data, shape, guard.clip, limiter=resources["decode"]))
        return await respond(request, _checked(guard, np.stack(images)))

    @app.get("/v1/models/{name}")
    async def status(name: str) -> dict[str, Any]:
        if ":" in name:  # GET /v1/models/<name>:predict lands here
            raise ApiError(405, f"use POST for /v1/models/{name}")
        check_name(name)
        return {"model_version_status": [{"version": MODEL_VERSION, "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    return app


def _warm_up(guard: Guard) -> None:
    """Trace Keras' predict functions before the first request (two batch sizes, after which Keras
    stops retracing), then `gc.freeze()`: TensorFlow and Keras leave ~0.5M long-lived objects, and a
    full garbage collection that walks them stalls every request in flight for ~0.7 s."""
    if None not in guard.input_shape:
        for n in (1, guard.batch_size + 1):
            guard.predict(np.full((n, *guard.input_shape), guard.clip[0], np.float32))
        guard.stats = GuardStats()  # the warm-up is not traffic
    gc.freeze()


def serve(
    guard_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8501,
    upstream: str | None = None,
    token: str | None = None,
    quarantine_dir: str | os.PathLike | None = None,
    sample_accepted: float = 0.0,
    max_batch: int = 64,
    max_body_mb: float = DEFAULT_MAX_BODY_BYTES / 2**20,
    policy: str | None = None,
) -> None:
    """Load a guard directory and serve it with uvicorn until stopped (Ctrl-C or SIGTERM). The token
    falls back to $SAFETYNET_TOKEN; `policy` overrides the saved one."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sample_accepted and quarantine_dir is None:
        raise ValueError("--sample-accepted needs --quarantine DIR to store the samples in")
    if max_body_mb <= 0:
        raise ValueError(f"max_body_mb must be > 0, got {max_body_mb}")
    guard = Guard.load(guard_dir, **({"policy": policy} if policy else {}))
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who reaches the port can use the model", host)
    store = None if quarantine_dir is None else Quarantine(quarantine_dir, sample_accepted=sample_accepted)
    try:
        app = create_app(guard, upstream=upstream, token=token, quarantine=store, max_batch=max_batch,
                         max_body_bytes=int(max_body_mb * 2**20))
        _warm_up(guard)
        quiet_decoder()
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        if store is not None:
            store.close()
