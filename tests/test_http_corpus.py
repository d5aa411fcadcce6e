"""The bad-request corpus (`benchmarks/serving_fuzz.py`) against the service as `safetynet serve`
configures it: no 5xx, no hangs, every error JSON with its request id, and the server still up."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_http import MAX_BATCH, MAX_BODY, NAME, guard, quarantine, running  # noqa: F401 (fixtures)

from serving.http import create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serving_fuzz import send, summarize  # noqa: E402
from benchmarks.serving_fuzz_corpus import Case, corpus, raw_request  # noqa: E402

TIMEOUT = 1.0  # head and body deadlines of the server under test, seconds


@pytest.fixture(scope="module")
def outcomes(guard, quarantine):  # noqa: F811 (the fixtures imported above)
    app = create_app(guard, quarantine=quarantine, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY, body_timeout=TIMEOUT)
    with running(app, head_timeout=TIMEOUT) as url:
        port = int(url.rsplit(":", 1)[1])
        results = [send("127.0.0.1", port, case, 3 * TIMEOUT + 5) for case in corpus(NAME, guard.input_shape,
                                                                                       MAX_BATCH, MAX_BODY)]
        alive = send("127.0.0.1", port, Case("health", raw_request("GET", "/healthz", {})), 5).status
    return summarize(results), alive


def test_the_corpus_gets_no_5xx_no_hangs_and_json_errors_with_request_ids(outcomes):
    summary, alive = outcomes
    assert summary["cases"] >= 100
    assert summary["server_errors_5xx"] == 0, summary["failing"]
    assert summary["hangs"] == 0, summary["failing"]
    assert summary["errors_not_json_with_request_id"] == 0, summary["failing"]
    assert alive == 200


@pytest.mark.parametrize(("case", "status"), [
    ("bad-content-length", 400), ("bad-chunk-size", 400), ("non-ascii-path", 400), ("url-100kb", 414),
    ("header-1mb", 431), ("5000-headers", 431), ("npy-claims-4tib", 400), ("npy-claims-64gib", 400),
    ("npy-pickle", 400), ("body-over-limit", 413), ("trailing-slash-host", 404), ("half-sent-head", 408),
    ("short-body", 408), ("idle-connection", None), ("get-predict", 405), ("classify-png-bomb", 400),
])
def test_corpus_cases_get_their_status(outcomes, case, status):
    assert outcomes[0]["by_case"][case] == status
