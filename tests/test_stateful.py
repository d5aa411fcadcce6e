"""Tests for serving.stateful: fingerprints, the match rule on clean digits and on attack-like query
sequences, the between rule on a HopSkipJump-like binary search, the in-process backend's limits,
and the policies."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from serving import stateful
from serving.stateful import (MatchRule, MemoryBackend, QueryAttackDetector, best_matches, between, between_samples,
                              fingerprints, overlaps)

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
    ({"between_window": -1}, "between_window must be an integer >= 0"), ({"between_values": 0}, "between_values must be"),
    ({"between_tolerance": 1.0}, "between_tolerance must be in"),
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
    rule = MatchRule(top_k=4, threshold=2, history=3, ttl_seconds=10, between_window=2)
    backend = MemoryBackend(rule, max_clients=2)
    rows = np.arange(1, 26, dtype=np.uint64).reshape(5, 5)
    samples = np.arange(15, dtype=np.uint8).reshape(5, 3)
    backend.append("a", rows, samples)
    history, recent = backend.history("a")
    assert np.array_equal(history, rows[-3:])  # the last `history` rows
    assert recent == [samples[3].tobytes(), samples[4].tobytes()]  # the last `between_window` samples
    backend.append("b", rows[:1], samples[:1])
    backend.append("c", rows[:1], samples[:1])  # a third client drops the least recently seen one, "a"
    assert len(backend.history("a")[0]) == 0 and backend.history("a")[1] == []
    assert len(backend.history("b")[0]) == 1
    clock[0] += 11  # past the TTL
    assert len(backend.history("c")[0]) == 0 and backend.history("c")[1] == []
    backend.block("c", 5)
    assert backend.blocked_for("c") == pytest.approx(5)
    clock[0] += 6
    assert backend.blocked_for("c") == 0


def binary_search(x: np.ndarray, start: np.ndarray) -> np.ndarray:
    """HopSkipJump's first L-inf binary-search queries without the image itself: the start (another
    digit), then the start clipped to 0.5 and to 0.25 around the image."""
    return np.stack([start, np.clip(start, x - 0.5, x + 0.5), np.clip(start, x - 0.25, x + 0.25)]).astype(np.float32)


def test_a_binary_search_lies_exactly_between_its_queries(digits):
    rule = MatchRule()
    for k in range(20):
        x = digits.x_test[k]
        start = digits.x_test[np.flatnonzero(digits.y_test != digits.y_test[k])[k]]
        for queries in (binary_search(x, start), np.stack([start, (x + start) / 2, 0.75 * x + 0.25 * start])):
            for order in itertools.permutations(range(3)):  # whichever comes last, the middle one or an end
                samples = between_samples(queries[list(order)], CLIP, rule, KEY)
                closest = between(samples, samples[:0], rule)
                assert closest[:2].tolist() == [np.inf, np.inf] and closest[2] == 0  # the third query: exactly between
    assert (between(samples, samples[:0], MatchRule(between_window=0)) == np.inf).all()  # the rule off


def test_clean_digits_in_order_are_never_between(digits):
    rule = MatchRule()
    samples = between_samples(digits.x_train, CLIP, rule, KEY)
    closest = between(samples, samples[:0], rule)
    assert closest.min() > 4 * rule.between_tolerance  # measured 0.026
    copies = between_samples(np.stack([digits.x_test[0]] * 2 + [digits.x_test[1]]), CLIP, rule, KEY)
    assert between(copies, copies[:0], rule)[2] > rule.between_tolerance  # the very same image twice: no path


def test_the_search_query_is_rejected_in_its_own_request_and_clean_requests_are_not(digits):
    rule = MatchRule()
    detector = QueryAttackDetector(MemoryBackend(rule), rule, CLIP, policy="block", block_seconds=60)
    start = digits.x_test[np.flatnonzero(digits.y_test != digits.y_test[0])[0]]
    verdicts = [detector.check("attacker", query[None]) for query in binary_search(digits.x_test[0], start)]
    assert [bool(v.matched[0]) for v in verdicts] == [False, False, True]
    assert verdicts[2].rejected[0] and verdicts[2].blocked and verdicts[2].shared[0] < rule.threshold
    for first in range(0, len(digits.x_test), 20):  # the previous request's queries are history
        assert not detector.check("reader", digits.x_test[first : first + 20]).matched.any()


def test_between_samples_are_keyed_positions_in_256_levels():
    rule = MatchRule(between_values=16)
    x = np.random.default_rng(0).uniform(size=(3, 10, 10, 1)).astype(np.float32)
    samples = between_samples(x, CLIP, rule, KEY)
    assert samples.shape == (3, 16) and samples.dtype == np.uint8
    assert np.array_equal(samples, between_samples(x, CLIP, rule, KEY))
    assert not np.array_equal(samples, between_samples(x, CLIP, rule, b"x" * 32))  # other positions
    assert np.isin(samples[0], np.rint(x[0].ravel() * 255)).all()
    assert np.array_equal(between_samples(x * 2 - 1, (-1.0, 1.0), MatchRule(), KEY), between_samples(x, CLIP, MatchRule(), KEY))


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
