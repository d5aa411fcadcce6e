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
import io
import json
import os
import socket
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    stall: bool = False  # keep the connection open after sending, as a slow client would


@dataclass(frozen=True)
class Outcome:
    name: str
    status: int | None  # None: closed without an answer
    seconds: float
    hang: bool
    json_error: bool  # a 4xx/5xx body that is {"error", "request_id"} matching X-Request-ID


def _request(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]], body: bytes = b"",
             length: bool = True) -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if length and body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in items):
        items.append(("Content-Length", str(len(body))))
    if not any(k.lower() == "host" for k, _ in items):
        items.insert(0, ("Host", "localhost"))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in items)
    return head.encode("latin-1") + b"\r\n" + body


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _npy_header(shape: tuple, descr: str = "<f4", data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (an IHDR and an IEND, no pixels)."""
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    chunk = len(ihdr[4:]).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def corpus(name: str, shape: tuple[int, int, int], max_batch: int, max_body: int) -> list[Case]:
    """Every malformed body, header and protocol case, for a guard `name` taking `shape` images."""
    predict, classify = f"/v1/models/{name}:predict", f"/v1/models/{name}:classify"
    json_type = {"Content-Type": "application/json"}
    npy_type = {"Content-Type": "application/x-npy"}
    good = json.dumps({"instances": [np.full(shape, 0.5).tolist()]})
    cases = [
        # the HTTP layer
        Case("bad-content-length", b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
        Case("negative-content-length", b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
        Case("two-content-lengths", b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        Case("length-and-chunked", _request("POST", predict, {**json_type, "Content-Length": "5",
                                                                "Transfer-Encoding": "chunked"}, b"0\r\n\r\n")),
        Case("bad-chunk-size", _request("POST", predict, {**json_type, "Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n")),
        Case("chunk-longer-than-said", _request("POST", predict, {**json_type, "Transfer-Encoding": "chunked"},
                                                b"2\r\n{}}}}\r\n0\r\n\r\n")),
        Case("unknown-transfer-encoding", _request("POST", predict, {**json_type, "Transfer-Encoding": "gzip"}, b"{}")),
        Case("huge-content-length", _request("POST", predict, {**json_type, "Content-Length": "9" * 30}, b"{}")),
        Case("non-ascii-path", b"GET /health\xffz HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("control-char-path", b"GET /he\x01althz HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("bad-percent-path", b"GET /%zz%ff%00 HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("space-in-path", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("url-100kb", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("query-100kb", b"GET /healthz?" + b"a=1&" * 25_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("header-1mb", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"),
        Case("5000-headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n"),
        Case("header-without-colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n"),
        Case("obs-fold-header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b\r\n  folded\r\n\r\n"),
        Case("nul-in-header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n"),
        Case("no-host", b"GET /healthz HTTP/1.1\r\n\r\n"),
        Case("two-hosts", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        Case("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        Case("http09", b"GET /healthz\r\n\r\n"),
        Case("http-version-9", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n"),
        Case("binary-garbage", bytes(range(256)) * 4),
        Case("lf-only-lines", b"GET /healthz HTTP/1.1\nHost: x\n\n"),
        Case("unknown-method", b"FOO /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("lowercase-method", b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("absolute-form", b"GET http://evil.example/healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"),
        Case("connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"),
        Case("websocket-upgrade", _request("GET", "/healthz", {"Connection": "Upgrade", "Upgrade": "websocket",
                                                               "Sec-WebSocket-Version": "13",
                                                               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})),
        Case("h2c-upgrade", _request("GET", "/healthz", {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                                                         "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})),
        Case("expect-continue-too-big", _request("POST", predict, {**json_type, "Expect": "100-continue",
                                                                    "Content-Length": str(max_body * 4)})),
        Case("trailing-slash-host", _request("GET", "/healthz/", {"Host": "evil.example"})),
        Case("path-traversal", _request("GET", "/../../etc/passwd", {})),
        Case("double-slash", _request("GET", "//healthz", {})),
        Case("options", _request("OPTIONS", "/healthz", {})),
        Case("delete-predict", _request("DELETE", predict, {})),
        Case("get-predict", _request("GET", predict, {})),
        Case("put-healthz", _request("PUT", "/healthz", {}, b"x")),
        Case("trace", _request("TRACE", "/healthz", {})),
        Case("unknown-model", _request("POST", "/v1/models/other:predict", json_type, good.encode())),
        Case("model-name-unicode", _request("POST", "/v1/models/%E2%98%83:predict", json_type, good.encode())),
        Case("long-authorization", _request("GET", "/metrics", {"Authorization": "Bearer " + "a" * 8000})),
        Case("pipelined-bad-after-good", _request("GET", "/healthz", {}) + b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n"),
        # the request body
        Case("empty-body", _request("POST", predict, {**json_type, "Content-Length": "0"})),
        Case("malformed-json", _request("POST", predict, json_type, b'{"instances": [')),
        Case("not-utf8", _request("POST", predict, json_type, b"\xff\xfe\xfa")),
        Case("json-array", _request("POST", predict, json_type, b"[1, 2]")),
        Case("json-string", _request("POST", predict, json_type, b'"instances"')),
        Case("json-null", _request("POST", predict, json_type, b"null")),
        Case("missing-instances", _request("POST", predict, json_type, b"{}")),
        Case("instances-number", _request("POST", predict, json_type, b'{"instances": 3}')),
        Case("empty-batch", _request("POST", predict, json_type, b'{"instances": []}')),
        Case("batch-over-limit", _request("POST", predict, json_type,
                                          json.dumps({"instances": [np.zeros(shape).tolist()] * (max_batch + 1)}).encode())),
        Case("wrong-rank", _request("POST", predict, json_type, b'{"instances": [[0.5, 0.5]]}')),
        Case("wrong-shape", _request("POST", predict, json_type,
                                     json.dumps({"instances": [np.zeros((shape[0] + 1, *shape[1:])).tolist()]}).encode())),
        Case("nan-token", _request("POST", predict, json_type, good.replace("0.5", "NaN", 1).encode())),
        Case("infinity", _request("POST", predict, json_type, good.replace("0.5", "1e400", 1).encode())),
        Case("out-of-range", _request("POST", predict, json_type, good.replace("0.5", "7", 1).encode())),
        Case("string-pixel", _request("POST", predict, json_type, good.replace("0.5", '"0.5"', 1).encode())),
        Case("null-pixel", _request("POST", predict, json_type, good.replace("0.5", "null", 1).encode())),
        Case("bool-pixel", _request("POST", predict, json_type, good.replace("0.5", "true", 1).encode())),
        Case("huge-integer", _request("POST", predict, json_type, good.replace("0.5", "1" + "0" * 400, 1).encode())),
        Case("ragged", _request("POST", predict, json_type, good.replace("0.5", "[0.5, 0.5]", 1).encode())),
        Case("deep-nesting", _request("POST", predict, json_type, b"[" * 100_000)),
        Case("duplicate-keys", _request("POST", predict, json_type, b'{"instances": [], "instances": 3}')),
        Case("body-over-limit", _request("POST", predict, json_type, b" " * (max_body + 1))),
        Case("chunked-over-limit", _request("POST", predict, {**json_type, "Transfer-Encoding": "chunked"},
                                            b"".join(b"%x\r\n%s\r\n" % (50_000, b" " * 50_000)
                                                     for _ in range(max_body // 50_000 + 2)) + b"0\r\n\r\n")),
        Case("wrong-content-type", _request("POST", predict, {"Content-Type": "text/plain"}, good.encode())),
        Case("weird-content-type", _request("POST", predict, {"Content-Type": "application/json; charset=\xe9\xff"},
                                            good.encode())),
        Case("npy-garbage", _request("POST", predict, npy_type, b"\x93NUMPY garbage")),
        Case("npy-pickle", _request("POST", predict, npy_type, _npy(np.array([{"a": 1}], dtype=object)))),
        Case("npy-object-header", _request("POST", predict, npy_type, _npy_header((1, *shape), "|O", b"\0" * 64))),
        Case("npy-claims-4tib", _request("POST", predict, npy_type, _npy_header((4, 2**20, 2**18, 1)))),
        Case("npy-claims-64gib", _request("POST", predict, npy_type, _npy_header((1, 2**17, 2**17, 1), "<f4", b"\0" * 64))),
        Case("npy-negative-dim", _request("POST", predict, npy_type, _npy_header((1, -8, 8, 1)))),
        Case("npy-short-data", _request("POST", predict, npy_type, _npy_header((1, *shape), "<f4", b"\0" * 7))),
        Case("npy-int", _request("POST", predict, npy_type, _npy(np.zeros((1, *shape), np.int64)))),
        Case("npy-structured", _request("POST", predict, npy_type, _npy(np.zeros((1, *shape), [("a", "<f4")])))),
        Case("npy-complex", _request("POST", predict, npy_type, _npy(np.zeros((1, *shape), np.complex64)))),
        Case("npy-rank3", _request("POST", predict, npy_type, _npy(np.zeros(shape, np.float32)))),
        Case("npy-nan", _request("POST", predict, npy_type, _npy(np.full((1, *shape), np.nan, np.float32)))),
        Case("npy-version-3", _request("POST", predict, npy_type, b"\x93NUMPY\x03\x00" + b"\x10\x00\x00\x00" + b"{}" * 8)),
        Case("npy-huge-header-length", _request("POST", predict, npy_type, b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{")),
        Case("npy-header-code", _request("POST", predict, npy_type,
                                         b"\x93NUMPY\x01\x00\x40\x00" + b"{'descr': __import__('os'), 'shape': ()}".ljust(64))),
        # uploads
        Case("classify-text", _request("POST", classify, {"Content-Type": "text/plain"}, b"hello")),
        Case("classify-empty-jpeg", _request("POST", classify, {"Content-Type": "image/jpeg", "Content-Length": "0"})),
        Case("classify-not-an-image", _request("POST", classify, {"Content-Type": "image/png"}, b"not a png at all")),
        Case("classify-truncated-jpeg", _request("POST", classify, {"Content-Type": "image/jpeg"},
                                                 b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")),
        Case("classify-png-bomb", _request("POST", classify, {"Content-Type": "image/png"}, _png_header(100_000, 100_000))),
        Case("classify-png-zero", _request("POST", classify, {"Content-Type": "image/png"}, _png_header(0, 0))),
        Case("multipart-no-boundary", _request("POST", classify, {"Content-Type": "multipart/form-data"}, b"--x\r\n")),
        Case("multipart-broken", _request("POST", classify, {"Content-Type": "multipart/form-data; boundary=x"},
                                          b"--x\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.png\"\r\n\r\nabc")),
        Case("multipart-text-field", _request("POST", classify, {"Content-Type": "multipart/form-data; boundary=x"},
                                              b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nhello\r\n--x--\r\n")),
        Case("multipart-empty", _request("POST", classify, {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--\r\n")),
        Case("multipart-too-many", _request("POST", classify, {"Content-Type": "multipart/form-data; boundary=x"},
                                            b"".join(b"--x\r\nContent-Disposition: form-data; name=\"f%d\"; "
                                                     b"filename=\"f.png\"\r\n\r\nx\r\n" % i for i in range(max_batch + 5))
                                            + b"--x--\r\n")),
        # slow and silent clients
        Case("idle-connection", b"", stall=True),
        Case("half-sent-head", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", stall=True),
        Case("request-line-only", b"POST " + predict.encode(), stall=True),
        Case("short-body", _request("POST", predict, {**json_type, "Content-Length": "1000"}, b"{", length=False), stall=True),
        Case("chunked-stall", _request("POST", predict, {**json_type, "Transfer-Encoding": "chunked"}, b"5\r\n{\"ins"),
             stall=True),
    ]
    return cases


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
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.serving_load import build_digits_guard, free_port, start_server, wait_until_up

    with tempfile.TemporaryDirectory() as scratch:
        guard = build_digits_guard(Path(scratch) / "guard")
        port = free_port()
        server = start_server(Path(scratch) / "guard", port, Path(scratch) / "serve.log", "--max-body-mb", "1",
                              "--max-batch", "16", "--head-timeout", str(args.head_timeout),
                              "--body-timeout", str(args.body_timeout))
        try:
            wait_until_up(server, port)
            cases = corpus(guard.name, guard.input_shape, 16, 2**20)
            deadline = args.head_timeout + args.body_timeout + 5
            outcomes = [send("127.0.0.1", port, case, deadline) for _ in range(args.repeat) for case in cases]
            alive = send("127.0.0.1", port, Case("health", _request("GET", "/healthz", {})), deadline).status == 200
        finally:
            server.terminate()
            server.wait(30)
        log = server.log.read_text(errors="replace")
    print(json.dumps({**summarize(outcomes), "server_alive_after": alive,
                      "tracebacks_in_log": log.count("Traceback"), "repeat": args.repeat,
                      "head_timeout_s": args.head_timeout, "body_timeout_s": args.body_timeout}, indent=2))


if __name__ == "__main__":
    main()
