"""A corpus of bad requests against `safetynet serve`: malformed bodies, headers and HTTP, sent on raw
sockets; counts 5xx answers, hangs and error answers that are not JSON with a request id; prints JSON.

    python benchmarks/serving_fuzz.py                  # digits guard built here, `safetynet serve` as a subprocess
    python benchmarks/serving_fuzz.py --repeat 20      # every case 20 times

Each case is raw bytes (optionally followed by silence: the client stalls). A case passes when the
server answers with a status below 500 and, for 4xx, a JSON body {"error", "request_id"} whose id is
the X-Request-ID header, or closes the connection (cases where no request ever arrived), within
its deadline; anything else is a hang. `tests/test_http_corpus.py` runs the corpus in pytest.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving_fuzz_corpus import Case, corpus, raw_request  # noqa: E402
from benchmarks.serving_process import build_guard, free_port, start_server, wait_until_up  # noqa: E402
from benchmarks.timing import emit  # noqa: E402


@dataclass(frozen=True)
class Outcome:
    name: str
    status: int | None  # None: closed without an answer
    seconds: float
    hang: bool
    json_error: bool  # a 4xx/5xx body that is {"error", "request_id"} matching X-Request-ID


def _complete(received: bytes) -> bool:
    """Whether `received` holds at least one whole answer (head and Content-Length bytes of body)."""
    head, found, body = received.partition(b"\r\n\r\n")
    if not found:
        return False
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return len(body) >= length


def send(host: str, port: int, case: Case, deadline: float) -> Outcome:
    """Send one case; read until the server has answered (and a moment more, for pipelined answers)
    or closed. A hang: neither within `deadline` seconds."""
    began = time.monotonic()
    received, hang = b"", False
    with socket.create_connection((host, port), timeout=deadline) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(case.data)
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                hang = not _complete(received)
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            if _complete(received):
                sock.settimeout(0.3)
            if time.monotonic() - began > deadline:
                hang = not _complete(received)
                break
    seconds = time.monotonic() - began
    status, json_error = None, True
    for answer in received.split(b"HTTP/1.1 ")[1:]:  # a pipelined case gets one answer per request
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        code = int(lines[0].split()[0])
        status = max(status or 0, code)
        if code >= 400:
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            length = int(headers.get("content-length", len(body)))
            try:
                error = json.loads(body[:length])
                json_error &= bool(error.get("error")) and error.get("request_id") == headers.get("x-request-id")
            except ValueError:
                json_error = False
    return Outcome(case.name, status, seconds, hang, json_error)


def summarize(outcomes: list[Outcome]) -> dict:
    """The figures the issue asks for, and the failing cases by name."""
    server_errors = [o.name for o in outcomes if o.status is not None and o.status >= 500]
    return {
        "requests": len(outcomes),
        "cases": len({o.name for o in outcomes}),
        "status_counts": dict(sorted(Counter(str(o.status) for o in outcomes).items())),
        "server_errors_5xx": len(server_errors),
        "hangs": sum(o.hang for o in outcomes),
        "errors_not_json_with_request_id": sum(o.status is not None and o.status >= 400 and not o.json_error
                                               for o in outcomes),
        "slowest_s": round(max(o.seconds for o in outcomes), 2),
        "failing": sorted({o.name for o in outcomes if o.hang or not o.json_error} | set(server_errors)),
        "by_case": {o.name: o.status for o in outcomes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="times each case is sent (default 5)")
    parser.add_argument("--head-timeout", type=float, default=2.0)
    parser.add_argument("--body-timeout", type=float, default=2.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        guard = build_guard(Path(scratch) / "guard")
        port = free_port()
        server = start_server(Path(scratch) / "guard", port, Path(scratch) / "serve.log", "--max-body-mb", "1",
                              "--max-batch", "16", "--head-timeout", str(args.head_timeout),
                              "--body-timeout", str(args.body_timeout))
        try:
            wait_until_up(server, port)
            cases = corpus(guard.name, guard.input_shape, 16, 2**20)
            deadline = args.head_timeout + args.body_timeout + 5
            outcomes = [send("127.0.0.1", port, case, deadline) for _ in range(args.repeat) for case in cases]
            alive = send("127.0.0.1", port, Case("health", raw_request("GET", "/healthz", {})), deadline).status == 200
        finally:
            server.terminate()
            server.wait(30)
        log = server.log.read_text(errors="replace")
    emit({**summarize(outcomes), "server_alive_after": alive, "tracebacks_in_log": log.count("Traceback"),
          "repeat": args.repeat, "head_timeout_s": args.head_timeout, "body_timeout_s": args.body_timeout})


if __name__ == "__main__":
    main()
