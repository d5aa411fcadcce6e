"""Property-based fuzzing of the `:predict` endpoint: whatever the body, the answer is never a 5xx,
every refusal is a JSON error, and the service keeps answering."""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_http import running

from serving.guard import Guard
from serving.http import create_app

PREDICT = "/v1/models/fuzz:predict"
MAX_BATCH = 4


@pytest.fixture(scope="module")
def client(digits_classifier, digits_detector) -> Iterator[httpx.Client]:
    """A real server guarding with conftest's digits detector (its detection quality does not matter here)."""
    app = create_app(Guard(digits_classifier, digits_detector, name="fuzz"), max_batch=MAX_BATCH, max_body_bytes=50_000)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=40,
)


def _spoil(x: np.ndarray, value: float | None, index: int) -> np.ndarray:
    """`x` with one pixel set to `value` (None: unchanged)."""
    if value is not None and x.size:
        x.flat[index % x.size] = value
    return x


# near-valid batches: shapes around 8x8x1, pixels in the clip range but for at most one
images = st.builds(
    _spoil,
    arrays(np.float64, st.tuples(st.integers(0, MAX_BATCH + 1), st.sampled_from([8, 8, 7]), st.sampled_from([8, 8, 9]),
                                 st.sampled_from([1, 1, 2])), elements=st.floats(0.0, 1.0)),
    st.none() | st.sampled_from([-0.5, 1.5, float("nan"), float("inf"), 1e300]),
    st.integers(0, 10**6),
)
bodies = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    json_values.map(lambda value: json.dumps({"instances": value}).encode()),
    images.map(lambda x: json.dumps({"instances": x.tolist()}).encode()),
    images.map(lambda x: json.dumps({"inputs": {"image": x.tolist()}}).encode()),
    st.binary(max_size=300),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", None]))
def test_predict_never_fails_with_a_server_error(client, body, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post(PREDICT, content=body, headers=headers)
    event(f"HTTP {response.status_code}")
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        predictions = response.json()["predictions"]
        assert 1 <= len(predictions) <= MAX_BATCH
        assert all(isinstance(p["rejected"], bool) for p in predictions)
    else:
        assert isinstance(response.json()["error"], str) and response.json()["error"]
    assert client.get("/healthz").status_code == 200
