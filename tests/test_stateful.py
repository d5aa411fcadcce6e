"""Tests for serving.stateful: fingerprints, the match rule on clean digits and on attack-like query
sequences, the in-process backend's limits, and the policies."""
from __future__ import annotations

import numpy as np
import pytest

from serving import stateful
from serving.stateful import MatchRule, MemoryBackend, QueryAttackDetector, best_matches, fingerprints, overlaps

KEY = b"k" * 32
CLIP = (0.0, 1.0)


def square_steps(x: np.ndarray, n: int, eps: float, rng: np.random.Generator) -> np.ndarray:
    """Square-attack-like queries: a random L-inf start, then one small square redrawn per query."""
    current = np.clip(x + eps * rng.choice([-1.0, 1.0], size=(1, x.shape[1], 1)), 0, 1)
    queries = [current]
    for _ in range(n - 1):
        row, col = rng.integers(0, x.shape[0] - 2, 2)
        current = current.copy()
        current[row : row + 3, col : col + 3] = np.clip(x[row : row + 3, col : col + 3] + eps * rng.choice([-1, 1]), 0, 1)
        queries.append(current)
    return np.stack(queries).astype(np.float32)


def test_clean_digits_never_match_but_attack_steps_do(digits):
    rule = MatchRule()
    clean = fingerprints(digits.x_test, CLIP, rule, KEY)
    assert overlaps(clean, clean)[~np.eye(len(clean), dtype=bool)].max() < rule.threshold
    steps = square_steps(digits.x_test[0], 10, 0.3, np.random.default_rng(0))
    shared = best_matches(fingerprints(steps, CLIP, rule, KEY), clean[:0])
    assert shared[0] == 0 and (shared[2:] >= rule.threshold).all()  # matched from the third query on


def test_fingerprints_are_keyed_and_sorted(digits):
    rule = MatchRule()
    rows = fingerprints(digits.x_test[:3], CLIP, rule, KEY)
    assert rows.shape == (3, rule.top_k + 1) and rows.dtype == np.uint64
    assert (np.diff(rows[:, 1:].astype(np.float64), axis=1) <= 0).all()  # descending, zero padding last
    assert np.array_equal(rows, fingerprints(digits.x_test[:3], CLIP, rule, KEY))
    other = fingerprints(digits.x_test[:3], CLIP, rule, b"x" * 32)
    assert not np.intersect1d(rows[:, 1:], other[:, 1:]).any()


def test_the_very_same_image_is_not_a_match_but_a_near_copy_is(digits):
    rule = MatchRule()
    x = digits.x_test[:1]
    near = x.copy()
    near[0, 0, 0] = 1 - near[0, 0, 0]
    history = fingerprints(x, CLIP, rule, KEY)
    assert best_matches(fingerprints(x, CLIP, rule, KEY), history)[0] == 0
    assert best_matches(fingerprints(near, CLIP, rule, KEY), history)[0] >= rule.threshold


def test_a_batch_matches_only_its_earlier_queries(digits):
    rule = MatchRule()
    x = digits.x_test[:1]
    near = x + 0.01
    rows = fingerprints(np.concatenate([x, near, digits.x_test[5:6]]), CLIP, rule, KEY)
    shared = best_matches(rows, rows[:0])
    assert shared[0] == 0 and shared[1] >= rule.threshold and shared[2] < rule.threshold


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"step": 0}, "step must be in"), ({"window": 0}, "window must be an integer"),
    ({"top_k": 10, "threshold": 11}, "cannot exceed top_k"), ({"ttl_seconds": 0}, "ttl_seconds must be > 0"),
])
def test_bad_rules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatchRule(**kwargs)


def test_images_smaller_than_the_window_are_refused():
    with pytest.raises(ValueError, match="smaller than the match window"):
        fingerprints(np.zeros((1, 2, 2, 1), np.float32), CLIP, MatchRule(window=20), KEY)


def test_memory_backend_keeps_recent_history_per_client(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(stateful.time, "monotonic", lambda: clock[0])
    rule = MatchRule(top_k=4, threshold=2, history=3, ttl_seconds=10)
    backend = MemoryBackend(rule, max_clients=2)
    rows = np.arange(1, 26, dtype=np.uint64).reshape(5, 5)
    backend.append("a", rows)
    assert np.array_equal(backend.history("a"), rows[-3:])  # the last `history` rows
    backend.append("b", rows[:1])
    backend.append("c", rows[:1])  # a third client drops the least recently seen one, "a"
    assert len(backend.history("a")) == 0 and len(backend.history("b")) == 1
    clock[0] += 11  # past the TTL
    assert len(backend.history("c")) == 0
    backend.block("c", 5)
    assert backend.blocked_for("c") == pytest.approx(5)
    clock[0] += 6
    assert backend.blocked_for("c") == 0


@pytest.mark.parametrize(("policy", "rejected", "blocked"), [("flag", False, False), ("reject", True, False),
                                                             ("block", True, True)])
def test_policies(digits, policy, rejected, blocked):
    rule = MatchRule()
    detector = QueryAttackDetector(MemoryBackend(rule), rule, CLIP, policy=policy, block_seconds=60)
    steps = np.stack([digits.x_test[3] + 0.01 * k for k in range(3)])  # near copies
    first = detector.check("attacker", steps[:1])
    assert not first.matched.any() and not first.blocked
    verdict = detector.check("attacker", steps[1:])
    assert verdict.matched.all() and verdict.rejected.all() == rejected and verdict.blocked == blocked
    assert (detector.blocked_for("attacker") > 0) == blocked
    assert not detector.check("someone else", steps[1:2]).matched.any()  # state is per client


def test_unknown_policy_is_refused():
    rule = MatchRule()
    with pytest.raises(ValueError, match="unknown query-attack policy 'ban'"):
        QueryAttackDetector(MemoryBackend(rule), rule, CLIP, policy="ban")
