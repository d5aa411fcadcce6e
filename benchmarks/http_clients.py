"""HTTP clients for `benchmarks/serving_http.py`: keep-alive sessions (httpx, or raw sockets that cost
next to no CPU), threads that drive them for a while, and the mixed good/bad request load."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter

import cv2
import httpx
import numpy as np

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def percentiles(latencies: list[float]) -> dict[str, float] | None:
    """Median and 99th percentile in ms (None without latencies)."""
    if not latencies:
        return None
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


class HttpxSession:
    """One keep-alive httpx connection cycling through `requests` (httpx.request kwargs)."""

    def __init__(self, url: str, requests: list[dict], offset: int) -> None:
        self.http = httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(socket_options=NODELAY))
        self.requests, self.i = requests, offset

    def __call__(self) -> int:
        self.i += 1
        return self.http.request(**self.requests[self.i % len(self.requests)]).status_code

    def close(self) -> None:
        self.http.close()


class RawSession:
    """One keep-alive socket sending a prepared HTTP/1.1 request: a client that costs next to no CPU,
    so that on a small machine the throughput measured is the server's, not httpx's."""

    def __init__(self, port: int, path: str, body: bytes, content_type: str = "application/json") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def __call__(self) -> int:
        self.sock.sendall(self.request)
        status, length = int(self.reader.readline().split()[1]), 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.reader.read(length)
        return status

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def drive(sessions: list, seconds: float) -> tuple[list[float], Counter, int]:
    """One thread per session, each sending requests back to back for `seconds`. Returns the
    latencies of 2xx answers, answers by status code, and transport errors."""
    latencies: list[float] = []
    codes: Counter = Counter()
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(session) -> None:
        nonlocal errors
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                status = session()
            except (httpx.TransportError, OSError):
                with lock:
                    errors += 1
                continue
            elapsed = time.perf_counter() - started
            with lock:
                codes[status] += 1
                if status < 300:
                    latencies.append(elapsed)
        session.close()

    threads = [threading.Thread(target=client, args=(session,)) for session in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, codes, errors


def post_json(content: str | bytes, path: str = "/v1/models/bench:predict") -> dict:
    return {"method": "POST", "url": path, "content": content, "headers": {"content-type": "application/json"}}


def predict(x: np.ndarray, path: str = "/v1/models/bench:predict") -> dict:
    return post_json(json.dumps({"instances": x.tolist()}).encode(), path)


def load_mix(clean: np.ndarray, adversarial: np.ndarray, max_body_mb: float) -> list[dict]:
    """Valid batches of several sizes, uploads, and one of every kind of bad request."""
    good = [predict(clean[:n]) for n in (1, 8, 32, 64)] + [predict(adversarial[:n]) for n in (8, 32)]
    image = np.round(clean[0] * 255).astype(np.uint8)
    png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.shape[-1] == 3 else image)[1].tobytes()
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    uploads = [
        {"method": "POST", "url": "/v1/models/bench:classify", "content": png, "headers": {"content-type": "image/png"}},
        {"method": "POST", "url": "/v1/models/bench:classify", "files": [("file", ("a.jpg", jpeg, "image/jpeg"))] * 8},
    ]
    body = json.dumps({"instances": clean[:1].tolist()})
    bad = [
        post_json(body[:-5]), post_json(body.replace("0.", "NaN, 0.", 1)), post_json(body.replace("0.", "1.5, 0.", 1)),
        predict(clean[:1, :-1]), post_json(body.replace("]]]", "]], [0.5]]", 1)), post_json('{"instances": []}'),
        post_json(b" " * int(max_body_mb * 2**20 * 1.5)), post_json(b"[" * 50_000), predict(clean[:65]),
        predict(clean[:2], "/v1/models/other:predict"),
        {"method": "POST", "url": "/v1/models/bench:predict", "content": body, "headers": {"content-type": "text/csv"}},
        {"method": "POST", "url": "/v1/models/bench:classify", "content": png[: len(png) // 2],
         "headers": {"content-type": "image/png"}},
        {"method": "POST", "url": "/v1/models/bench:classify", "content": b"\xff\xd8garbage",
         "headers": {"content-type": "image/jpeg"}},
        {"method": "GET", "url": "/metrics"}, {"method": "GET", "url": "/v1/models/bench"},
    ]
    return good + uploads + bad
