"""ASGI plumbing of the HTTP service: the `Gate` middleware (request ids, the bearer token, the body
size limit, request metrics, a catch-all for unexpected exceptions) and the JSON error answer every
refusal shares: {"error": message, "request_id": id}."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal: answered with HTTP `status`, {"error": message} and any extra `headers`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


def error_response(status: int, message: str, request_id: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every error answer."""
    return JSONResponse({"error": message, "request_id": request_id}, status, headers)


def endpoint_label(path: str) -> str:
    """The metrics label of a path (a fixed set, whatever clients send)."""
    if path.startswith("/v1/models/"):
        return next((verb for verb in ("predict", "classify") if path.endswith(f":{verb}")), "status")
    return path[1:] if path in ("/healthz", "/metrics") else "other"


class Gate:
    """ASGI middleware around the app: request ids, the bearer token, the body size limit (from
    Content-Length and while reading), a deadline for the whole body (`body_timeout` seconds from
    the request head: 408), request metrics, and a catch-all that logs an unexpected exception and
    answers 500 without its trace."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, token: str | None, max_body_bytes: int,
                 metrics: ServiceMetrics, body_timeout: float = 30.0) -> None:
        self.app = app
        self.body_timeout = body_timeout
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

        more_body = True

        async def limited_receive() -> dict:
            nonlocal received, more_body
            if not more_body:  # the body is in: only a disconnect can follow, no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), started + self.body_timeout - time.perf_counter())
            except asyncio.TimeoutError:
                raise _BodyTooSlow from None
            more_body = message.get("more_body", False) and message["type"] == "http.request"
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _BodyTooLarge
            return message

        async def answer(code: int, message: str) -> None:
            headers = {"WWW-Authenticate": "Bearer"} if code == 401 else {}
            if code in (408, 413):  # the rest of the body is not worth reading: close after the answer
                headers["Connection"] = "close"
            await error_response(code, message, request_id, headers)(scope, receive, send_with_id)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await answer(*refusal)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            await answer(413, f"the request body is over the limit of {self.max_body_bytes} bytes")
        except _BodyTooSlow:
            await answer(408, f"the request body did not arrive within {self.body_timeout} s")
        except ClientDisconnect:
            status = 499  # the client left; nobody to answer
        except Exception:
            log.exception("request %s failed", request_id)
            if not responded:
                await answer(500, "internal error")
        finally:
            self.metrics.observe_request(endpoint_label(scope["path"]), status, time.perf_counter() - started)
