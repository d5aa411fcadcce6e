"""Query-attack detection in the HTTP service (real uvicorn on localhost): near copies from one client,
and a binary search's query between two earlier ones, are rejected and the client blocked (429 with
Retry-After), other clients are not, identity comes
from per-client tokens and never from X-Forwarded-For, and /metrics counts it all."""
from __future__ import annotations

import sqlite3

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.clients import ClientIdentity
from serving.guard import Guard
from serving.http import create_app
from serving.server import serving_in_thread
from serving.stateful import MatchRule, MemoryBackend, QueryAttackDetector

PREDICT = "/v1/models/digits:predict"
TOKENS = {"alice": "alice-token", "bob": "bob-token-"}


@pytest.fixture(scope="module")
def guard(digits_classifier, digits_detector) -> Guard:
    return Guard(digits_classifier, digits_detector, name="digits")


def app_for(guard: Guard, policy: str, rule: MatchRule | None = None, **identity):
    rule = rule or MatchRule()
    detector = QueryAttackDetector(MemoryBackend(rule), rule, guard.clip, policy=policy, block_seconds=60)
    return create_app(guard, clients=ClientIdentity(**identity), query_detector=detector)


def post(url: str, images: np.ndarray, **headers: str) -> httpx.Response:
    return httpx.post(url + PREDICT, json={"instances": images.tolist()}, headers=headers, timeout=30)


def near_copy(x: np.ndarray) -> np.ndarray:
    """`x` with its centre pixel moved by 0.25 (two of the match rule's 0.1 quantisation steps), as a
    query attack's next query. That changes 8 of a digit's 57 row windows, so at least 34 of the 50
    kept hashes stay (42 for each of 2,000 random backend keys), over the threshold of 25 whatever the
    key. x + 0.02, the near copy these tests used, moves 4 pixels of test digit 5 across a step and
    shares 24 to 31 hashes depending on the key: 101 of 5,000 keys missed the match."""
    copy = x.copy()
    copy.flat[36] += 0.25 if copy.flat[36] < 0.5 else -0.25
    return copy


def metric(url: str, name: str) -> float:
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return sum(s.value for f in families for s in f.samples if s.name == name)


def test_near_copies_get_a_client_blocked_and_no_one_else(guard, digits):
    x = digits.x_test[:1]
    alice, bob = ({"Authorization": f"Bearer {TOKENS[n]}"} for n in ("alice", "bob"))
    with serving_in_thread(app_for(guard, "block", tokens=TOKENS)) as url:
        assert not post(url, x, **alice).json()["predictions"][0]["rejected"]
        answer = post(url, near_copy(x), **alice).json()["predictions"][0]
        assert answer["rejected"] and answer["probabilities"] is None
        refused = post(url, digits.x_test[1:2], **alice)
        assert refused.status_code == 429 and 0 < int(refused.headers["retry-after"]) <= 60
        assert "blocked" in refused.json()["error"] and refused.json()["request_id"]
        assert post(url, x, **bob).status_code == 200  # bob is not alice
        assert post(url, x, Authorization="Bearer mallory-token").status_code == 401
        assert metric(url, "safetynet_query_attack_blocks_total") == 1
        assert metric(url, "safetynet_query_attack_matched_inputs_total") == 1
        assert metric(url, "safetynet_query_attack_refused_requests_total") == 1
        assert metric(url, "safetynet_http_requests_total") >= 5


