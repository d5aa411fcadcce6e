"""serving.stateful_redis against a real redis-server started here (two backends play two service
replicas, sharing fingerprints, the between rule's samples and blocks). Skipped when redis-server or the redis package is missing (.ci/run installs both)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest

from serving.stateful import MatchRule, QueryAttackDetector

redis = pytest.importorskip("redis", reason="the redis extra is not installed")
CLIP = (0.0, 1.0)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(directory)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(10)


def detector(url: str, prefix: str, rule: MatchRule, **kwargs) -> QueryAttackDetector:
    from serving.stateful_redis import RedisBackend

    return QueryAttackDetector(RedisBackend(url, rule, prefix=prefix), rule, CLIP, **kwargs)


def test_replicas_share_history_and_blocks(redis_url, digits):
    rule = MatchRule()
    first, second = (detector(redis_url, "t1:", rule, block_seconds=30) for _ in range(2))
    assert first.backend.key() == second.backend.key()  # both fingerprint alike
    x = digits.x_test[7:8]
    assert not first.check("attacker", x).matched.any()
    verdict = second.check("attacker", x + 0.01)  # the near copy reaches the other replica
    assert verdict.matched.all() and verdict.blocked
    assert 29 < first.blocked_for("attacker") <= 30
    assert first.blocked_for("someone else") == 0
    assert not second.check("someone else", digits.x_test[8:9]).matched.any()


def test_a_binary_search_spread_over_replicas_is_caught(redis_url, digits):
    rule = MatchRule()
    first, second = (detector(redis_url, "t3:", rule) for _ in range(2))
    x, start = digits.x_test[0], digits.x_test[np.flatnonzero(digits.y_test != digits.y_test[0])[0]]
    assert not first.check("searcher", start[None]).matched.any()
    assert not second.check("searcher", np.clip(start, x - 0.5, x + 0.5)[None]).matched.any()
    verdict = first.check("searcher", np.clip(start, x - 0.25, x + 0.25)[None])
    assert verdict.between[0] == 0 and verdict.matched.all() and verdict.blocked


def test_history_is_trimmed_and_expires(redis_url):
    from serving.stateful_redis import RedisBackend

    rule = MatchRule(top_k=4, threshold=2, history=3, ttl_seconds=1, between_window=2)
    backend = RedisBackend(redis_url, rule, prefix="t2:")
    rows = np.arange(1, 26, dtype=np.uint64).reshape(5, 5)
    samples = np.arange(15, dtype=np.uint8).reshape(5, 3)
    backend.append("a", rows, samples)
    history, recent = backend.history("a")
    assert np.array_equal(history, rows[-3:]) and recent == [samples[3].tobytes(), samples[4].tobytes()]
    backend.append("b", rows[:1], samples[:1])
    time.sleep(0.6)
    backend.append("b", rows[1:2], samples[1:2])  # keeps the key alive: older entries are dropped on reading
    time.sleep(0.6)
    history, recent = backend.history("b")
    assert np.array_equal(history, rows[1:2]) and recent == [samples[1].tobytes()]
    assert len(backend.history("a")[0]) == 0 and backend.history("a")[1] == []
    backend.block("a", 0.2)
    assert backend.blocked_for("a") > 0
    time.sleep(0.3)
    assert backend.blocked_for("a") == 0
    off = RedisBackend(redis_url, MatchRule(between_window=0), prefix="t4:")
    off.append("a", rows[:, :1].repeat(51, 1), samples)  # no between rule: no samples kept
    assert len(off.history("a")[0]) == 5 and off.history("a")[1] == []


def test_an_unreachable_server_raises(digits):
    from serving.stateful_redis import RedisBackend

    with pytest.raises(redis.ConnectionError, match=r"connecting to 127\.0\.0\.1:1\b"):
        RedisBackend("redis://127.0.0.1:1/0", MatchRule(), timeout=0.5)


def test_serve_builds_its_detector_on_redis(redis_url):
    from types import SimpleNamespace

    from serving.query_gate import query_detection
    from serving.stateful_redis import RedisBackend

    _, detector = query_detection(SimpleNamespace(clip=CLIP), state=redis_url, policy="reject")
    assert isinstance(detector.backend, RedisBackend) and detector.policy == "reject"
