"""The quarantine under load, then a SIGKILL mid-burst: `safetynet serve --quarantine` as a subprocess,
32 clients sending batches of which 25% are PGD examples; prints JSON.

    python benchmarks/serving_load.py                        # 32 clients, 30 s of load, then 10 s and a SIGKILL
    python benchmarks/serving_load.py --clients 64 --seconds 60

load: every client keeps one connection and sends `--batch` images per request (25% adversarial by
default) for `--seconds`; /metrics is scraped every 0.2 s. Targets: no answer but 200 (errors), no
quarantine drops or refusals, a bounded queue depth, and the store committing as fast as rejects
are answered. kill: the same load on the same store, the server SIGKILLed after `--kill-after` s
while requests are in flight; the store is reopened and verified (SQLite integrity, every image's
sha256), and every reject the clients got an answer for, and at least what /metrics last counted
as stored, must be in it. Query-attack detection is off: the clients resend the same test images,
which it would (rightly) block.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving_process import build_guard, free_port, start_server, wait_until_up  # noqa: E402
from benchmarks.timing import emit  # noqa: E402


def request_bodies(x_clean: np.ndarray, x_adversarial: np.ndarray, batch: int, fraction: float, count: int,
                   seed: int = 0) -> list[bytes]:
    """`count` JSON :predict bodies of `batch` images, `fraction` of them adversarial."""
    rng = np.random.default_rng(seed)
    n_adversarial = round(batch * fraction)
    bodies = []
    for _ in range(count):
        images = np.concatenate([x_clean[rng.choice(len(x_clean), batch - n_adversarial)],
                                 x_adversarial[rng.choice(len(x_adversarial), n_adversarial)]])
        bodies.append(json.dumps({"instances": images.round(6).tolist()}).encode())
    return bodies


class Client(threading.Thread):
    """One keep-alive connection sending prepared bodies until `stop`; keeps each answer's status,
    request id and number of rejected rows, and its latency."""

    def __init__(self, port: int, bodies: list[bytes], stop: threading.Event, offset: int) -> None:
        super().__init__(daemon=True)
        self.port, self.bodies, self.stop, self.offset = port, bodies, stop, offset
        self.answers: list[tuple[int, str, int]] = []
        self.latencies: list[float] = []
        self.failures: Counter = Counter()

    def run(self) -> None:
        i = self.offset
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                    reader = sock.makefile("rb")
                    while not self.stop.is_set():
                        body = self.bodies[i % len(self.bodies)]
                        i += 1
                        began = time.perf_counter()
                        sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                        status = int(reader.readline().split()[1])
                        headers = {}
                        while (line := reader.readline()) not in (b"\r\n", b""):
                            name, _, value = line.partition(b":")
                            headers[name.strip().lower()] = value.strip()
                        answer = reader.read(int(headers.get(b"content-length", 0)))
                        self.latencies.append(time.perf_counter() - began)
                        self.answers.append((status, headers.get(b"x-request-id", b"").decode(),
                                             answer.count(b'"rejected":true')))
            except (OSError, ValueError, IndexError) as error:  # the server went away (the kill phase)
                self.failures[type(error).__name__] += 1
                if not self.stop.wait(0.2):
                    continue


def scrape(port: int) -> dict[str, float]:
    """The quarantine's and the guard's counters from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    text = data.partition(b"\r\n\r\n")[2].decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("safetynet_quarantine", "safetynet_guard_rejected")):
                label = sample.labels.get("verdict")
                values[sample.name + (f"_{label}" if label else "")] = sample.value
    return values


def run_load(port: int, bodies: list[bytes], clients: int, seconds: float, kill: subprocess.Popen | None = None) -> dict:
    """`clients` clients for `seconds` (or until the server is SIGKILLed at `seconds`, with `kill`);
    /metrics scraped every 0.2 s."""
    stop = threading.Event()
    workers = [Client(port, bodies, stop, offset=k * 7) for k in range(clients)]
    for worker in workers:
        worker.start()
    began, scrapes = time.monotonic(), []
    while time.monotonic() - began < seconds:
        with contextlib.suppress(OSError):
            scrapes.append(scrape(port))
        time.sleep(0.2)
    if kill is not None:
        kill.send_signal(signal.SIGKILL)
        kill.wait(30)
    elapsed = time.monotonic() - began
    stop.set()
    for worker in workers:
        worker.join(60)
    answers = [answer for worker in workers for answer in worker.answers]
    latencies = np.array([t for worker in workers for t in worker.latencies]) * 1000
    statuses = Counter(str(status) for status, _, _ in answers)
    return {
        "seconds": round(elapsed, 1), "requests": len(answers), "statuses": dict(statuses),
        "errors": sum(status != 200 for status, _, _ in answers),
        "client_failures": dict(sum((worker.failures for worker in workers), Counter())),
        "rejects_answered": sum(n for status, _, n in answers if status == 200),
        "rejects_answered_per_s": round(sum(n for status, _, n in answers if status == 200) / elapsed, 1),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "latency_p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        "answered": [(request_id, n) for status, request_id, n in answers if status == 200 and n],
        "scrapes": scrapes,
    }