def test_a_binary_search_is_rejected_at_the_query_its_answer_would_end(guard, digits):
    """HopSkipJump's first L-inf binary-search queries (another digit, then it clipped to 0.5 and to
    0.25 around the image, within eps 0.3): the third shares at most one hash with the others, so only
    the between rule stops it, and before its answer leaves."""
    x = digits.x_test[0]
    start = digits.x_test[np.flatnonzero(digits.y_test != digits.y_test[0])[0]]
    queries = [start, np.clip(start, x - 0.5, x + 0.5), np.clip(start, x - 0.25, x + 0.25)]
    with serving_in_thread(app_for(guard, "block")) as url:
        answers = [post(url, query[None]).json()["predictions"][0] for query in queries]
        assert answers[2]["rejected"] and answers[2]["probabilities"] is None
        assert post(url, x[None]).status_code == 429
        assert metric(url, "safetynet_query_attack_between_inputs_total") == 1
        assert metric(url, "safetynet_query_attack_blocks_total") == 1
    with serving_in_thread(app_for(guard, "block", MatchRule(between_window=0))) as url:  # the rule off
        assert [post(url, query[None]).status_code for query in queries] == [200, 200, 200]
        assert metric(url, "safetynet_query_attack_matched_inputs_total") == 0


def test_a_forged_forwarded_address_does_not_make_a_new_client(guard, digits):
    x = digits.x_test[2:3]
    with serving_in_thread(app_for(guard, "reject")) as url:
        assert post(url, x, **{"X-Forwarded-For": "1.1.1.1"}).status_code == 200
        answer = post(url, near_copy(x), **{"X-Forwarded-For": "2.2.2.2"}).json()["predictions"][0]
        assert answer["rejected"]  # the same peer, whatever it claims
        assert post(url, digits.x_test[3:4]).status_code == 200  # "reject" blocks nobody


def test_flag_policy_counts_but_rejects_nothing_for_it(guard, digits):
    x = digits.x_test[4:5]
    with serving_in_thread(app_for(guard, "flag")) as url:
        first = post(url, x).json()["predictions"][0]
        second = post(url, near_copy(x)).json()["predictions"][0]
        assert second["rejected"] == first["rejected"]
        assert metric(url, "safetynet_query_attack_matched_inputs_total") == 1
        assert metric(url, "safetynet_query_attack_rejected_inputs_total") == 0


def test_query_attack_inputs_are_quarantined_with_their_reason(guard, digits, tmp_path):
    from serving.quarantine import Quarantine

    store = Quarantine(tmp_path / "q")
    rule = MatchRule()
    detector = QueryAttackDetector(MemoryBackend(rule), rule, guard.clip, policy="reject")
    x = digits.x_test[5:6]
    try:
        with serving_in_thread(create_app(guard, quarantine=store, query_detector=detector)) as url:
            assert post(url, x).status_code == 200
            assert post(url, near_copy(x)).json()["predictions"][0]["rejected"]
            assert metric(url, "safetynet_query_attack_matched_inputs_total") == 1  # rejected as a query attack
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "q" / "index.sqlite") as db:
        reasons = [row[0] for row in db.execute("SELECT reason FROM records")]
    assert "query_attack" in reasons


def test_serve_settings(guard, tmp_path):
    from serving.query_gate import query_detection

    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"alice": "alice-token"}')
    clients, detector = query_detection(guard, tokens_file=str(tokens), policy="reject")
    assert detector.policy == "reject" and isinstance(detector.backend, MemoryBackend)
    assert clients.identify({"client": ("127.0.0.1", 1), "headers": [(b"authorization", b"Bearer alice-token")]}) == "token:alice"
    assert query_detection(guard, policy="off")[1] is None
    with pytest.raises(ValueError, match="must be 'memory' or a redis:// URL"):
        query_detection(guard, state="memcached://host")
    with pytest.raises(ValueError, match="unknown query-attack policy 'ban'"):
        query_detection(guard, policy="ban")
    assert detector.rule.between_window == 32 and query_detection(guard, between_window=0)[1].rule.between_window == 0


def test_serve_passes_the_between_window_on(monkeypatch):
    import serving.server
    from safetynet.cli import main

    seen = {}
    monkeypatch.setattr(serving.server, "serve", lambda guard, **options: seen.update(options))
    main(["serve", "--guard", "g", "--query-between-window", "0"])
    assert seen["query_between_window"] == 0


def test_uvicorn_never_takes_the_client_from_forwarded_headers(guard):
    from serving.server import uvicorn_config

    assert uvicorn_config(create_app(guard)).proxy_headers is False
