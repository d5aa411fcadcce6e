"""Query attacks through `safetynet serve`'s HTTP API, and a benign replay for false alarms; prints JSON.

    python benchmarks/query_attacks.py                       # digits and MNIST guards, 50 images per attack
    python benchmarks/query_attacks.py --data digits --images 10 --benign 0   # a quick look
    python benchmarks/query_attacks.py --query-policy off    # the service without stateful detection
    python benchmarks/query_attacks.py --between-window 0    # the fingerprints without the between rule
    python benchmarks/query_attacks.py --data mnist --guard mnist=runs/mnist-guard   # an existing guard directory

Per dataset a guard is built (the reference CNN and an input detector fitted on FGSM and PGD-10 at
the guard's eps, calibrated at 5% FPR; cached in --work) and served by uvicorn on localhost with
per-client tokens: every attacked image is its own client, and so is every benign client. The
attackers are black boxes that see only the HTTP answers (benchmarks/query_attack_clients.py):
Square (L-inf at the guard's eps, our own) and HopSkipJump (L-inf, ART's, started from a test image
the service accepts with another label), each with `--budget` queries. For each run: whether the
stateful detector matched a query and at which query (read from the detector in this process), whether
that first match was the between rule's, and whether the attack got an accepted, misclassified answer
within eps. The benign replay sends the
test set (MNIST: 10,000 images) in random order, each image flipped, cropped and JPEG re-encoded,
split over clients of `--per-client` images sent `--request` at a time; a client is a false alarm
when any of its queries matched (reported beside: the most hashes shared and the closest any query
came to the between rule).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # query_attack_clients, after the packages

import httpx
import numpy as np

from foundation.storage import model_fingerprint
from detector import InputDetector
from query_attack_clients import Blocked, BudgetSpent, Oracle, augment, hop_skip_jump, square_attack
from serving.clients import ClientIdentity
from serving.guard import Guard
from serving.http import create_app
from serving.server import serving_in_thread
from serving.stateful import MatchRule, MemoryBackend, QueryAttackDetector
from training.classifier import train_classifier
from training.data import load_dataset
from timing import emit
from training.attack_specs import default_attacks, default_eps

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist_keras_arrays.npz"
DATASETS = {"digits": ("digits", 1437, 8), "mnist": (str(MNIST), 20_000, 3)}  # spec, training images, epochs


def build_guard(name: str, work: Path, directory: Path | None = None) -> Guard:
    """The dataset's guard: `directory` when given, else built once and kept in `work`."""
    directory = directory or work / f"guard-{name}"
    if directory.is_dir():
        return Guard.load(directory)
    spec, n_train, epochs = DATASETS[name]
    data = load_dataset(spec)
    x, y = data.x_train[:n_train], data.y_train[:n_train]
    classifier = train_classifier(x, y, data.num_classes, epochs=epochs, verbose=0)
    fit = int(0.8 * len(x))
    adversarial = np.concatenate([attack(classifier, x[:fit], y[:fit]).x_adv for attack in default_attacks(x.shape[1:])])
    detector = InputDetector(epochs=3).fit(np.concatenate([x[:fit], x[:fit]]), adversarial, verbose=0)
    detector.calibrate(x[fit:], 0.05)
    detector.classifier_fingerprint = model_fingerprint(classifier)
    guard = Guard(classifier, detector, name=name)
    guard.save(directory)
    return guard


