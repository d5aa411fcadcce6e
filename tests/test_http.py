"""Tests for serving.http against real uvicorn servers on localhost: predictions equal the in-process
guard's, adversarial inputs are rejected, every kind of bad input gets a 4xx JSON error, tokens,
image uploads, metrics, the upstream proxy (a second server plays TF Serving), quarantine records,
and `safetynet serve` itself."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families

from attacks import PGD
from serving.answers import AnswerPolicy
from serving.guard import Guard
from serving.http import create_app
from serving.quarantine import Quarantine
from serving.server import serving_in_thread

EPS = 0.3
MAX_BATCH = 64
MAX_BODY = 200_000
NAME = "digits"
PREDICT = f"/v1/models/{NAME}:predict"
CLASSIFY = f"/v1/models/{NAME}:classify"


running = serving_in_thread  # the other HTTP test modules import it from here


@pytest.fixture(scope="module")
def guard(digits_classifier, digits_detector) -> Guard:
    return Guard(digits_classifier, digits_detector, name=NAME)


@pytest.fixture(scope="module")
def pgd(digits, digits_classifier) -> np.ndarray:
    return PGD(eps=EPS)(digits_classifier, digits.x_test, digits.y_test).x_adv


@pytest.fixture(scope="module")
def quarantine(tmp_path_factory) -> Iterator[Quarantine]:
    with Quarantine(tmp_path_factory.mktemp("quarantine")) as store:
        yield store


@pytest.fixture(scope="module")
def client(guard, quarantine) -> Iterator[httpx.Client]:
    app = create_app(guard, quarantine=quarantine, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def post(client: httpx.Client, x: np.ndarray, path: str = PREDICT) -> httpx.Response:
    return client.post(path, json={"instances": x.tolist()})


def metric_values(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def assert_matches(predictions: list[dict], guard: Guard, x: np.ndarray) -> None:
    """The served predictions are the in-process guard's, with rejected answers withheld."""
    expected = guard.predict(x)
    assert len(predictions) == len(x)
    np.testing.assert_array_equal([p["rejected"] for p in predictions], expected.rejected)
    np.testing.assert_array_equal([p["flagged"] for p in predictions], expected.flagged)
    np.testing.assert_array_equal([p["adversarial_score"] for p in predictions],
                                  np.where(expected.rejected, None, expected.scores))  # no score for rejects
    for p, probabilities, label, rejected in zip(predictions, expected.probabilities, expected.labels,
                                                 expected.rejected, strict=True):
        if rejected:
            assert p["probabilities"] is None and p["label"] is None
        else:
            np.testing.assert_array_equal(p["probabilities"], probabilities)
            assert p["label"] == label


def test_predictions_equal_the_in_process_guard(client, guard, digits, pgd):
    x = np.concatenate([digits.x_test[:32], pgd[:32]])
    response = post(client, x)
    assert response.status_code == 200, response.text
    assert len(response.headers["x-request-id"]) == 32
    assert_matches(response.json()["predictions"], guard, x)
    assert any(p["rejected"] for p in response.json()["predictions"])


def test_each_request_is_checked_once(client, digits, monkeypatch):
    """A request's images are checked as they arrive (serving.validation), not again by the guard."""
    checked = []
    check = Guard.check
    monkeypatch.setattr(Guard, "check", lambda self, x: checked.append(len(x)) or check(self, x))
    response = post(client, digits.x_test[:5])
    assert response.status_code == 200, response.text
    assert checked == [5]


def test_concurrent_requests_are_merged_into_one_guard_call_and_split_back(guard, digits, pgd):
    calls = []

    def slow_predict(x: np.ndarray, **options):
        calls.append(len(x))
        time.sleep(0.5)  # long enough for the other requests to queue up behind this one
        return guard.predict(x, **options)

    counting = copy.copy(guard)
    counting.predict = slow_predict
    batches = [np.concatenate([digits.x_test[i : i + n], pgd[i : i + n]]) for i, n in enumerate((1, 3, 5, 8, 13, 20))]
    with running(create_app(counting)) as url, ThreadPoolExecutor(len(batches)) as pool:
        responses = list(pool.map(lambda x: httpx.post(f"{url}{PREDICT}", json={"instances": x.tolist()}, timeout=30),
                                  batches))
    assert sum(calls) == sum(map(len, batches)) and len(calls) < len(batches)
    for response, x in zip(responses, batches, strict=True):
        expected = guard.predict(x)
        predictions = response.json()["predictions"]
        np.testing.assert_array_equal([p["rejected"] for p in predictions], expected.rejected)
        for p, probabilities, score in zip(predictions, expected.probabilities, expected.scores, strict=True):
            if not p["rejected"]:
                np.testing.assert_allclose(p["probabilities"], probabilities, atol=1e-6)
                np.testing.assert_allclose(p["adversarial_score"], score, rtol=1e-5, atol=1e-5)


