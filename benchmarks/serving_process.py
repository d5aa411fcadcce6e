"""`safetynet serve` as a subprocess for the serving benchmarks: a guard to serve, a free port, the
server started and waited for, and its memory and CPU time read from /proc (Linux)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_guard(directory: Path, data=None, *, eps: float = 0.3, n_train: int | None = None, epochs: int = 8,
                name: str = "digits"):
    """The reference CNN on the first `n_train` training images of `data` (default: all of digits),
    an input detector on FGSM examples at `eps` (calibrated at 5% FPR on the last 20%), saved as a
    guard called `name` in `directory`."""
    from attacks import FGSM
    from detector import InputDetector
    from foundation.storage import model_fingerprint
    from serving.guard import Guard
    from training.classifier import train_classifier
    from training.data import load_dataset

    data = load_dataset("digits") if data is None else data
    x, y = data.x_train[:n_train], data.y_train[:n_train]
    fit = int(0.8 * len(x))
    classifier = train_classifier(x, y, data.num_classes, epochs=epochs, verbose=0)
    detector = InputDetector(epochs=3).fit(x[:fit], FGSM(eps=eps)(classifier, x[:fit], y[:fit]).x_adv, verbose=0)
    detector.calibrate(x[fit:], 0.05)
    detector.classifier_fingerprint = model_fingerprint(classifier)
    guard = Guard(classifier, detector, name=name)
    guard.save(directory)
    return guard


def start_server(guard_dir: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    """`safetynet serve` in a subprocess, its output appended to `log`."""
    # --query-policy off: all clients share one address and send clean and PGD versions of the same
    # images, which query-attack detection would block (benchmarks/query_attacks.py measures that)
    command = [sys.executable, "-m", "safetynet.cli", "serve", "--guard", str(guard_dir), "--port", str(port),
               "--query-policy", "off", *extra]
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
    process.log = log
    return process


def wait_until_up(process: subprocess.Popen, port: int, timeout: float = 120.0) -> None:
    """Until /healthz answers 200; raises with the log's tail if the server exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.2)
    raise RuntimeError(f"the server did not come up within {timeout} s")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