def stored_by_request(store: Path) -> Counter:
    with contextlib.closing(sqlite3.connect(store / "index.sqlite")) as connection:
        return Counter(dict(connection.execute("SELECT request_id, COUNT(*) FROM records GROUP BY request_id")))


def load_and_kill(guard_dir: Path, store: Path, bodies: list[bytes], clients: int, seconds: float,
                  kill_after: float) -> dict:
    """The load phase, then the kill phase on the same store; the figures the issue asks for."""
    from serving.quarantine import Quarantine
    from serving.quarantine_index import verify_store

    # query-attack detection off: the clients resend the same test images, which it would block
    options, log = ("--quarantine", str(store), "--query-policy", "off"), store.parent / "serve.log"
    port = free_port()
    server = start_server(guard_dir, port, log, *options)
    try:
        wait_until_up(server, port)
        load = run_load(port, bodies, clients, seconds)
        final = scrape(port)
    finally:
        server.terminate()
        server.wait(60)
    depths = [s.get("safetynet_quarantine_queue_depth", 0.0) for s in load["scrapes"]]
    load_summary = {key: value for key, value in load.items() if key not in ("answered", "scrapes")} | {
        "quarantine_dropped": final["safetynet_quarantine_dropped_total"],
        "quarantine_refused": final["safetynet_quarantine_refused_total"],
        "quarantine_errors": final["safetynet_quarantine_errors_total"],
        "quarantine_stored_rejected": final["safetynet_quarantine_stored_total_rejected"],
        "quarantine_commits": final["safetynet_quarantine_commits_total"],
        "records_per_commit": round(final["safetynet_quarantine_stored_total_rejected"]
                                    / max(final["safetynet_quarantine_commits_total"], 1), 1),
        "queue_depth_max": max(depths, default=0.0), "queue_depth_mean": round(float(np.mean(depths)), 1),
    }
    before = stored_by_request(store)
    port = free_port()
    server = start_server(guard_dir, port, log, *options)
    wait_until_up(server, port)
    kill = run_load(port, bodies, clients, kill_after, kill=server)
    counted = max((s.get("safetynet_quarantine_stored_total_rejected", 0.0) for s in kill["scrapes"]), default=0.0)
    with Quarantine(store):  # reopening replays the write-ahead log, as the next serve would
        pass
    verified = verify_store(store)
    stored = stored_by_request(store) - before
    lost = sum(max(n - stored[request_id], 0) for request_id, n in kill["answered"])
    kill_summary = {key: value for key, value in kill.items() if key not in ("answered", "scrapes")} | {
        "metrics_last_counted_stored": counted, "stored_after_restart": sum(stored.values()),
        "answered_rejects_lost": lost, "store_verified_records": verified["records"],
        "tracebacks_in_log": log.read_text(errors="replace").count("Traceback"),
        "stored_but_not_answered": sum(stored.values()) - sum(n for _, n in kill["answered"]),
    }
    return {"load": load_summary, "kill": kill_summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="load phase length (default 30)")
    parser.add_argument("--kill-after", type=float, default=10.0, help="seconds of load before the SIGKILL (default 10)")
    parser.add_argument("--batch", type=int, default=8, help="images per request (default 8)")
    parser.add_argument("--adversarial", type=float, default=0.25, help="fraction of PGD images (default 0.25)")
    args = parser.parse_args()

    from attacks import PGD
    from training.data import load_dataset

    with tempfile.TemporaryDirectory() as scratch:
        guard = build_guard(Path(scratch) / "guard")
        data = load_dataset("digits")
        x_adversarial = PGD(eps=0.3)(guard.classifier, data.x_test, data.y_test).x_adv
        bodies = request_bodies(data.x_test, x_adversarial, args.batch, args.adversarial, 256)
        result = load_and_kill(Path(scratch) / "guard", Path(scratch) / "quarantine", bodies, args.clients,
                               args.seconds, args.kill_after)
    emit({"clients": args.clients, "batch": args.batch, "adversarial_fraction": args.adversarial, **result})


if __name__ == "__main__":
    main()
