"""The HTTP/1.1 protocol under the service: uvicorn's h11 implementation with clean failures.

uvicorn answers malformed HTTP (a bad Content-Length, bad chunking, bytes outside ASCII in the path)
with a plain-text 400 and no request id, and waits forever for a request head that never completes.
`GuardedH11Protocol` answers those like every other error of the service, JSON
{"error": message, "request_id": id} with an X-Request-ID header, with 414 for a target over 8 KiB
(or the head limit) and 431 for a head over the size limit, and closes a connection whose request head has not arrived
within `head_timeout` seconds (408). Idle keep-alive connections close after uvicorn's
`timeout_keep_alive`; a body that stalls is the app's `body_timeout` (`serving.asgi`).
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_URL_BYTES = 8 * 1024  # the request line's target, at most (and at most the head limit)
DEFAULT_HEAD_BYTES = 16 * 1024  # h11's and uvicorn's default limit on a request head
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class _Connection(h11.Connection):
    """h11's connection with limits on a complete request head (h11 limits only the incomplete
    one: a long head that arrives in one read would pass), remembering the protocol error it raised
    last (uvicorn drops it)."""

    last_error: h11.RemoteProtocolError | None = None

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(h11.SERVER, max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.max_url_bytes = min(MAX_URL_BYTES, max_head_bytes)

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                if len(event.target) > self.max_url_bytes:
                    raise h11.RemoteProtocolError(f"the request line exceeds the limit of {self.max_url_bytes} "
                                                  "bytes", error_status_hint=414)
                if sum(len(name) + len(value) + 4 for name, value in event.headers) > self.max_head_bytes:
                    raise h11.RemoteProtocolError(f"the request headers exceed the limit of {self.max_head_bytes} "
                                                  "bytes", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as error:
            self.last_error = error
            raise


def error_bytes(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 error answer that closes the connection: the service's JSON error shape."""
    request_id = uuid.uuid4().hex
    body = orjson.dumps({"error": message, "request_id": request_id})
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-request-id: %s\r\nconnection: close\r\n\r\n") % (status, REASONS[status], len(body), request_id.encode())
    return head + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol answering malformed requests with JSON errors and timing out request
    heads (see the module docstring). `head_timeout` is set by `protocol_class`."""

    head_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = self.config.h11_max_incomplete_event_size or DEFAULT_HEAD_BYTES
        self.conn = _Connection(self.max_head_bytes)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head is on its way (or the next one is)
            self._arm_head_deadline()
        else:
            self._disarm_head_deadline()

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None and not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:  # a head began, never finished
                self.transport.write(error_bytes(408, f"the request head did not arrive within {self.head_timeout} s"))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A malformed request: 414 or 431 when the head outgrew the limit, 400 otherwise, as JSON."""
        self._disarm_head_deadline()
        error = self.conn.last_error
        status = 400 if error is None else error.error_status_hint
        if status == 431 and str(error) == "Receive buffer too long":  # h11's own limit, on a head in pieces
            status = 414 if b"\r\n" not in bytes(self.conn.trailing_data[0]) else 431
            message = f"the request {'line' if status == 414 else 'headers'} exceed the limit of {self.max_head_bytes} bytes"
        elif status in (414, 431):
            message = str(error)
        else:
            status = 400 if status not in REASONS else status
            message = f"malformed HTTP request ({error or msg})"
        self.transport.write(error_bytes(status, message))
        self.transport.close()


def protocol_class(head_timeout: float) -> type[GuardedH11Protocol]:
    """`GuardedH11Protocol` with this head timeout (uvicorn instantiates the class itself)."""
    if not head_timeout > 0:
        raise ValueError(f"head_timeout must be > 0 seconds, got {head_timeout}")
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"head_timeout": float(head_timeout)})