def test_flag_policy_answers_flagged_inputs_and_quarantines_them(digits_classifier, digits_detector, pgd, tmp_path):
    flagging = Guard(digits_classifier, digits_detector, name=NAME, policy="flag")
    with Quarantine(tmp_path / "q") as store, running(create_app(flagging, quarantine=store)) as url:
        predictions = httpx.post(f"{url}{PREDICT}", json={"instances": pgd[:16].tolist()}).json()["predictions"]
        store.flush(timeout=10)
        stored = store.count()
    assert any(p["flagged"] for p in predictions) and not any(p["rejected"] for p in predictions)
    assert all(p["probabilities"] is not None and p["label"] is not None for p in predictions)
    assert stored["rejected"] == sum(p["flagged"] for p in predictions)


def test_tf_serving_columnar_inputs_and_bare_bodies_give_the_same_answer(client, digits):
    x = digits.x_test[:5].tolist()
    answers = [
        client.post(PREDICT, json={"instances": x}),
        client.post(PREDICT, json={"inputs": x}),
        client.post(PREDICT, json={"inputs": {"image": x}, "signature_name": "serving_default"}),
        client.post(PREDICT, content=json.dumps({"instances": x}).encode()),  # no content type, as `requests` sends
        client.post(PREDICT, content=json.dumps({"instances": x}).encode(),  # as `curl -d` sends
                    headers={"content-type": "application/x-www-form-urlencoded"}),
    ]
    npy = io.BytesIO()
    np.save(npy, np.asarray(x, np.float32))
    answers.append(client.post(PREDICT, content=npy.getvalue(), headers={"content-type": "application/x-npy"}))
    assert [a.status_code for a in answers] == [200] * 6
    assert all(a.json() == answers[0].json() for a in answers)


def test_clean_inputs_are_mostly_accepted_and_pgd_mostly_rejected(client, digits, pgd):
    def rejection_rate(x: np.ndarray) -> float:
        rejected = [p["rejected"] for start in range(0, len(x), MAX_BATCH)
                    for p in post(client, x[start : start + MAX_BATCH]).json()["predictions"]]
        return float(np.mean(rejected))

    assert rejection_rate(digits.x_test) < 0.15
    assert rejection_rate(pgd) > 0.9


NPY = {"content-type": "application/x-npy"}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)  # the object array pickles: the server must refuse it
    return buffer.getvalue()


