"""The bad requests of `benchmarks/serving_fuzz.py`: malformed HTTP, headers, bodies, uploads, and
clients that stall, each as the raw bytes a socket sends."""
from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    stall: bool = False  # keep the connection open after sending, as a slow client would


def raw_request(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]], body: bytes = b"",
                length: bool = True) -> bytes:
    """An HTTP/1.1 request as bytes: Host and Content-Length added unless given (or `length` is False)."""
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
        Case("length-and-chunked", raw_request("POST", predict, {**json_type, "Content-Length": "5",
                                                                "Transfer-Encoding": "chunked"}, b"0\r\n\r\n")),
        Case("bad-chunk-size", raw_request("POST", predict, {**json_type, "Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n")),
        Case("chunk-longer-than-said", raw_request("POST", predict, {**json_type, "Transfer-Encoding": "chunked"},
                                                b"2\r\n{}}}}\r\n0\r\n\r\n")),
        Case("unknown-transfer-encoding", raw_request("POST", predict, {**json_type, "Transfer-Encoding": "gzip"}, b"{}")),
        Case("huge-content-length", raw_request("POST", predict, {**json_type, "Content-Length": "9" * 30}, b"{}")),
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
        Case("websocket-upgrade", raw_request("GET", "/healthz", {"Connection": "Upgrade", "Upgrade": "websocket",
                                                               "Sec-WebSocket-Version": "13",
                                                               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})),
        Case("h2c-upgrade", raw_request("GET", "/healthz", {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                                                         "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})),
        Case("expect-continue-too-big", raw_request("POST", predict, {**json_type, "Expect": "100-continue",
                                                                    "Content-Length": str(max_body * 4)})),
        Case("trailing-slash-host", raw_request("GET", "/healthz/", {"Host": "evil.example"})),
        Case("path-traversal", raw_request("GET", "/../../etc/passwd", {})),
        Case("double-slash", raw_request("GET", "//healthz", {})),
        Case("options", raw_request("OPTIONS", "/healthz", {})),
        Case("delete-predict", raw_request("DELETE", predict, {})),
        Case("get-predict", raw_request("GET", predict, {})),
        Case("put-healthz", raw_request("PUT", "/healthz", {}, b"x")),
        Case("trace", raw_request("TRACE", "/healthz", {})),
        Case("unknown-model", raw_request("POST", "/v1/models/other:predict", json_type, good.encode())),
        Case("model-name-unicode", raw_request("POST", "/v1/models/%E2%98%83:predict", json_type, good.encode())),
        Case("long-authorization", raw_request("GET", "/metrics", {"Authorization": "Bearer " + "a" * 8000})),
        Case("pipelined-bad-after-good", raw_request("GET", "/healthz", {}) + b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n"),
        # the request body
        Case("empty-body", raw_request("POST", predict, {**json_type, "Content-Length": "0"})),
        Case("malformed-json", raw_request("POST", predict, json_type, b'{"instances": [')),
        Case("not-utf8", raw_request("POST", predict, json_type, b"\xff\xfe\xfa")),
        Case("json-array", raw_request("POST", predict, json_type, b"[1, 2]")),
        Case("json-string", raw_request("POST", predict, json_type, b'"instances"')),
        Case("json-null", raw_request("POST", predict, json_type, b"null")),
        Case("missing-instances", raw_request("POST", predict, json_type, b"{}")),
        Case("instances-number", raw_request("POST", predict, json_type, b'{"instances": 3}')),
        Case("empty-batch", raw_request("POST", predict, json_type, b'{"instances": []}')),
        Case("batch-over-limit", raw_request("POST", predict, json_type,
                                          json.dumps({"instances": [np.zeros(shape).tolist()] * (max_batch + 1)}).encode())),
        Case("wrong-rank", raw_request("POST", predict, json_type, b'{"instances": [[0.5, 0.5]]}')),
        Case("wrong-shape", raw_request("POST", predict, json_type,
                                     json.dumps({"instances": [np.zeros((shape[0] + 1, *shape[1:])).tolist()]}).encode())),
        Case("nan-token", raw_request("POST", predict, json_type, good.replace("0.5", "NaN", 1).encode())),
        Case("infinity", raw_request("POST", predict, json_type, good.replace("0.5", "1e400", 1).encode())),
        Case("out-of-range", raw_request("POST", predict, json_type, good.replace("0.5", "7", 1).encode())),
        Case("string-pixel", raw_request("POST", predict, json_type, good.replace("0.5", '"0.5"', 1).encode())),
        Case("null-pixel", raw_request("POST", predict, json_type, good.replace("0.5", "null", 1).encode())),
        Case("bool-pixel", raw_request("POST", predict, json_type, good.replace("0.5", "true", 1).encode())),
        Case("huge-integer", raw_request("POST", predict, json_type, good.replace("0.5", "1" + "0" * 400, 1).encode())),
        Case("ragged", raw_request("POST", predict, json_type, good.replace("0.5", "[0.5, 0.5]", 1).encode())),
        Case("deep-nesting", raw_request("POST", predict, json_type, b"[" * 100_000)),
        Case("duplicate-keys", raw_request("POST", predict, json_type, b'{"instances": [], "instances": 3}')),
        Case("body-over-limit", raw_request("POST", predict, json_type, b" " * (max_body + 1))),
        Case("chunked-over-limit", raw_request("POST", predict, {**json_type, "Transfer-Encoding": "chunked"},
                                            b"".join(b"%x\r\n%s\r\n" % (50_000, b" " * 50_000)
                                                     for _ in range(max_body // 50_000 + 2)) + b"0\r\n\r\n")),
        Case("wrong-content-type", raw_request("POST", predict, {"Content-Type": "text/plain"}, good.encode())),
        Case("weird-content-type", raw_request("POST", predict, {"Content-Type": "application/json; charset=\xe9\xff"},
                                            good.encode())),
        Case("npy-garbage", raw_request("POST", predict, npy_type, b"\x93NUMPY garbage")),
        Case("npy-pickle", raw_request("POST", predict, npy_type, _npy(np.array([{"a": 1}], dtype=object)))),
        Case("npy-object-header", raw_request("POST", predict, npy_type, _npy_header((1, *shape), "|O", b"\0" * 64))),
        Case("npy-claims-4tib", raw_request("POST", predict, npy_type, _npy_header((4, 2**20, 2**18, 1)))),
        Case("npy-claims-64gib", raw_request("POST", predict, npy_type, _npy_header((1, 2**17, 2**17, 1), "<f4", b"\0" * 64))),
        Case("npy-negative-dim", raw_request("POST", predict, npy_type, _npy_header((1, -8, 8, 1)))),
        Case("npy-short-data", raw_request("POST", predict, npy_type, _npy_header((1, *shape), "<f4", b"\0" * 7))),
        Case("npy-int", raw_request("POST", predict, npy_type, _npy(np.zeros((1, *shape), np.int64)))),
        Case("npy-structured", raw_request("POST", predict, npy_type, _npy(np.zeros((1, *shape), [("a", "<f4")])))),
        Case("npy-complex", raw_request("POST", predict, npy_type, _npy(np.zeros((1, *shape), np.complex64)))),
        Case("npy-rank3", raw_request("POST", predict, npy_type, _npy(np.zeros(shape, np.float32)))),
        Case("npy-nan", raw_request("POST", predict, npy_type, _npy(np.full((1, *shape), np.nan, np.float32)))),
        Case("npy-version-3", raw_request("POST", predict, npy_type, b"\x93NUMPY\x03\x00" + b"\x10\x00\x00\x00" + b"{}" * 8)),
        Case("npy-huge-header-length", raw_request("POST", predict, npy_type, b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{")),
        Case("npy-header-code", raw_request("POST", predict, npy_type,
                                         b"\x93NUMPY\x01\x00\x40\x00" + b"{'descr': __import__('os'), 'shape': ()}".ljust(64))),
        # uploads
        Case("classify-text", raw_request("POST", classify, {"Content-Type": "text/plain"}, b"hello")),
        Case("classify-empty-jpeg", raw_request("POST", classify, {"Content-Type": "image/jpeg", "Content-Length": "0"})),
        Case("classify-not-an-image", raw_request("POST", classify, {"Content-Type": "image/png"}, b"not a png at all")),
        Case("classify-truncated-jpeg", raw_request("POST", classify, {"Content-Type": "image/jpeg"},
                                                 b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")),
        Case("classify-png-bomb", raw_request("POST", classify, {"Content-Type": "image/png"}, _png_header(100_000, 100_000))),
        Case("classify-png-zero", raw_request("POST", classify, {"Content-Type": "image/png"}, _png_header(0, 0))),
        Case("multipart-no-boundary", raw_request("POST", classify, {"Content-Type": "multipart/form-data"}, b"--x\r\n")),
        Case("multipart-broken", raw_request("POST", classify, {"Content-Type": "multipart/form-data; boundary=x"},
                                          b"--x\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.png\"\r\n\r\nabc")),
        Case("multipart-text-field", raw_request("POST", classify, {"Content-Type": "multipart/form-data; boundary=x"},
                                              b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nhello\r\n--x--\r\n")),
        Case("multipart-empty", raw_request("POST", classify, {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--\r\n")),
        Case("multipart-too-many", raw_request("POST", classify, {"Content-Type": "multipart/form-data; boundary=x"},
                                            b"".join(b"--x\r\nContent-Disposition: form-data; name=\"f%d\"; "
                                                     b"filename=\"f.png\"\r\n\r\nx\r\n" % i for i in range(max_batch + 5))
                                            + b"--x--\r\n")),
        # slow and silent clients
        Case("idle-connection", b"", stall=True),
        Case("half-sent-head", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", stall=True),
        Case("request-line-only", b"POST " + predict.encode(), stall=True),
        Case("short-body", raw_request("POST", predict, {**json_type, "Content-Length": "1000"}, b"{", length=False), stall=True),
        Case("chunked-stall", raw_request("POST", predict, {**json_type, "Transfer-Encoding": "chunked"}, b"5\r\n{\"ins"),
             stall=True),
    ]
    return cases
