"""`safetynet serve`: load a guard directory and run its HTTP app (`serving.http`) under uvicorn, with
the protocol that fails cleanly (`serving.protocol`) and its limits on time and head size."""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import uvicorn
from fastapi import FastAPI

from foundation.images import quiet_decoder
from serving.answers import AnswerPolicy
from serving.guard import Guard, GuardStats
from serving.http import DEFAULT_MAX_BODY_BYTES, create_app
from serving.protocol import DEFAULT_HEAD_BYTES, protocol_class
from serving.quarantine import Quarantine
from serving.query_gate import query_detection

TOKEN_ENV = "SAFETYNET_TOKEN"

log = logging.getLogger(__name__)


def uvicorn_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8501, head_timeout: float = 10.0,
                   keep_alive: float = 5.0, max_head_bytes: int = DEFAULT_HEAD_BYTES,
                   log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for the service: JSON errors for malformed HTTP, a request line plus headers
    of at most `max_head_bytes` (414/431 beyond), `head_timeout` seconds for a request head to
    arrive, idle keep-alive connections closed after `keep_alive` seconds."""
    if max_head_bytes < 1024:
        raise ValueError(f"max_head_bytes must be >= 1024, got {max_head_bytes}")
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol_class(head_timeout),
                          timeout_keep_alive=keep_alive, h11_max_incomplete_event_size=max_head_bytes,
                          server_header=False, ws="none",  # no WebSocket: an upgrade request is plain HTTP
                          proxy_headers=False)  # client identity: serving.clients, not X-Forwarded-For


@contextlib.contextmanager
def serving_in_thread(app: FastAPI, **limits: float) -> Iterator[str]:
    """Serve `app` as `safetynet serve` configures it (`limits`: `uvicorn_config`'s) on a free
    localhost port in a background thread, for tests, benchmarks and notebooks; yields its base URL."""
    # proto IPPROTO_TCP, or asyncio leaves Nagle on for accepted connections (40 ms stalls per answer)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", **limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


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
    answers: AnswerPolicy = AnswerPolicy(),
    head_timeout: float = 10.0,
    body_timeout: float = 30.0,
    keep_alive: float = 5.0,
    max_head_kb: float = DEFAULT_HEAD_BYTES / 1024,
    tokens_file: str | os.PathLike | None = None,
    trusted_proxies: tuple[str, ...] = (),
    query_policy: str = "block",
    query_state: str = "memory",
    query_block_seconds: float = 600.0,
    query_between_window: int = 32,
) -> None:
    """Load a guard directory and serve it with uvicorn until stopped (Ctrl-C or SIGTERM). The token
    falls back to $SAFETYNET_TOKEN; `policy` overrides the saved one. Query-attack detection
    (`serving.query_gate.query_detection`): per client (`tokens_file`, else the address, behind
    `trusted_proxies` the forwarded one), `query_policy` block, reject, flag or off; the between rule
    over each client's last `query_between_window` queries (0: off)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sample_accepted and quarantine_dir is None:
        raise ValueError("--sample-accepted needs --quarantine DIR to store the samples in")
    if max_body_mb <= 0:
        raise ValueError(f"max_body_mb must be > 0, got {max_body_mb}")
    guard = Guard.load(guard_dir, **({"policy": policy} if policy else {}))
    token = token or os.environ.get(TOKEN_ENV) or None
    if token and tokens_file:
        raise ValueError("--token and --tokens are exclusive: give one shared token or per-client tokens")
    clients, query_detector = query_detection(guard, token=token, tokens_file=tokens_file, trusted_proxies=trusted_proxies,
                                              policy=query_policy, state=query_state, block_seconds=query_block_seconds,
                                              between_window=query_between_window)
    if token is None and tokens_file is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who reaches the port can use the model", host)
    store = None if quarantine_dir is None else Quarantine(quarantine_dir, sample_accepted=sample_accepted)
    try:
        app = create_app(guard, upstream=upstream, token=token, quarantine=store, max_batch=max_batch,
                         max_body_bytes=int(max_body_mb * 2**20), answers=answers, body_timeout=body_timeout,
                         clients=clients, query_detector=query_detector)
        config = uvicorn_config(app, host=host, port=port, head_timeout=head_timeout, keep_alive=keep_alive,
                                max_head_bytes=int(max_head_kb * 1024))
        _warm_up(guard)
        quiet_decoder()
        uvicorn.Server(config).run()
    finally:
        if store is not None:
            store.close()
