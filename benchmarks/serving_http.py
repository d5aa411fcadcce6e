"""`safetynet serve` under load: throughput and latency against the in-process guard, then a mixed
good/bad load test that counts 5xx answers, crashes and the server's memory growth; prints JSON.

The server runs as a subprocess (`python -m safetynet.cli serve`), so its RSS is read from /proc
(Linux). Clients are threads with one keep-alive connection each and bodies encoded once; the
throughput clients write prepared HTTP/1.1 requests on raw sockets, so that on a small machine the
client's CPU does not eat into the server's.

    python benchmarks/serving_http.py                                  # digits guard (8x8x1), built here
    python benchmarks/serving_http.py --data ../shared/data/cifar10    # CIFAR-size guard (32x32x3)
    python benchmarks/serving_http.py --data ../shared/data/cifar10 --body npy   # binary .npy bodies
    python benchmarks/serving_http.py --guard runs/guard --data digits # an existing guard directory

throughput: batches of `--batch` from `--clients` clients for `--seconds-throughput` s; the ratio is
HTTP images/s over a single in-process `guard.predict` loop on the same batch (target >= 0.8).
load: `--load-clients` clients for `--seconds-load` s sending a fixed mix of valid batches (clean
and PGD), image uploads and invalid requests (bad JSON, NaN, out of range, wrong shape, ragged,
oversized, corrupt images, unknown model, wrong content type); targets: no 5xx, no crash, RSS
growth <= 10% between the end of a warm-up and the end of the run.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import httpx
import numpy as np

from attacks import FGSM, PGD
from detector import InputDetector
from foundation.storage import model_fingerprint
from serving.guard import Guard
from training.classifier import train_classifier
from training.data import load_dataset

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def build_guard(data, directory: Path, eps: float, n_train: int, epochs: int) -> Guard:
    """Classifier, FGSM examples, an input detector (calibrated at 5% FPR), saved as a guard."""
    x, y = data.x_train[:n_train], data.y_train[:n_train]
    fit = int(0.8 * len(x))
    classifier = train_classifier(x, y, data.num_classes, epochs=epochs, verbose=0)
    detector = InputDetector(epochs=3).fit(x[:fit], FGSM(eps=eps)(classifier, x[:fit], y[:fit]).x_adv, verbose=0)
    detector.calibrate(x[fit:], 0.05)
    detector.classifier_fingerprint = model_fingerprint(classifier)
    guard = Guard(classifier, detector, name="bench")
    guard.save(directory)
    return guard


def start_server(guard_dir: Path, port: int, max_body_mb: float, log_path: Path) -> subprocess.Popen:
    # --query-policy off: every client here shares one address and resends clean and PGD versions of the
    # same images, which query-attack detection would block (benchmarks/query_attacks.py measures that)
    command = [sys.executable, "-m", "safetynet.cli", "serve", "--guard", str(guard_dir), "--port", str(port),
               "--max-batch", "64", "--max-body-mb", str(max_body_mb), "--query-policy", "off"]
    process = subprocess.Popen(command, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start within 120 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(latencies: list[float]) -> dict[str, float] | None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="dataset name or path (default digits)")
    parser.add_argument("--guard", help="an existing guard directory (default: build one on --data)")
    parser.add_argument("--eps", type=float, help="FGSM/PGD budget (default 0.3 grayscale, 8/255 colour)")
    parser.add_argument("--n-train", type=int, default=5000, help="training images for the built guard")
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds-throughput", type=float, default=20)
    parser.add_argument("--load-clients", type=int, default=16)
    parser.add_argument("--seconds-load", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10, help="seconds of the load mix before the first RSS reading")
    parser.add_argument("--port", type=int, default=18501)
    parser.add_argument("--body", choices=("json", "npy"), default="json",
                        help="throughput requests as JSON instances (default) or one application/x-npy array")
    args = parser.parse_args()

    data = load_dataset(args.data)
    eps = args.eps if args.eps is not None else (0.3 if data.x_train.shape[-1] == 1 else 8 / 255)
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    guard_dir = Path(args.guard) if args.guard else work / "guard"
    if not args.guard:
        build_guard(data, guard_dir, eps, args.n_train, args.classifier_epochs)
    guard = Guard.load(guard_dir)
    clean = data.x_test[:256]
    adversarial = PGD(eps=eps)(guard.classifier, clean, data.y_test[:256]).x_adv
    batch = clean[: args.batch]
    report: dict = {"data": args.data, "input_shape": list(guard.input_shape), "detector": guard.detector.kind,
                    "cpus": os.cpu_count(), "batch": args.batch}

    guard.predict(batch)  # in-process baseline: one thread, the same batch, after a warm-up call,
    gc.freeze()  # and, as `safetynet serve` does, without full collections walking TensorFlow's objects
    calls, started, cpu = [], time.perf_counter(), time.process_time()
    while time.perf_counter() - started < args.seconds_throughput:
        t = time.perf_counter()
        guard.predict(batch)
        calls.append(time.perf_counter() - t)
    in_process = len(calls) * args.batch / (time.perf_counter() - started)
    in_process_cpu = (time.process_time() - cpu) / len(calls)

    url = f"http://127.0.0.1:{args.port}"
    # the body limit sits just above the largest valid request (64 instances), so oversized ones stay small
    max_body_mb = round(1.5 * len(predict(clean[:64])["content"]) / 2**20, 2)
    report["max_body_mb"] = max_body_mb
    process = start_server(guard_dir, args.port, max_body_mb, work / "server.log")
    try:
        if args.body == "npy":
            buffer = io.BytesIO()
            np.save(buffer, batch.astype(np.float32))
            body, content_type = buffer.getvalue(), "application/x-npy"
        else:
            body, content_type = predict(batch)["content"], "application/json"
        path = "/v1/models/bench:predict"
        drive([RawSession(args.port, path, body, content_type) for _ in range(args.clients)], 2)  # warm-up
        cpu = cpu_seconds(process.pid)
        latencies, codes, errors = drive([RawSession(args.port, path, body, content_type) for _ in range(args.clients)],
                                         args.seconds_throughput)
        server_cpu = (cpu_seconds(process.pid) - cpu) / max(1, sum(codes.values()))
        http = len(latencies) * args.batch / args.seconds_throughput
        report["throughput"] = {
            "clients": args.clients, "seconds": args.seconds_throughput, "body": args.body,
            "in_process_images_per_s": round(in_process, 1), "in_process": percentiles(calls),
            "http_images_per_s": round(http, 1), "http": percentiles(latencies),
            "ratio": round(http / in_process, 3), "codes": dict(codes), "transport_errors": errors,
            # CPU per batch of `batch` images, which a busy machine does not distort as much as wall time
            "in_process_cpu_ms_per_batch": round(in_process_cpu * 1000, 2),
            "server_cpu_ms_per_request": round(server_cpu * 1000, 2),
        }
        mix = load_mix(clean, adversarial, max_body_mb)
        drive([HttpxSession(url, mix, k) for k in range(args.load_clients)], args.warmup)
        rss_start = rss_mb(process.pid)
        samples = []
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.wait(1.0):
                samples.append(rss_mb(process.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        latencies, codes, errors = drive([HttpxSession(url, mix, k) for k in range(args.load_clients)],
                                         args.seconds_load)
        sampler_stop.set()
        sampler.join()
        rss_end = rss_mb(process.pid)
        alive = process.poll() is None and httpx.get(f"{url}/healthz").status_code == 200
        report["load"] = {
            "clients": args.load_clients, "seconds": args.seconds_load, "requests": sum(codes.values()),
            "requests_per_s": round(sum(codes.values()) / args.seconds_load, 1),
            "codes": {str(k): v for k, v in sorted(codes.items())},
            "5xx": sum(v for k, v in codes.items() if k >= 500), "transport_errors": errors,
            "server_alive": alive, "rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
            "rss_mb_max": round(max(samples + [rss_end]), 1), "rss_growth": round(rss_end / rss_start - 1, 4),
            "ok_latency": percentiles(latencies),
        }
    finally:
        process.terminate()
        process.wait(30)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
