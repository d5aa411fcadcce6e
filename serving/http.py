"""The HTTP service's app: a TF-Serving-compatible REST API in front of a Guard (`safetynet serve`).

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
null. The inputs of concurrent requests are merged into one guard call (`serving.batcher`).

With `upstream` (a TF Serving model URL such as http://host:8501/v1/models/x) only the accepted inputs
are sent on, in one `:predict` call (`serving.upstream`), and its predictions (one class-score vector
each) fill in "probabilities"; rejected inputs never leave this process. An unreachable or failing
upstream answers 502 (504 on a timeout). Every error is JSON {"error": message, "request_id": id};
every answer carries an `X-Request-ID` header (the id quarantine records carry too); see
`serving.asgi`. Bodies and image files are read and checked by `serving.validation`, whose refusals
are answered with 4xx. `serving.server` runs the app under uvicorn.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

try:
    import anyio
    import httpx
    import orjson
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
except ImportError as error:  # pragma: no cover
    raise ImportError(f"the HTTP service needs the serve extra: pip install 'safetynet[serve]' ({error})") from error

from serving.asgi import ApiError, Gate, error_response
from serving.answers import AnswerPolicy, prediction_rows
from serving.batcher import Batcher
from serving.clients import ClientIdentity
from serving.guard import Guard
from serving.inputs import InputError
from serving.metrics import ServiceMetrics
from serving.query_gate import ClientGate, QueryAttackMetrics, screen
from serving.stateful import QueryAttackDetector
from serving.quarantine import QuarantineFull
from serving.upstream import checked_upstream_url, forward
from serving.validation import classify_batch, predict_batch

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
MERGE_IMAGES = 256  # most inputs of concurrent requests merged into one guard call
MODEL_VERSION = "1"

log = logging.getLogger(__name__)


def create_app(
    guard: Guard,
    *,
    upstream: str | None = None,
    token: str | None = None,
    quarantine: Any | None = None,
    max_batch: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    upstream_timeout: float = 10.0,
    clients: ClientIdentity | None = None,
    query_detector: QueryAttackDetector | None = None,
    answers: AnswerPolicy = AnswerPolicy(),
    quarantine_wait: float = 10.0,
    body_timeout: float = 30.0,
) -> FastAPI:
    """The service for one guard (served under `guard.name`). `quarantine`: a `serving.quarantine.Quarantine`
    that receives every guarded batch with its verdicts; an answer waits (up to `quarantine_wait`
    seconds) until its records are committed, so every answered reject is stored. `answers`: what
    the response rows carry (`serving.answers`). A body must arrive within `body_timeout` seconds
    of the request head (408)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if token is not None and not token:
        raise ValueError("token must be a non-empty string (or None for no authentication)")
    if upstream is not None:
        upstream = checked_upstream_url(upstream)
    for name, seconds in (("quarantine_wait", quarantine_wait), ("body_timeout", body_timeout)):
        if not seconds > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {seconds}")
    metrics = ServiceMetrics(guard, max_batch, quarantine)
    query_metrics = None if query_detector is None else QueryAttackMetrics(metrics.registry, query_detector.rule.top_k)
    fingerprint = guard.classifier_fingerprint
    resources: dict[str, Any] = {}  # made in the server's event loop, at startup

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resources["decode"] = anyio.CapacityLimiter(os.cpu_count() or 1)  # image decoding: one per core
        resources["batcher"] = batcher = Batcher(guard, max(MERGE_IMAGES, max_batch))
        async with httpx.AsyncClient(timeout=upstream_timeout) as client, anyio.create_task_group() as tasks:
            resources["upstream"] = client
            tasks.start_soon(batcher.run)
            yield
            tasks.cancel_scope.cancel()

    # redirect_slashes off: Starlette's redirect for /healthz/ would echo the client's Host header
    app = FastAPI(title="safetynet", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  redirect_slashes=False)
    # added before Gate, so it runs inside it: Gate sets the request id that ClientGate's refusals carry
    app.add_middleware(ClientGate, clients=clients or ClientIdentity(), detector=query_detector, metrics=query_metrics)
    app.add_middleware(Gate, token=token, max_body_bytes=max_body_bytes, metrics=metrics, body_timeout=body_timeout)

    @app.exception_handler(ApiError)
    @app.exception_handler(HTTPException)
    @app.exception_handler(InputError)
    async def refuse(request: Request, error: Exception) -> JSONResponse:
        headers = None
        if isinstance(error, ApiError):
            status, message, headers = error.status, error.message, error.headers
        elif isinstance(error, InputError):
            status, message = 400, str(error)
        else:
            status, message = error.status_code, error.detail
        return error_response(status, message, request.state.request_id, headers)

    def check_name(name: str) -> None:
        if name != guard.name:
            raise ApiError(404, f"model {name!r} not found; this server serves {guard.name!r}")

    async def store(x: np.ndarray, result: Any, request_id: str, query_attack: np.ndarray) -> None:
        """Quarantine the batch and wait for the commit; 503 (retry) when the writer is behind. Inputs
        of a query attack are kept with reason "query_attack"."""
        try:
            # flagged, not rejected: under --policy flag the quarantine still collects the suspects
            committed = [quarantine.record(x[rows], result.scores[rows], result.flagged[rows], request_id=request_id,
                                           model=guard.name, classifier_fingerprint=fingerprint, reason=reason)
                         for rows, reason in ((~query_attack, None), (query_attack, "query_attack")) if rows.any()]
        except QuarantineFull as error:
            log.warning("request %s: %s", request_id, error)
            raise ApiError(503, "the quarantine is behind: retry in a second", {"Retry-After": "1"}) from None
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*map(asyncio.wrap_future, committed))), quarantine_wait)
        except Exception:  # the quarantine is for review later: never fail the answer over it
            log.exception("request %s: the quarantine did not store the batch", request_id)
            metrics.quarantine_errors.inc()

    async def respond(request: Request, x: np.ndarray) -> Response:
        """Guard the checked batch, hand it to the quarantine, ask the upstream about the accepted inputs."""
        request_id = request.state.request_id
        result = await resources["batcher"].predict(x)
        query_attack = np.zeros(len(x), bool)
        if query_detector is not None:  # a query attack: near copies of this client's recent queries
            result, query_attack = await screen(query_detector, query_metrics, request.state.client, x, result, request_id)
        metrics.observe_result(result)
        if quarantine is not None:
            await store(x, result, request_id, query_attack)
        probabilities = result.probabilities
        if upstream is not None:
            accepted = ~result.rejected
            probabilities = None
            if accepted.any():
                scores = await forward(resources["upstream"], upstream, x[accepted], request_id, metrics)
                probabilities = np.zeros((len(x), scores.shape[1]))
                probabilities[accepted] = scores
        rows = prediction_rows(result, probabilities, answers)
        return Response(orjson.dumps({"predictions": rows}), media_type="application/json")

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request) -> Response:
        check_name(name)
        return await respond(request, await predict_batch(request, guard, max_batch))

    @app.post("/v1/models/{name}:classify")
    async def classify(name: str, request: Request) -> Response:
        check_name(name)
        return await respond(request, await classify_batch(request, guard, max_batch, resources["decode"]))

    @app.get("/v1/models/{name}")
    async def status(name: str) -> dict[str, Any]:
        if ":" in name:  # GET /v1/models/<name>:predict lands here
            raise ApiError(405, f"use POST for /v1/models/{name}")
        check_name(name)
        return {"model_version_status": [{"version": MODEL_VERSION, "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    return app