def _npy_header(shape: tuple, descr: str = "<f4", data: bytes = b"") -> bytes:
    """A .npy header claiming `shape` (whatever the data that follows holds)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def _instance(shape=(8, 8, 1), value=0.5) -> list:
    return np.full(shape, value).tolist()


def _with(value) -> bytes:
    """A one-instance body whose first pixel is the JSON text `value`."""
    text = json.dumps({"instances": [_instance()]})
    return text.replace("0.5", value, 1).encode()


JSON = {"content-type": "application/json"}
BAD_PREDICTS = [
    pytest.param(b'{"instances": [', JSON, 400, "not valid JSON", id="malformed-json"),
    pytest.param(b"\xff\xfe\xfa", JSON, 400, "not valid JSON", id="not-utf8"),
    pytest.param(b"[1, 2]", JSON, 400, "JSON object", id="not-an-object"),
    pytest.param(b"{}", JSON, 400, '"instances"', id="missing-instances"),
    pytest.param(b'{"instance": []}', JSON, 400, "unknown keys", id="misspelt-key"),
    pytest.param(b'{"instances": [], "inputs": []}', JSON, 400, "exactly one", id="both-forms"),
    pytest.param(b'{"instances": 3}', JSON, 400, "list of images", id="instances-not-a-list"),
    pytest.param(b'{"instances": []}', JSON, 400, "empty batch", id="empty-batch"),
    pytest.param(json.dumps({"instances": [_instance()] * (MAX_BATCH + 1)}).encode(), JSON, 400, "over the limit",
                 id="batch-over-limit"),
    pytest.param(json.dumps({"instances": [_instance((8, 8))]}).encode(), JSON, 400, "rank 3", id="wrong-rank"),
    pytest.param(json.dumps({"instances": [[[[[0.5]]]]]}).encode(), JSON, 400, "rank 3", id="rank-too-high"),
    pytest.param(json.dumps({"instances": [_instance((9, 9, 1))]}).encode(), JSON, 400, "input shape",
                 id="wrong-shape"),
    pytest.param(json.dumps({"instances": [_instance((8, 8, 3))]}).encode(), JSON, 400, "input shape",
                 id="wrong-channels"),
    pytest.param(_with('"0.5"'), JSON, 400, "strings", id="string-pixel"),
    pytest.param(json.dumps({"instances": [np.full((8, 8, 1), True).tolist()]}).encode(), JSON, 400, "booleans",
                 id="all-booleans"),
    pytest.param(_with("true"), JSON, 400, "booleans", id="boolean-among-numbers"),
    pytest.param(_with("null"), JSON, 400, "not numbers", id="null-pixel"),
    pytest.param(_with('{"a": 1}'), JSON, 400, "not numbers", id="object-pixel"),
    pytest.param(_with("1" + "0" * 30), JSON, 400, "must lie in", id="huge-integer"),
    pytest.param(_with("[0.5, 0.5]"), JSON, 400, "ragged", id="ragged"),
    pytest.param(json.dumps({"instances": [_instance(), _instance((8, 7, 1))]}).encode(), JSON, 400, "ragged",
                 id="ragged-batch"),
    pytest.param(_with("NaN"), JSON, 400, "NaN", id="nan-token"),
    pytest.param(_with("-Infinity"), JSON, 400, "Infinity", id="infinity-token"),
    pytest.param(_with("1e400"), JSON, 400, "infinity", id="overflowing-number"),
    pytest.param(_with("1.5"), JSON, 400, "must lie in [0.0, 1.0]", id="above-clip-range"),
    pytest.param(_with("-0.25"), JSON, 400, "must lie in [0.0, 1.0]", id="below-clip-range"),
    pytest.param(b"[" * 100_000, JSON, 400, "depth limit", id="deep-nesting"),
    pytest.param(json.dumps({"instances": [_instance()]}).encode(), {"content-type": "text/plain"}, 415,
                 "application/json", id="wrong-content-type"),
    pytest.param(b"x" * (MAX_BODY + 1), JSON, 413, "over the limit", id="body-over-limit"),
    pytest.param(b"\x93NUMPY garbage", NPY, 400, "not a .npy array", id="npy-garbage"),
    pytest.param(_npy(np.zeros((2, 8, 8, 1), np.int64)), NPY, 400, "floating point", id="npy-int"),
    pytest.param(_npy(np.zeros((8, 8, 1), np.float32)), NPY, 400, "rank 4", id="npy-rank3"),
    pytest.param(_npy(np.array([{"a": 1}], dtype=object)), NPY, 400, "pickle", id="npy-pickle"),
    pytest.param(_npy_header((4, 2**20, 2**18, 1)), NPY, 400, "declares shape", id="npy-claims-4tib"),
    pytest.param(_npy_header((1, 2**17, 2**17, 1), "<f4", b"\0" * 64), NPY, 400, "declares shape", id="npy-claims-64gib"),
    pytest.param(_npy_header((1, 8, 8, 1), "<f4", b"\0" * 255), NPY, 400, "carries 255 bytes", id="npy-short-data"),
    pytest.param(_npy_header((1, 8, 8, 1), "<f4", b"\0" * 300), NPY, 400, "carries 300 bytes", id="npy-extra-data"),
    pytest.param(_npy_header((1, -8, 8, 1)), NPY, 400, "rank 4", id="npy-negative-size"),
    pytest.param(_npy_header((1, 8, 8, 1), "|O"), NPY, 400, "pickle", id="npy-object-header"),
    pytest.param(_npy_header((1, 8, 8, 1), "<f4")[:-20], NPY, 400, "not a .npy array", id="npy-cut-header"),
    pytest.param(_npy(np.full((1, 8, 8, 1), np.nan, np.float32)), NPY, 400, "NaN", id="npy-nan"),
    pytest.param(_npy(np.zeros((0, 8, 8, 1), np.float32)), NPY, 400, "empty", id="npy-empty"),
]


@pytest.mark.parametrize(("body", "headers", "status", "message"), BAD_PREDICTS)
def test_bad_predict_requests_get_a_json_error(client, body, headers, status, message):
    response = client.post(PREDICT, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_routing_errors_are_json(client):
    for response, status in [
        (client.post("/v1/models/other:predict", json={"instances": [_instance()]}), 404),
        (client.get("/v1/models/other"), 404),
        (client.get(PREDICT), 405),
        (client.get("/nowhere"), 404),
    ]:
        assert response.status_code == status and response.json()["error"]


def test_body_limit_holds_without_content_length(client):
    chunks = (b" " * 50_000 for _ in range(6))  # a generator: sent chunked, with no Content-Length
    response = client.post(PREDICT, content=chunks, headers=JSON)
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    assert client.get("/healthz").json() == {"status": "ok"}


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _uint8(x: np.ndarray, scale: int = 1) -> np.ndarray:
    """An image at `scale` times its size (blocks of equal pixels, which INTER_AREA averages back)."""
    image = np.round(x[..., 0] * 255).astype(np.uint8)
    return np.kron(image, np.ones((scale, scale), np.uint8))


def test_classify_decodes_resizes_and_scales_uploads(client, guard, digits):
    images = [_uint8(x, scale=4) for x in digits.x_test[:3]]
    expected = np.stack([np.round(x * 255) / 255 for x in digits.x_test[:3]]).astype(np.float32)
    raw = client.post(CLASSIFY, content=_png(images[0]), headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    assert_matches(raw.json()["predictions"], guard, expected[:1])
    colour = cv2.cvtColor(images[1], cv2.COLOR_GRAY2BGR)  # a grayscale model gets one channel of a colour file
    files = [("file", ("a.png", _png(images[0]), "image/png")), ("file", ("b.png", _png(colour), "image/png")),
             ("other", ("c.png", _png(images[2]), "application/octet-stream"))]
    form = client.post(CLASSIFY, files=files)
    assert form.status_code == 200, form.text
    assert_matches(form.json()["predictions"], guard, expected)
    jpeg = client.post(CLASSIFY, content=_jpeg(images[0]), headers={"content-type": "image/jpeg"})
    assert jpeg.status_code == 200 and len(jpeg.json()["predictions"]) == 1


def _bad_classify_cases() -> list:
    image = np.full((16, 16), 128, np.uint8)
    png, jpeg = _png(image), _jpeg(image)
    gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
    bomb = png[:16] + (50_000).to_bytes(4, "big") * 2 + png[24:]  # a header claiming 50000x50000 pixels
    return [
        pytest.param({"content": b"garbage", "headers": {"content-type": "image/png"}}, 400, "not a PNG or JPEG",
                     id="undecodable"),
        pytest.param({"content": gif, "headers": {"content-type": "image/png"}}, 400, "not a PNG or JPEG", id="gif"),
        pytest.param({"content": png[: len(png) // 2], "headers": {"content-type": "image/png"}}, 400,
                     "truncated", id="truncated-png"),
        pytest.param({"content": jpeg[: len(jpeg) - 40], "headers": {"content-type": "image/jpeg"}}, 400,
                     "truncated", id="truncated-jpeg"),
        pytest.param({"content": png[:-12] + b"IEND" + png[-60:], "headers": {"content-type": "image/png"}}, 400,
                     "cannot decode the upload", id="corrupt-png"),
        pytest.param({"content": bomb, "headers": {"content-type": "image/png"}}, 400, "pixels", id="pixel-bomb"),
        pytest.param({"content": b"", "headers": {"content-type": "image/png"}}, 400, "not a PNG", id="empty-body"),
        pytest.param({"content": png, "headers": {"content-type": "image/gif"}}, 415, "image/png", id="wrong-type"),
        pytest.param({"json": {"instances": []}}, 415, "image/png", id="json-body"),
        pytest.param({"data": {"field": "value"}, "files": [("file", ("a.png", png, "image/png"))]}, 400,
                     "not files", id="text-field"),
        pytest.param({"content": b"--x--\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400,
                     "no image files", id="empty-form"),
        pytest.param({"files": [("file", ("a.png", png, "image/png"))] * (MAX_BATCH + 1)}, 400, "over the limit",
                     id="too-many-files"),
    ]


@pytest.mark.parametrize(("request_args", "status", "message"), _bad_classify_cases())
def test_bad_uploads_get_a_json_error(client, request_args, status, message):
    response = client.post(CLASSIFY, **request_args)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_status_health_and_metrics(client, guard, digits, pgd):
    assert client.get(f"/v1/models/{NAME}").json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    before = metric_values(client)
    x = np.concatenate([digits.x_test[:10], pgd[:10]])
    rejected = sum(p["rejected"] for p in post(client, x).json()["predictions"])
    client.post(PREDICT, content=b"{", headers=JSON)
    after = metric_values(client)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("safetynet_http_requests_total", endpoint="predict", code="200") == 1
    assert moved("safetynet_http_requests_total", endpoint="predict", code="400") == 1
    assert moved("safetynet_http_request_duration_seconds_count", endpoint="predict") == 2
    assert moved("safetynet_guard_inputs_total") == 20
    assert moved("safetynet_guard_rejected_total") == rejected > 0
    assert moved("safetynet_guard_flagged_total") == rejected
    assert moved("safetynet_guard_detector_errors_total") == 0
    assert moved("safetynet_batch_size_count") == 1 and moved("safetynet_batch_size_sum") == 20
    assert moved("safetynet_detector_score_count") == 20
    assert after[("safetynet_guard_threshold", ())] == guard.detector.threshold


def test_quarantine_receives_the_rejected_inputs_with_the_request_id(client, quarantine, pgd):
    response = post(client, pgd[:16])
    rejected = np.array([p["rejected"] for p in response.json()["predictions"]])
    quarantine.flush(timeout=10)
    with contextlib.closing(sqlite3.connect(quarantine.directory / "index.sqlite")) as index:
        rows = index.execute("SELECT verdict, pixels FROM records WHERE request_id = ?",
                             (response.headers["x-request-id"],)).fetchall()
    assert len(rows) == rejected.sum() > 0 and {verdict for verdict, _ in rows} == {"rejected"}
    stored = {np.load(io.BytesIO(pixels)).tobytes() for _, pixels in rows}
    assert stored == {x.tobytes() for x in pgd[:16][rejected]}


def test_answered_rejects_are_already_committed_and_counted(client, quarantine, pgd):
    before = metric_values(client)
    response = post(client, pgd[:24])
    rejected = sum(p["rejected"] for p in response.json()["predictions"])
    with contextlib.closing(sqlite3.connect(quarantine.directory / "index.sqlite")) as index:  # no flush
        (stored,) = index.execute("SELECT COUNT(*) FROM records WHERE request_id = ?",
                                  (response.headers["x-request-id"],)).fetchone()
    after = metric_values(client)
    key = ("safetynet_quarantine_stored_total", (("verdict", "rejected"),))
    assert stored == rejected > 0 and after[key] - before.get(key, 0.0) == rejected
    assert after[("safetynet_quarantine_queue_depth", ())] == 0
    assert after[("safetynet_quarantine_dropped_total", ())] == 0 and after[("safetynet_quarantine_commits_total", ())] >= 1


def test_a_quarantine_that_is_behind_answers_503_with_retry_after(guard, pgd, tmp_path):
    with Quarantine(tmp_path / "q", max_queue=1) as store, running(create_app(guard, quarantine=store)) as url:
        response = httpx.post(f"{url}{PREDICT}", json={"instances": pgd[:16].tolist()})
        metrics = httpx.get(f"{url}/metrics").text
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["request_id"] == response.headers["x-request-id"] and "retry" in response.json()["error"]
    assert store.count() == {"rejected": 0, "accepted": 0, "dropped": 0}  # refused, not silently dropped
    refused = {s.name: s.value for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert refused["safetynet_quarantine_refused_total"] == sum(guard.predict(pgd[:16]).rejected) > 0


def test_answer_policy_scores_for_trusted_callers_rounding_and_top_k(guard, digits, pgd):
    x = np.concatenate([digits.x_test[:8], pgd[:8]])
    expected = guard.predict(x)
    answers = AnswerPolicy(scores_for_rejected=True, decimals=2, top_k=3)
    with running(create_app(guard, answers=answers)) as url:
        predictions = httpx.post(f"{url}{PREDICT}", json={"instances": x.tolist()}).json()["predictions"]
    np.testing.assert_allclose([p["adversarial_score"] for p in predictions], expected.scores, rtol=1e-5, atol=1e-5)
    for p, probabilities, rejected in zip(predictions, expected.probabilities, expected.rejected, strict=True):
        if rejected:
            assert p["probabilities"] is None and p["label"] is None
            continue
        kept = np.argsort(probabilities)[-3:]
        assert np.count_nonzero(p["probabilities"]) <= 3 and all(p["probabilities"][i] == 0 for i in range(10) if i not in kept)
        np.testing.assert_array_equal([p["probabilities"][i] for i in kept], np.round(probabilities[kept], 2))
        assert p["label"] == probabilities.argmax()
    with pytest.raises(ValueError, match="top_k"):
        AnswerPolicy(top_k=0)
    with pytest.raises(ValueError, match="decimals"):
        AnswerPolicy(decimals=-1)


def test_health_answers_head_and_no_redirect_echoes_the_host(client):
    head = client.head("/healthz")
    assert head.status_code == 200 and head.content == b"" and head.headers["x-request-id"]
    slash = client.get("/healthz/", headers={"Host": "evil.example"})
    assert slash.status_code == 404 and "location" not in slash.headers and "evil" not in slash.text
    assert slash.json()["request_id"] == slash.headers["x-request-id"]


def test_token_guards_everything_but_healthz(guard, digits):
    app = create_app(guard, token="s3cret")
    body = {"instances": digits.x_test[:2].tolist()}
    with running(app) as url, httpx.Client(base_url=url) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = client.post(PREDICT, json=body, headers=headers)
            assert response.status_code == 401 and "bearer token" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 200
        assert client.post(PREDICT, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_an_unexpected_error_answers_500_without_a_trace(guard, digits):
    broken = copy.copy(guard)
    broken.predict = lambda x: 1 / 0
    with running(create_app(broken)) as url, httpx.Client(base_url=url) as client:
        response = client.post(PREDICT, json={"instances": digits.x_test[:2].tolist()})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error", "request_id": response.headers["x-request-id"]}
        assert client.get("/healthz").status_code == 200


class FakeTFServing:
    """A stand-in for TF Serving: answers a one-hot vector per instance (class = pixel sum mod 10)
    and keeps every instance it received; the model "slow" sleeps, "broken" answers nothing."""

    def __init__(self) -> None:
        self.received: list[list] = []
        self.app = FastAPI()

        @self.app.post("/v1/models/{name}:predict")
        async def predict(name: str, request: Request) -> dict:
            if name == "slow":
                await asyncio.sleep(2)
            instances = (await request.json())["instances"]
            self.received.extend(instances)
            if name == "broken":
                return {"predictions": []}
            return {"predictions": [np.eye(10)[int(np.sum(x)) % 10].tolist() for x in instances]}


def test_upstream_gets_only_accepted_inputs_and_its_answers_are_merged(digits_detector, digits, pgd):
    remote = Guard(None, digits_detector, name=NAME)  # the classifier lives upstream only
    fake = FakeTFServing()
    x = np.stack([image for pair in zip(digits.x_test[:12], pgd[:12]) for image in pair])
    with running(fake.app) as upstream, running(create_app(remote, upstream=f"{upstream}/v1/models/tfs")) as url, \
            httpx.Client(base_url=url) as client:
        predictions = post(client, x).json()["predictions"]
        rejected = np.array([p["rejected"] for p in predictions])
        np.testing.assert_array_equal(rejected, remote.predict(x).rejected)
        assert 0 < rejected.sum() < len(x)
        np.testing.assert_array_equal(np.asarray(fake.received, np.float32), x[~rejected])
        for p, image in zip(predictions, x, strict=True):
            label = None if p["rejected"] else int(np.sum(image.astype(np.float64))) % 10
            assert p["label"] == label
            assert p["probabilities"] == (None if label is None else np.eye(10)[label].tolist())
        fake.received.clear()
        all_rejected = post(client, pgd[:40][remote.predict(pgd[:40]).rejected])
        assert all_rejected.status_code == 200 and fake.received == []


def test_upstream_failures_answer_502_or_504(digits_detector, digits):
    remote = Guard(None, digits_detector, name=NAME)
    body = {"instances": digits.x_test[:4].tolist()}
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{unused.getsockname()[1]}/v1/models/tfs"  # bound, never listening
        fake = FakeTFServing()
        with running(fake.app) as upstream:
            for target, status, message in [(down, 502, "unreachable"), (f"{upstream}/v1/models/broken", 502, "failed"),
                                            (f"{upstream}/v1/models/slow", 504, "did not answer")]:
                with running(create_app(remote, upstream=target, upstream_timeout=0.5)) as url:
                    response = httpx.post(f"{url}{PREDICT}", json=body)
                    assert response.status_code == status and message in response.json()["error"], response.text
                    assert httpx.get(f"{url}/metrics").text.count("safetynet_upstream_errors_total 1.0") == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_batch": 0}, "max_batch must be an integer >= 1, got 0"),
    ({"max_body_bytes": 0}, "max_body_bytes must be >= 1, got 0"),
    ({"token": ""}, "token must be a non-empty string"),
    ({"upstream": "ftp://host/v1/models/x"}, "upstream must be a model URL .*, got 'ftp://host/v1/models/x'"),
    ({"upstream": "http://host:8501/v1/models/x:predict"}, "upstream must be a model URL .*, got 'http://host:8501/v1/models/x:predict'"),
])
def test_create_app_refuses_bad_settings(guard, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_app(guard, **kwargs)


def test_safetynet_serve_command(guard, digits, tmp_path):
    """The CLI end to end: a saved guard, the token from the environment, a quarantine directory."""
    guard.save(tmp_path / "guard")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "safetynet.cli", "serve", "--guard", str(tmp_path / "guard"), "--port", str(port),
               "--quarantine", str(tmp_path / "quarantine"), "--max-batch", "8"]
    env = os.environ | {"SAFETYNET_TOKEN": "t0ken"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer t0ken"}
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "safetynet serve did not come up"
            time.sleep(0.2)
        response = httpx.post(f"{url}{PREDICT}", json={"instances": digits.x_test[:8].tolist()}, headers=headers)
        assert response.status_code == 200
        assert_matches(response.json()["predictions"], guard, digits.x_test[:8])
        too_many = httpx.post(f"{url}{PREDICT}", json={"instances": digits.x_test[:9].tolist()}, headers=headers)
        assert too_many.status_code == 400
    finally:
        process.terminate()
        process.wait(30)
    assert (tmp_path / "quarantine" / "index.sqlite").is_file()


def test_serve_refuses_bad_arguments(tmp_path):
    from safetynet.cli import main

    assert main(["serve", "--guard", str(tmp_path / "missing")]) == 2


def _raw(url: str, data: bytes, timeout: float = 10.0, then_wait: bool = True) -> tuple[int | None, dict, bytes, float]:
    """Send raw bytes; return the status, headers and body of the answer (None if the server closed
    without one) and the seconds until the server answered or closed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        began = time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        elapsed = time.monotonic() - began
    if not received:
        return None, {}, b"", elapsed
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body, elapsed


@pytest.mark.parametrize(("data", "status", "message"), [
    (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "malformed HTTP"),
    (b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
     "malformed HTTP"),
    (b"GET /health\xffz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed HTTP"),
    (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n", 431, "request headers"),
])
def test_malformed_http_gets_a_json_error_with_a_request_id(client, data, status, message):
    answer, headers, body, _ = _raw(str(client.base_url), data)
    assert answer == status, body
    assert headers["content-type"] == "application/json" and message in json.loads(body)["error"]
    assert json.loads(body)["request_id"] == headers["x-request-id"]


def test_stalled_heads_and_bodies_time_out_with_408(guard):
    with running(create_app(guard, body_timeout=0.5), head_timeout=0.5) as url:
        status, _, body, elapsed = _raw(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # head never ends
        assert status == 408 and "request head" in json.loads(body)["error"] and elapsed < 5
        status, _, body, elapsed = _raw(url, b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        assert status == 408 and "request body" in json.loads(body)["error"] and elapsed < 5
        status, _, _, elapsed = _raw(url, b"")  # connected, silent: closed
        assert status is None and elapsed < 5
        assert httpx.get(f"{url}/healthz").status_code == 200
