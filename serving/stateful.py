"""Stateful query-attack detection: a client that sends many near-identical images is running a
query attack (Square, HopSkipJump, Boundary: each step queries a small change of the last point).

The match rule follows Blacklight (Li et al., USENIX Security 2022). An image's fingerprint: quantise
its pixels (`step`, a fraction of the clip range), slide a window of `window` values (default: one
image row) over the flattened image (`stride`), hash each window with a keyed 64-bit hash, and keep
the `top_k` largest distinct hashes. Two queries match when their fingerprints share at least
`threshold` hashes; a query matches when it matches any of the client's recent queries (`history` of them, at most
`ttl_seconds` old) or an earlier query of the same request. Resending the very same image is not a
match: it teaches an attacker nothing. Clean images share few windows (different content), while an
attack's consecutive queries differ in a few pixels, so most windows and hashes stay.

The between rule catches what the fingerprints miss: the binary and line searches of decision-based
attacks (HopSkipJump, Boundary) move from one image toward another, so each query lies between two
earlier ones in every pixel (a blend, or an L-inf clip toward the other image) while differing from
both in many pixels. Per value, m between a and b is |a-m| + |m-b| = |a-b|, so over the image the
middle query's L1 distances to the other two add up to theirs. A query is flagged when it and two of
the client's last `between_window` queries make such a triple, up to `between_tolerance` of the
middle one's distance to the nearer end (distinct clean images never come close: their L1 triangle
inequality is strict). It compares 8-bit values (256 levels of the clip range; rounding keeps the
order of values) of at most `between_values` keyed random positions per image.

State (fingerprints, samples, blocks) lives in a backend: `MemoryBackend` in this process, or
`serving.stateful_redis.RedisBackend` shared by several replicas. The policy decides what a match
does: "flag" (counted and quarantined only), "reject" (the matching inputs are rejected) or "block"
(rejected, and every request of the client is refused for `block_seconds`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import secrets
import threading
import time
from typing import Protocol

import numpy as np

POLICIES = ("flag", "reject", "block")


@dataclasses.dataclass(frozen=True)
class MatchRule:
    """The fingerprint and match parameters. Blacklight's are a step of 50/255, windows of 20 values,
    stride 1, the top 50 hashes, threshold 25; the step here is finer and the window one image row
    (None), chosen on query traces of Square and HopSkipJump and on augmented clean images of MNIST
    and digits (in the benign replay no clean query shared more than 19 hashes with an earlier one;
    attacks reach 25 within a few queries; see docs/benchmarks.md). The between rule (0 for
    `between_window` turns it off): HopSkipJump's search triples are exact (0); no triple of clean
    images within 32 queries came closer than 0.014 (the 60,000 MNIST training images in order)."""

    step: float = 0.1
    window: int | None = None
    stride: int = 1
    top_k: int = 50
    threshold: int = 25
    history: int = 1000
    ttl_seconds: float = 3600.0
    between_window: int = 32
    between_tolerance: float = 0.005
    between_values: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1] (a fraction of the clip range), got {self.step}")
        for name in ("window", "stride", "top_k", "threshold", "history", "between_window", "between_values"):
            value, least = getattr(self, name), int(name != "between_window")  # between_window 0: no between rule
            if name == "window" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.threshold > self.top_k:
            raise ValueError(f"threshold ({self.threshold}) cannot exceed top_k ({self.top_k})")
        if self.ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {self.ttl_seconds}")
        if not 0 <= self.between_tolerance < 1:
            raise ValueError(f"between_tolerance must be in [0, 1), got {self.between_tolerance}")


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the 64-bit hash."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def fingerprints(x: np.ndarray, clip: tuple[float, float], rule: MatchRule, key: bytes) -> np.ndarray:
    """One row per image of `x` (N, ...): column 0 a digest of the exact image, then the `top_k`
    largest distinct window hashes in descending order (0 pads an image with fewer windows).
    `key` seeds the window hash, so an attacker cannot tell which windows count."""
    window = rule.window or (int(np.prod(x.shape[2:])) if x.ndim > 2 else x.shape[-1])  # one row of NHWC
    x = np.ascontiguousarray(x, np.float32).reshape(len(x), -1)
    if x.shape[1] < window:
        raise ValueError(f"images of {x.shape[1]} values are smaller than the match window ({window})")
    low, high = clip
    levels = np.floor((np.clip(x, low, high) - low) / ((high - low) * rule.step)).astype(np.uint64)
    # a polynomial rolling hash mod 2**64 (one pass however wide the window), then splitmix's mixer
    seed = np.random.default_rng(list(hashlib.blake2b(key).digest())).integers(
        0, np.iinfo(np.uint64).max, 2, np.uint64, endpoint=True)
    base = int(seed[0]) | 1  # odd, so invertible mod 2**64
    length = levels.shape[1]
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(length, base, np.uint64), dtype=np.uint64) * np.uint64(pow(base, -1, 2**64))
        inverse = np.cumprod(np.full(length, pow(base, -1, 2**64), np.uint64), dtype=np.uint64) * np.uint64(base)
        prefix = np.zeros((len(x), length + 1), np.uint64)
        np.cumsum(levels * powers, axis=1, dtype=np.uint64, out=prefix[:, 1:])
        windows = (prefix[:, window:] - prefix[:, :-window]) * inverse[: length - window + 1]
        hashes = _mix(windows[:, :: rule.stride] ^ seed[1])
    hashes[hashes == 0] = 1  # 0 is the padding
    ordered = np.sort(hashes, axis=1)[:, ::-1]
    distinct = np.ones(ordered.shape, bool)
    distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = np.cumsum(distinct, axis=1)  # 1 for the largest hash, 2 for the next distinct one, ...
    image, column = np.nonzero(distinct & (rank <= rule.top_k))
    rows = np.zeros((len(x), rule.top_k + 1), np.uint64)
    rows[image, rank[image, column]] = ordered[image, column]
    rows[:, 0] = [int.from_bytes(hashlib.blake2b(row.tobytes(), key=key[:64], digest_size=8).digest(), "little") for row in x]
    return rows


def overlaps(queries: np.ndarray, history: np.ndarray) -> np.ndarray:
    """(len(queries), len(history)) counts of hashes each query shares with each earlier query
    (fingerprint rows); 0 where the two are the very same image (same digest)."""
    if not len(history) or not len(queries):
        return np.zeros((len(queries), len(history)), np.int64)
    flat = history[:, 1:].ravel()
    owners = np.repeat(np.arange(len(history)), history.shape[1] - 1)
    order = np.argsort(flat)
    flat, owners = flat[order], owners[order]
    wanted = queries[:, 1:].ravel()
    left, right = np.searchsorted(flat, wanted, "left"), np.searchsorted(flat, wanted, "right")
    lengths = np.where(wanted == 0, 0, right - left)
    total = int(lengths.sum())
    starts = np.repeat(left - np.cumsum(lengths) + lengths, lengths)
    owner = owners[starts + np.arange(total)]
    query = np.repeat(np.arange(len(queries)).repeat(queries.shape[1] - 1), lengths)
    counts = np.bincount(query * len(history) + owner, minlength=len(queries) * len(history))
    counts = counts.reshape(len(queries), len(history))
    counts[queries[:, :1] == history[:, 0]] = 0
    return counts


def best_matches(queries: np.ndarray, history: np.ndarray) -> np.ndarray:
    """Per query, the most hashes it shares with any history row or any EARLIER query of `queries`."""
    earlier = overlaps(queries, np.concatenate([history, queries]))
    earlier[:, len(history):][np.triu_indices(len(queries))] = 0
    return earlier.max(axis=1, initial=0)


def between_samples(x: np.ndarray, clip: tuple[float, float], rule: MatchRule, key: bytes) -> np.ndarray:
    """(N, at most `between_values`) uint8: what the between rule keeps of each image, its values at
    keyed random positions (all of them for smaller images) in 256 levels of the clip range."""
    flat = np.ascontiguousarray(x, np.float32).reshape(len(x), -1)
    if flat.shape[1] > rule.between_values:
        rng = np.random.default_rng(list(hashlib.blake2b(key, person=b"between").digest()))
        flat = flat[:, np.sort(rng.choice(flat.shape[1], rule.between_values, replace=False))]
    low, high = clip
    return np.rint((np.clip(flat, low, high) - low) * (255 / (high - low))).astype(np.uint8)


def between(queries: np.ndarray, recent: np.ndarray, rule: MatchRule) -> np.ndarray:
    """Per query (`between_samples` rows, in order after `recent`), how close it and two of the
    `between_window` queries before it come to one L1 path: the least, over such triples and over
    which one m is in the middle, of (|a-m| + |m-b| - |a-b|) / (2 min(|a-m|, |m-b|)), both distances
    > 0 (0: m is between a and b in every value; inf: no triple). At most `between_tolerance` matches."""
    closest = np.full(len(queries), np.inf)
    if rule.between_window == 0:
        return closest
    values = np.concatenate([recent, queries]).astype(np.int16)
    total, width = len(values), rule.between_window
    distance = np.zeros((total, total), np.int64)  # L1, filled within `width` of the diagonal
    for start in range(0, total, 16):
        columns = slice(max(0, start - width), start + 16)
        distance[start : start + 16, columns] = np.abs(
            values[start : start + 16, None] - values[None, columns]).sum(-1, dtype=np.int64)
    distance = np.maximum(distance, distance.T)
    for k, p in enumerate(range(len(recent), total)):
        window = np.arange(max(0, p - width), p)
        i, j = (window[side] for side in np.triu_indices(len(window), 1))
        to_i, to_j, apart = distance[p, i], distance[p, j], distance[i, j]
        for slack, near in ((to_i + to_j - apart, np.minimum(to_i, to_j)), (to_i + apart - to_j, np.minimum(to_i, apart)),
                            (to_j + apart - to_i, np.minimum(to_j, apart))):
            ratio = slack[near > 0] / (2 * near[near > 0])
            closest[k] = min(closest[k], ratio.min(initial=np.inf))
    return closest


class Backend(Protocol):
    """Where fingerprints, the between rule's samples and blocks live (in this process, or shared
    through Redis). `history` gives a client's recent fingerprint rows and its last `between_window`
    samples (bytes, oldest first)."""

    def key(self) -> bytes: ...
    def history(self, client: str) -> tuple[np.ndarray, list[bytes]]: ...
    def append(self, client: str, rows: np.ndarray, samples: np.ndarray) -> None: ...
    def blocked_for(self, client: str) -> float: ...
    def block(self, client: str, seconds: float) -> None: ...


class MemoryBackend:
    """State in this process: per client the last `history` fingerprints and `between_window`
    samples (at most `ttl_seconds` old), for at most `max_clients` clients (the least recently seen
    are dropped first)."""

    def __init__(self, rule: MatchRule, max_clients: int = 10_000) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.rule = rule
        self.max_clients = max_clients
        self._key = secrets.token_bytes(32)
        self._clients: collections.OrderedDict[str, tuple[collections.deque, collections.deque]] = collections.OrderedDict()
        self._blocks: dict[str, float] = {}
        self._lock = threading.Lock()

    def key(self) -> bytes:
        return self._key

    def history(self, client: str) -> tuple[np.ndarray, list[bytes]]:
        with self._lock:
            kept = self._clients.get(client, ((), ()))
            cutoff = time.monotonic() - self.rule.ttl_seconds
            for entries in kept:
                while entries and entries[0][0] < cutoff:
                    entries.popleft()
            rows, samples = ([value for _, value in entries] for entries in kept)
            return np.stack(rows) if rows else np.zeros((0, self.rule.top_k + 1), np.uint64), samples

    def append(self, client: str, rows: np.ndarray, samples: np.ndarray) -> None:
        now = time.monotonic()
        with self._lock:
            kept = self._clients.pop(client, None) or (collections.deque(maxlen=self.rule.history),
                                                       collections.deque(maxlen=self.rule.between_window))
            kept[0].extend((now, row) for row in rows)
            kept[1].extend((now, sample.tobytes()) for sample in samples)
            self._clients[client] = kept
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)

    def blocked_for(self, client: str) -> float:
        with self._lock:
            left = self._blocks.get(client, 0.0) - time.monotonic()
            if left <= 0:
                self._blocks.pop(client, None)
            return max(left, 0.0)

    def block(self, client: str, seconds: float) -> None:
        with self._lock:
            self._blocks[client] = time.monotonic() + seconds


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Per input: the most hashes shared with an earlier query, how close it comes to lying between
    two earlier queries (`between`), and whether either makes it a match; the inputs to reject under
    the policy; and whether the client got blocked by this request."""

    shared: np.ndarray
    between: np.ndarray
    matched: np.ndarray
    rejected: np.ndarray
    blocked: bool


