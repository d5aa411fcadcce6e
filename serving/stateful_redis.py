"""Query-attack state in Redis, shared by several service replicas (`safetynet serve --query-state
redis://host:6379/0`; needs the `redis` extra: pip install 'safetynet[redis]').

Keys, under `prefix`:
    key           the fingerprint hash key (32 random bytes; the first replica sets it, all read it,
                  so every replica fingerprints alike)
    h:<client>    a list of the client's recent fingerprints (8 bytes of time, then the row), trimmed
                  to the rule's `history`, expiring `ttl_seconds` after the last append
    s:<client>    the same for the between rule's samples (8 bytes of time, then the uint8 values),
                  trimmed to the rule's `between_window`
    b:<client>    present while the client is blocked (expires with the block)

Reading the history and appending the new rows are two round trips, not one transaction: two
replicas answering the same client at the same instant may each miss the other's batch.
"""
from __future__ import annotations

import secrets
import time

import numpy as np

try:
    import redis
except ImportError as error:  # pragma: no cover
    raise ImportError(f"the Redis state backend needs the redis extra: pip install 'safetynet[redis]' ({error})") from error

from serving.stateful import MatchRule


def _fresh(entries: list[bytes], cutoff: float) -> list[bytes]:
    """The values of the entries (8 bytes of time, then the value) stamped at or after `cutoff`."""
    return [entry[8:] for entry in entries if len(entry) >= 8 and np.frombuffer(entry[:8], np.float64)[0] >= cutoff]


class RedisBackend:
    """`serving.stateful.Backend` on a Redis server at `url` (redis://host:port/db)."""

    def __init__(self, url: str, rule: MatchRule, *, prefix: str = "safetynet:query:", timeout: float = 2.0) -> None:
        self.rule = rule
        self.prefix = prefix
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.redis.set(prefix + "key", secrets.token_bytes(32), nx=True)
        self._key = self.redis.get(prefix + "key")
        if not self._key:
            raise RuntimeError(f"Redis at {url} did not keep the fingerprint key")

    def key(self) -> bytes:
        return self._key

    def history(self, client: str) -> tuple[np.ndarray, list[bytes]]:
        width = self.rule.top_k + 1
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(f"{self.prefix}h:{client}", 0, -1)
            pipe.lrange(f"{self.prefix}s:{client}", 0, -1)
            entries, samples = pipe.execute()
        cutoff = time.time() - self.rule.ttl_seconds
        rows = [np.frombuffer(entry, np.uint64) for entry in _fresh(entries, cutoff) if len(entry) == 8 * width]
        return np.stack(rows) if rows else np.zeros((0, width), np.uint64), _fresh(samples, cutoff)

    def append(self, client: str, rows: np.ndarray, samples: np.ndarray) -> None:
        stamp = np.float64(time.time()).tobytes()
        ttl = max(1, int(self.rule.ttl_seconds))
        with self.redis.pipeline(transaction=True) as pipe:
            for name, values, keep in (("h", rows, self.rule.history), ("s", samples, self.rule.between_window)):
                if keep and len(values):
                    key = f"{self.prefix}{name}:{client}"
                    pipe.rpush(key, *[stamp + np.ascontiguousarray(value).tobytes() for value in values])
                    pipe.ltrim(key, -keep, -1)
                    pipe.expire(key, ttl)
            pipe.execute()

    def blocked_for(self, client: str) -> float:
        milliseconds = self.redis.pttl(f"{self.prefix}b:{client}")
        return max(milliseconds, 0) / 1000

    def block(self, client: str, seconds: float) -> None:
        self.redis.set(f"{self.prefix}b:{client}", b"1", px=max(1, int(seconds * 1000)))
