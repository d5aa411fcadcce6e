"""`safetynet serve` under load: throughput and latency against the in-process guard, then a mixed
good/bad load test that counts 5xx answers, crashes and the server's memory growth; prints JSON.

The server runs as a subprocess (`python -m safetynet.cli serve`, `benchmarks/serving_process.py`),
so its RSS is read from /proc (Linux). Clients are threads with one keep-alive connection each and bodies encoded once; the
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
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from attacks import PGD  # noqa: E402
from benchmarks.http_clients import HttpxSession, RawSession, drive, load_mix, percentiles, predict  # noqa: E402
from benchmarks.serving_process import build_guard, cpu_seconds, rss_mb, start_server, wait_until_up  # noqa: E402
from benchmarks.timing import emit  # noqa: E402
from serving.guard import Guard  # noqa: E402
from training.data import load_dataset  # noqa: E402

PATH = "/v1/models/bench:predict"


def in_process(guard: Guard, batch: np.ndarray, seconds: float) -> tuple[float, list[float], float]:
    """Images/s, call latencies and CPU seconds per call of `guard.predict` on one thread, the same
    batch, after a warm-up call and, as `safetynet serve` does, with `gc.freeze()` (no full
    collections walking TensorFlow's objects)."""
    guard.predict(batch)
    gc.freeze()
    calls, started, cpu = [], time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        guard.predict(batch)
        calls.append(time.perf_counter() - t)
    return len(calls) * len(batch) / (time.perf_counter() - started), calls, (time.process_time() - cpu) / len(calls)


def throughput(process: subprocess.Popen, port: int, batch: np.ndarray, body_kind: str, clients: int,
               seconds: float) -> tuple[float, list[float], dict, int, float]:
    """HTTP images/s, latencies, answers by status, transport errors and the server's CPU seconds per
    request, from `clients` raw-socket clients sending `batch` back to back for `seconds`."""
    if body_kind == "npy":
        buffer = io.BytesIO()
        np.save(buffer, batch.astype(np.float32))
        body, content_type = buffer.getvalue(), "application/x-npy"
    else:
        body, content_type = predict(batch)["content"], "application/json"
    drive([RawSession(port, PATH, body, content_type) for _ in range(clients)], 2)  # warm-up
    cpu = cpu_seconds(process.pid)
    latencies, codes, errors = drive([RawSession(port, PATH, body, content_type) for _ in range(clients)], seconds)
    server_cpu = (cpu_seconds(process.pid) - cpu) / max(1, sum(codes.values()))
    return len(latencies) * len(batch) / seconds, latencies, dict(codes), errors, server_cpu


def load(process: subprocess.Popen, url: str, mix: list[dict], clients: int, seconds: float, warmup: float) -> dict:
    """The load test's figures: `clients` httpx clients sending `mix` for `seconds` after `warmup`
    seconds of it, the server's RSS sampled every second."""
    drive([HttpxSession(url, mix, k) for k in range(clients)], warmup)
    rss_start = rss_mb(process.pid)
    samples = []
    sampler_stop = threading.Event()

    def sample() -> None:
        while not sampler_stop.wait(1.0):
            samples.append(rss_mb(process.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    latencies, codes, errors = drive([HttpxSession(url, mix, k) for k in range(clients)], seconds)
    sampler_stop.set()
    sampler.join()
    rss_end = rss_mb(process.pid)
    alive = process.poll() is None and httpx.get(f"{url}/healthz").status_code == 200
    return {
        "clients": clients, "seconds": seconds, "requests": sum(codes.values()),
        "requests_per_s": round(sum(codes.values()) / seconds, 1),
        "codes": {str(k): v for k, v in sorted(codes.items())},
        "5xx": sum(v for k, v in codes.items() if k >= 500), "transport_errors": errors,
        "server_alive": alive, "rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "rss_mb_max": round(max(samples + [rss_end]), 1), "rss_growth": round(rss_end / rss_start - 1, 4),
        "ok_latency": percentiles(latencies),
    }


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
        build_guard(guard_dir, data, eps=eps, n_train=args.n_train, epochs=args.classifier_epochs, name="bench")
    guard = Guard.load(guard_dir)
    clean = data.x_test[:256]
    adversarial = PGD(eps=eps)(guard.classifier, clean, data.y_test[:256]).x_adv
    batch = clean[: args.batch]
    report: dict = {"data": args.data, "input_shape": list(guard.input_shape), "detector": guard.detector.kind,
                    "cpus": os.cpu_count(), "batch": args.batch}
    local_rate, calls, local_cpu = in_process(guard, batch, args.seconds_throughput)

    # the body limit sits just above the largest valid request (64 instances), so oversized ones stay small
    max_body_mb = round(1.5 * len(predict(clean[:64])["content"]) / 2**20, 2)
    report["max_body_mb"] = max_body_mb
    process = start_server(guard_dir, args.port, work / "server.log", "--max-batch", "64", "--max-body-mb", str(max_body_mb))
    try:
        wait_until_up(process, args.port)
        http, latencies, codes, errors, server_cpu = throughput(process, args.port, batch, args.body, args.clients,
                                                                args.seconds_throughput)
        report["throughput"] = {
            "clients": args.clients, "seconds": args.seconds_throughput, "body": args.body,
            "in_process_images_per_s": round(local_rate, 1), "in_process": percentiles(calls),
            "http_images_per_s": round(http, 1), "http": percentiles(latencies),
            "ratio": round(http / local_rate, 3), "codes": codes, "transport_errors": errors,
            # CPU per batch of `batch` images, which a busy machine does not distort as much as wall time
            "in_process_cpu_ms_per_batch": round(local_cpu * 1000, 2),
            "server_cpu_ms_per_request": round(server_cpu * 1000, 2),
        }
        report["load"] = load(process, f"http://127.0.0.1:{args.port}", load_mix(clean, adversarial, max_body_mb),
                              args.load_clients, args.seconds_load, args.warmup)
    finally:
        process.terminate()
        process.wait(30)
    emit(report)


if __name__ == "__main__":
    main()