class RecordingDetector(QueryAttackDetector):
    """The service's detector, also noting per client the query count at its first match (and at its
    first between-rule match), the most hashes any of its queries shared with an earlier one, and the
    closest it came to the between rule."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.queries: dict[str, int] = {}
        self.first_match: dict[str, int] = {}
        self.first_between: dict[str, int] = {}
        self.most_shared: dict[str, int] = {}
        self.closest_between: dict[str, float] = {}

    def check(self, client, x):
        verdict = super().check(client, x)
        before = self.queries.get(client, 0)
        self.queries[client] = before + len(x)
        self.most_shared[client] = max(self.most_shared.get(client, 0), int(verdict.shared.max()))
        self.closest_between[client] = min(self.closest_between.get(client, np.inf), float(verdict.between.min()))
        between = verdict.between <= self.rule.between_tolerance
        for first, hits in ((self.first_match, verdict.matched), (self.first_between, between)):
            if hits.any() and client not in first:
                first[client] = before + int(np.argmax(hits)) + 1
        return verdict


@contextlib.contextmanager
def serving(guard: Guard, tokens: dict[str, str], detector: QueryAttackDetector | None) -> Iterator[str]:
    """The guard's app under uvicorn on a free localhost port, in a thread; yields its URL."""
    app = create_app(guard, clients=ClientIdentity(tokens=tokens), query_detector=detector)
    with serving_in_thread(app) as url:
        yield f"{url}/v1/models/{guard.name}:predict"


def http_sender(http: httpx.Client, url: str, token: str):
    """`send(batch)` for one client: a .npy body; None for rejected rows; Blocked on 429."""

    def send(batch: np.ndarray) -> list:
        body = io.BytesIO()
        np.save(body, np.ascontiguousarray(batch, np.float32))
        response = http.post(url, content=body.getvalue(),
                             headers={"Content-Type": "application/x-npy", "Authorization": f"Bearer {token}"})
        if response.status_code == 429:
            raise Blocked
        response.raise_for_status()
        return [None if row["rejected"] else np.asarray(row["probabilities"]) for row in response.json()["predictions"]]

    return send


def run_attacks(guard: Guard, data, args, detector: RecordingDetector | None) -> dict:
    """Each attack on `args.images` correctly classified, accepted test images, each image its own client."""
    eps, clip = default_eps(guard.input_shape), guard.clip
    clean = guard.predict(data.x_test[:2000])
    usable = np.flatnonzero((clean.labels == data.y_test[:2000]) & ~clean.rejected)[: args.images]
    clients = [f"{attack}-{i}" for attack in ("square", "hsj") for i in usable]
    tokens = {client: f"token-{client}" for client in clients}
    rows = {"square": [], "hsj": []}
    with serving(guard, tokens, detector) as url, httpx.Client(timeout=60) as http:
        for client in clients:
            attack, index = client.split("-")
            index = int(index)
            oracle = Oracle(http_sender(http, url, tokens[client]), data.x_test[index], int(data.y_test[index]), eps,
                            args.budget, stop_at_success=attack == "square")
            rng = np.random.default_rng(index)
            blocked = False
            try:
                if attack == "square":
                    square_attack(oracle, clip, rng)
                else:
                    others = np.flatnonzero((clean.labels != data.y_test[index]) & ~clean.rejected)
                    hop_skip_jump(oracle, data.x_test[rng.choice(others)], data.num_classes, clip)
            except Blocked:
                blocked = True
            except BudgetSpent:
                pass
            flagged_at, between_at = (None, None) if detector is None else (
                detector.first_match.get(f"token:{client}"), detector.first_between.get(f"token:{client}"))
            rows[attack].append({"queries": oracle.queries, "success_at": oracle.success_at,
                                 "flagged_at": flagged_at, "between_at": between_at, "blocked": blocked})
    return {attack: summarize(runs, args.flag_within) for attack, runs in rows.items()}


def summarize(runs: list[dict], within: int) -> dict:
    flagged = [r["flagged_at"] for r in runs if r["flagged_at"] is not None]
    return {
        "runs": len(runs),
        f"flagged_within_{within}": float(np.mean([f is not None and f <= within for f in (r["flagged_at"] for r in runs)])),
        "flagged": len(flagged) / len(runs),
        "median_queries_to_flag": float(np.median(flagged)) if flagged else None,
        "max_queries_to_flag": max(flagged, default=None),
        "flagged_first_by_between": float(np.mean([r["flagged_at"] is not None and r["between_at"] == r["flagged_at"] for r in runs])),
        "success_through_service": float(np.mean([r["success_at"] is not None for r in runs])),
        "successes_at_queries": sorted(r["success_at"] for r in runs if r["success_at"] is not None),
        "median_queries_sent": float(np.median([r["queries"] for r in runs])),
        "blocked": float(np.mean([r["blocked"] for r in runs])),
    }