class QueryAttackDetector:
    """The match rule and the policy over a backend. `check` is thread-safe (the backend locks)."""

    def __init__(self, backend: Backend, rule: MatchRule, clip: tuple[float, float], *, policy: str = "block",
                 block_seconds: float = 600.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown query-attack policy {policy!r}; choose one of {list(POLICIES)}")
        if block_seconds <= 0:
            raise ValueError(f"block_seconds must be > 0, got {block_seconds}")
        self.backend = backend
        self.rule = rule
        self.clip = clip
        self.policy = policy
        self.block_seconds = block_seconds

    def blocked_for(self, client: str) -> float:
        """Seconds the client stays blocked (0: not blocked)."""
        return self.backend.blocked_for(client)

    def check(self, client: str, x: np.ndarray) -> Verdict:
        """Fingerprint the batch, match it against the client's history, remember it, apply the policy."""
        key = self.backend.key()
        rows = fingerprints(x, self.clip, self.rule, key)
        samples = between_samples(x, self.clip, self.rule, key)
        history, recent = self.backend.history(client)
        recent = [np.frombuffer(sample, np.uint8) for sample in recent if len(sample) == samples.shape[1]]
        shared = best_matches(rows, history)
        closest = between(samples, np.stack(recent) if recent else samples[:0], self.rule)
        self.backend.append(client, rows, samples)
        matched = (shared >= self.rule.threshold) | (closest <= self.rule.between_tolerance)
        rejected = matched if self.policy != "flag" else np.zeros_like(matched)
        blocked = self.policy == "block" and bool(matched.any())
        if blocked:
            self.backend.block(client, self.block_seconds)
        return Verdict(shared, closest, matched, rejected, blocked)