def benign_replay(guard: Guard, data, args, detector: RecordingDetector) -> dict:
    """The test set in random order with augmentations, over clients of `args.per_client` images."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.x_test))[: args.benign]
    images = np.stack([augment(data.x_test[i], rng) for i in order])
    groups = np.array_split(images, max(1, round(len(images) / args.per_client)))
    tokens = {f"benign-{i}": f"token-benign-{i}" for i in range(len(groups))}
    refused = 0
    with serving(guard, tokens, detector) as url, httpx.Client(timeout=60) as http:
        for (client, token), group in zip(tokens.items(), groups, strict=True):
            send = http_sender(http, url, token)
            try:
                for start in range(0, len(group), args.request):
                    send(group[start : start + args.request])
            except Blocked:
                refused += 1
    flagged = [client for client in tokens if f"token:{client}" in detector.first_match]
    return {"images": len(images), "clients": len(groups), "images_per_client": int(np.median([len(g) for g in groups])),
            "clients_flagged": len(flagged), "flagged_rate": len(flagged) / len(groups), "clients_blocked": refused,
            "most_shared_hashes": max(detector.most_shared.get(f"token:{client}", 0) for client in tokens),
            "threshold": detector.rule.threshold,
            "closest_between": min(detector.closest_between.get(f"token:{client}", np.inf) for client in tokens),
            "between_tolerance": detector.rule.between_tolerance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["digits", "mnist"], choices=sorted(DATASETS))
    parser.add_argument("--images", type=int, default=50, help="attacked images (= clients) per attack")
    parser.add_argument("--budget", type=int, default=1000, help="queries per attack run")
    parser.add_argument("--flag-within", type=int, default=50)
    parser.add_argument("--benign", type=int, default=10_000, help="benign images replayed (0: none)")
    parser.add_argument("--per-client", type=int, default=200)
    parser.add_argument("--request", type=int, default=20, help="images per benign request")
    parser.add_argument("--query-policy", default="block", choices=["block", "reject", "flag", "off"])
    parser.add_argument("--between-window", type=int, default=MatchRule().between_window,
                        help="the between rule's window (0: the fingerprints alone)")
    parser.add_argument("--work", type=Path, default=Path("runs/query-attacks"))
    parser.add_argument("--guard", action="append", default=[], metavar="NAME=DIR",
                        help="serve this guard directory for dataset NAME instead of building one")
    args = parser.parse_args()
    guards = {name: Path(directory) for name, _, directory in (spec.partition("=") for spec in args.guard)}
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} cores", "policy": args.query_policy, "rule": vars(MatchRule(between_window=args.between_window)),
              "budget": args.budget}
    for name in args.data:
        started = time.perf_counter()
        guard = build_guard(name, args.work, guards.get(name))
        data = load_dataset(DATASETS[name][0])

        def detector() -> RecordingDetector | None:
            if args.query_policy == "off":
                return None
            rule = MatchRule(between_window=args.between_window)
            return RecordingDetector(MemoryBackend(rule), rule, guard.clip, policy=args.query_policy)

        result = {"guard": str(guards.get(name, args.work / f"guard-{name}")), "eps": default_eps(guard.input_shape), "attacks": run_attacks(guard, data, args, detector())}
        if args.benign and args.query_policy != "off":
            result["benign"] = benign_replay(guard, data, args, detector())
        result["seconds"] = round(time.perf_counter() - started, 1)
        report[name] = result
        print(json.dumps({name: result}), file=sys.stderr)
    emit(report)


if __name__ == "__main__":
    main()
