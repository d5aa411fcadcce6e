"""Tests for serving.quarantine: the store (records, sampling, restarts, crashes, threads, a full
queue, the format 1 migration), review marks, its export as an adversarial-only dataset, retraining a
detector on that export, and the `safetynet quarantine` commands."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from attacks import FGSM, parse_attack_spec
from attacks.dataset import (
    ArraySource,
    describe,
    generate_dataset,
    load_adversarial_dataset,
)
from detector import load_detector
from foundation.shards import verify_dataset
from foundation.storage import model_fingerprint
from safetynet.cli import main
from serving.guard import Guard
from serving.quarantine import Quarantine, QuarantineFull
from serving.quarantine_export import export_quarantine
from serving.quarantine_index import INDEX, LEGACY_IMAGES, verify_store
from serving.quarantine_review import list_records, mark_records, show_record
from training.detector import fit_detector, split_by_source
from training.retrain import retrain_detector
from training.attack_specs import trained_attacks

FINGERPRINT = "f" * 64
SHAPE = (8, 8, 1)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def _rows(store: Path) -> list[dict]:
    connection = sqlite3.connect(store / INDEX)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM records ORDER BY id")]
    finally:
        connection.close()


def _assert_consistent(store: Path) -> None:
    """SQLite finds the index sound and every image matches its sha256 and shape."""
    assert verify_store(store)["records"] == len(_rows(store))
    assert not (store / LEGACY_IMAGES).exists()


def _image(row: dict) -> np.ndarray:
    return np.load(io.BytesIO(row["pixels"]), allow_pickle=False)


def _record(quarantine: Quarantine, x: np.ndarray, rejected: list[bool], request_id: str, **options):
    scores = np.linspace(-1.0, 1.0, len(x))
    return quarantine.record(x, scores, np.array(rejected), request_id=request_id, model="digits",
                      classifier_fingerprint=options.pop("classifier_fingerprint", FINGERPRINT), **options)


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------


def test_record_stores_rejected_inputs_losslessly_with_scores_and_request_ids(tmp_path):
    x = _images(5)
    scores = np.array([0.5, np.nan, 2.0, -1.0, 3.0])
    with Quarantine(tmp_path / "q") as quarantine:
        quarantine.record(x, scores, np.array([False, True, True, False, True]), request_id="req-1", model="digits",
                          classifier_fingerprint=FINGERPRINT)
        x[:] = 0.0  # the caller's arrays may change once record returned
        quarantine.flush()
        assert quarantine.count() == {"rejected": 3, "accepted": 0, "dropped": 0}
    rows = _rows(tmp_path / "q")
    assert [row["request_id"] for row in rows] == ["req-1"] * 3
    assert [row["score"] for row in rows] == [None, 2.0, 3.0]  # NaN (detector failure) is NULL
    assert {row["verdict"] for row in rows} == {"rejected"}
    assert {(row["model"], row["classifier_fingerprint"], row["shape"]) for row in rows} == {("digits", FINGERPRINT, "[8, 8, 1]")}
    for row, expected in zip(rows, _images(5)[[1, 2, 4]], strict=True):
        stored = _image(row)
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored, expected)  # bit for bit
        moment = dt.datetime.fromisoformat(row["time"])
        assert moment.utcoffset() == dt.timedelta(0)
        assert abs(dt.datetime.now(dt.timezone.utc) - moment) < dt.timedelta(minutes=1)  # noqa: UP017
    _assert_consistent(tmp_path / "q")


@pytest.mark.parametrize("sample, accepted", [(0.0, 0), (1.0, 4)])
def test_sample_accepted_stores_that_fraction_of_accepted_inputs(tmp_path, sample, accepted):
    with Quarantine(tmp_path / "q", sample_accepted=sample, seed=0) as quarantine:
        _record(quarantine, _images(6), [True, False, True, False, False, False], "r")
        quarantine.flush()
        assert quarantine.count() == {"rejected": 2, "accepted": accepted, "dropped": 0}


def test_sample_accepted_half_keeps_about_half(tmp_path):
    with Quarantine(tmp_path / "q", sample_accepted=0.5, seed=1) as quarantine:
        for i in range(10):
            _record(quarantine, _images(20, i), [False] * 20, f"r{i}")
        quarantine.flush()
        assert 60 <= quarantine.count()["accepted"] <= 140  # 100 expected, far outside 6 sigma otherwise


def test_records_survive_a_restart_and_new_ones_append(tmp_path):
    store = tmp_path / "q"
    with Quarantine(store) as quarantine:
        _record(quarantine, _images(3), [True, True, True], "before")
    with Quarantine(store, sample_accepted=1.0) as quarantine:
        assert quarantine.count() == {"rejected": 3, "accepted": 0, "dropped": 0}
        _record(quarantine, _images(2, 1), [True, False], "after")
        quarantine.flush()
        assert quarantine.count() == {"rejected": 4, "accepted": 1, "dropped": 0}
    assert [row["id"] for row in _rows(store)] == [1, 2, 3, 4, 5]
    manifest = export_quarantine(store, tmp_path / "all", include="all", unreviewed=True)
    assert manifest["count"] == 5
    np.testing.assert_array_equal(load_adversarial_dataset(tmp_path / "all").x_adv, np.concatenate([_images(3), _images(2, 1)]))


CHILD = """
import sys
import threading
import numpy as np
from serving.quarantine import Quarantine, QuarantineFull

quarantine = Quarantine(sys.argv[1], max_queue=50)
x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
committed = []

printing = threading.Lock()

def report(future, request_id):  # runs once the record's transaction committed (writer or main thread)
    with printing:  # one whole line at a time: print's pieces from two threads would interleave
        sys.stdout.write(f"committed {request_id}\\n")
        sys.stdout.flush()

i = 0
while True:  # keep the writer busy until the parent kills this process
    try:
        future = quarantine.record(x, np.ones(2), np.ones(2, bool), request_id=f"r{i}", model="m",
                                   classifier_fingerprint="f" * 64)
    except QuarantineFull:
        continue
    future.add_done_callback(lambda future, request_id=f"r{i}": report(future, request_id))
    i += 1
"""


def test_a_sigkill_loses_nothing_whose_commit_was_reported_and_the_store_verifies(tmp_path):
    store = tmp_path / "q"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(store)], stdout=subprocess.PIPE, text=True,
                             env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"})
    reported = []
    try:
        while len(reported) < 200:  # commits under way
            reported.append(child.stdout.readline().split()[1])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    complete = child.stdout.read().split("\n")[:-1]  # the kill may cut the last line short: it was not reported
    reported += [line.split()[1] for line in complete if line.startswith("committed ")]
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with Quarantine(store) as quarantine:  # reopening replays SQLite's write-ahead log
        count = quarantine.count()
    stored = [row["request_id"] for row in _rows(store)]
    assert set(reported) <= set(stored)  # every commit reported before the kill is there
    assert count["rejected"] == len(stored) == 2 * len(set(stored))  # whole batches only
    _assert_consistent(store)
    assert export_quarantine(store, tmp_path / "export", unreviewed=True)["count"] == len(stored)


def test_a_format_1_store_is_migrated_with_its_image_files(tmp_path):
    store, x = tmp_path / "q", _images(2)
    (store / LEGACY_IMAGES).mkdir(parents=True)
    connection = sqlite3.connect(store / INDEX)
    connection.execute("""CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,
        model TEXT NOT NULL, time TEXT NOT NULL, score REAL, verdict TEXT NOT NULL, image TEXT NOT NULL UNIQUE,
        sha256 TEXT NOT NULL, shape TEXT NOT NULL, classifier_fingerprint TEXT)""")
    connection.execute("CREATE INDEX records_time ON records (time)")
    for i, image in enumerate(x):
        buffer = io.BytesIO()
        np.save(buffer, image)
        (store / LEGACY_IMAGES / f"{i}.npy").write_bytes(buffer.getvalue())
        connection.execute("INSERT INTO records (request_id, model, time, score, verdict, image, sha256, shape, "
                           "classifier_fingerprint) VALUES (?, 'digits', '2024-01-01T00:00:00+00:00', 1.0, "
                           "'rejected', ?, ?, ?, ?)", (f"old-{i}", f"{i}.npy", hashlib.sha256(buffer.getvalue()).hexdigest(),
                                                       json.dumps(list(image.shape)), FINGERPRINT))
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    with Quarantine(store) as quarantine:
        _record(quarantine, _images(1, 5), [True], "new")
    rows = _rows(store)
    assert [row["request_id"] for row in rows] == ["old-0", "old-1", "new"] and rows[0]["review"] is None
    np.testing.assert_array_equal(np.stack([_image(row) for row in rows]), np.concatenate([x, _images(1, 5)]))
    _assert_consistent(store)


def test_concurrent_record_calls_lose_nothing(tmp_path):
    calls, threads = 40, 8
    with Quarantine(tmp_path / "q", sample_accepted=1.0) as quarantine:
        def work(worker: int) -> None:
            for call in range(calls):
                _record(quarantine, _images(3, worker * calls + call), [True, True, False], f"{worker}-{call}")

        workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        quarantine.flush()
        assert quarantine.count() == {"rejected": 2 * calls * threads, "accepted": calls * threads, "dropped": 0}
    rows = _rows(tmp_path / "q")
    assert sorted({row["request_id"] for row in rows}) == sorted(f"{w}-{c}" for w in range(threads) for c in range(calls))
    _assert_consistent(tmp_path / "q")


def _hold_writer(quarantine: Quarantine) -> tuple[threading.Event, threading.Event]:
    """Make the writer wait in its next batch until `release` is set; `entered` tells it got there."""
    entered, release = threading.Event(), threading.Event()
    store = quarantine._store

    def held_store(connection, items):  # a writer stuck on a slow disk
        entered.set()
        release.wait()
        store(connection, items)

    quarantine._store = held_store
    return entered, release


def test_a_full_queue_refuses_the_whole_batch_without_blocking_and_flush_times_out(tmp_path):
    quarantine = Quarantine(tmp_path / "q", max_queue=3)
    entered, release = _hold_writer(quarantine)
    try:
        first = _record(quarantine, _images(1), [True], "first")
        assert entered.wait(10)  # the writer holds the first record
        began = time.perf_counter()
        with pytest.raises(QuarantineFull, match="at most 3"):
            _record(quarantine, _images(3), [True] * 3, "burst")  # 1 + 3 > 3: none of it queued
        assert time.perf_counter() - began < 0.5
        second = _record(quarantine, _images(2), [True] * 2, "fits")
        assert quarantine.stats() | {"commits": 0} == {"stored_rejected": 0, "stored_accepted": 0, "queue_depth": 3,
                                                        "dropped": 0, "refused": 3, "commits": 0}
        with pytest.raises(TimeoutError, match="not yet written"):
            quarantine.flush(timeout=0.1)
        assert not first.done() and not second.done()
    finally:
        release.set()
        quarantine.close()
    assert first.result() == 1 and second.result() == 2
    assert quarantine.count() == {"rejected": 3, "accepted": 0, "dropped": 0}
    assert quarantine.stats()["stored_rejected"] == 3 and quarantine.stats()["queue_depth"] == 0
    assert _record(quarantine, _images(1), [True], "after close").result() == 0  # dropped, never raised
    assert quarantine.count()["dropped"] == 1


def test_a_write_error_drops_the_batch_fails_its_futures_and_the_writer_goes_on(tmp_path, monkeypatch):
    from serving import quarantine as module

    original, encoded = module.encode_image, []

    def failing_encode(image):  # the second image of the second batch hits a bad disk
        encoded.append(1)
        if len(encoded) == 3:
            raise OSError(28, "No space left on device")
        return original(image)

    monkeypatch.setattr(module, "encode_image", failing_encode)
    with Quarantine(tmp_path / "q") as quarantine:
        entered, release = _hold_writer(quarantine)
        _record(quarantine, _images(1), [True], "first")
        assert entered.wait(10)
        lost = _record(quarantine, _images(3), [True] * 3, "lost")  # queued whole: the writer takes one batch
        release.set()
        with pytest.raises(OSError, match="No space"):
            lost.result(timeout=10)
        _record(quarantine, _images(1), [True], "kept")
        quarantine.flush()
        assert quarantine.count() == {"rejected": 2, "accepted": 0, "dropped": 3}
    assert [row["request_id"] for row in _rows(tmp_path / "q")] == ["first", "kept"]
    _assert_consistent(tmp_path / "q")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="sample_accepted"):
        Quarantine(tmp_path / "q", sample_accepted=1.5)
    with pytest.raises(ValueError, match="max_queue"):
        Quarantine(tmp_path / "q", max_queue=0)
    with Quarantine(tmp_path / "q") as quarantine, pytest.raises(ValueError, match="one score and one verdict each"):
        quarantine.record(_images(3), np.zeros(2), np.ones(3, bool), request_id="r", model="m")
    connection = sqlite3.connect(tmp_path / "q" / INDEX)
    connection.execute("PRAGMA user_version = 7")
    connection.close()
    with pytest.raises(ValueError, match="format version 7"):
        Quarantine(tmp_path / "q")


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def store(tmp_path) -> Path:
    """2 rejected and 1 accepted record before a pause, then 1 rejected and 1 accepted."""
    with Quarantine(tmp_path / "store", sample_accepted=1.0) as quarantine:
        _record(quarantine, _images(3), [True, False, True], "early")
        quarantine.flush()
        time.sleep(0.01)
        _record(quarantine, _images(2, 1), [True, False], "late")
    return tmp_path / "store"


def test_export_writes_a_verified_adversarial_only_dataset(store, tmp_path):
    manifest = export_quarantine(store, tmp_path / "out", unreviewed=True)
    assert verify_dataset(tmp_path / "out").ok
    data = load_adversarial_dataset(tmp_path / "out")
    assert manifest["adversarial_only"] is True and data.manifest == manifest
    assert manifest["attack"] == {"attack": "quarantine", "include": "rejected", "since": None, "model": None,
                                  "unreviewed": True}
    assert manifest["left_out"] == {"clean": 0, "unsure": 0, "unreviewed": 0}
    assert manifest["source"]["data"] == f"quarantine:{store.resolve()}"
    assert manifest["classifier_fingerprint"] == FINGERPRINT and manifest["image_shape"] == list(SHAPE)
    assert manifest["count"] == 3 and manifest["complete"]
    np.testing.assert_array_equal(data.x_adv, np.concatenate([_images(3)[[0, 2]], _images(2, 1)[:1]]))
    assert np.isnan(data.x_clean).all() and data.x_clean.shape == data.x_adv.shape  # no clean versions
    np.testing.assert_array_equal(data.index, [1, 3, 4])  # record ids
    assert (data.y == -1).all() and (data.target == -1).all() and data.success.all()
    assert "quarantine" in "\n".join(describe(tmp_path / "out"))


def test_export_filters_by_verdict_time_and_model(store, tmp_path):
    assert export_quarantine(store, tmp_path / "all", include="all", unreviewed=True)["count"] == 5
    late = next(row["time"] for row in _rows(store) if row["request_id"] == "late")
    since = dt.datetime.fromisoformat(late).astimezone(dt.timezone(dt.timedelta(hours=2)))  # any zone
    manifest = export_quarantine(store, tmp_path / "late", include="all", since=since.isoformat(), unreviewed=True)
    assert manifest["count"] == 2 and manifest["attack"]["since"] == late
    assert export_quarantine(store, tmp_path / "z", since=late.replace("+00:00", "Z"), unreviewed=True)["count"] == 1
    with pytest.raises(ValueError, match="no quarantined records"):
        export_quarantine(store, tmp_path / "other", model="another-guard")
    assert export_quarantine(store, tmp_path / "small", include="all", shard_size=2, unreviewed=True)["shards"][-1]["count"] == 1
    assert verify_dataset(tmp_path / "small").ok


def test_export_refuses_bad_input(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="quarantine store not found"):
        export_quarantine(tmp_path / "missing", tmp_path / "out")
    Quarantine(tmp_path / "empty").close()
    with pytest.raises(ValueError, match="no quarantined records to export"):
        export_quarantine(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="include"):
        export_quarantine(store, tmp_path / "out", include="accepted")
    with pytest.raises(ValueError, match="ISO 8601"):
        export_quarantine(store, tmp_path / "out", since="yesterday")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_quarantine(store, tmp_path / "exists")
    assert not (tmp_path / "out").exists()


def test_export_refuses_records_of_different_or_unknown_classifiers(tmp_path):
    with Quarantine(tmp_path / "mixed") as quarantine:
        _record(quarantine, _images(1), [True], "a")
        _record(quarantine, _images(1), [True], "b", classifier_fingerprint="e" * 64)
    with pytest.raises(ValueError, match="2 different classifiers"):
        export_quarantine(tmp_path / "mixed", tmp_path / "out", unreviewed=True)
    with Quarantine(tmp_path / "unknown") as quarantine:
        _record(quarantine, _images(1), [True], "a", classifier_fingerprint=None)
    with pytest.raises(ValueError, match="no classifier fingerprint"):
        export_quarantine(tmp_path / "unknown", tmp_path / "out", unreviewed=True)


def test_export_refuses_a_corrupt_image(store, tmp_path):
    with contextlib.closing(sqlite3.connect(store / INDEX)) as connection:
        pixels = _rows(store)[0]["pixels"]
        connection.execute("UPDATE records SET pixels = ? WHERE id = 1", (pixels[:-4] + b"\0\0\0\0",))
        connection.commit()
    with pytest.raises(ValueError, match="corrupt"):
        export_quarantine(store, tmp_path / "out", unreviewed=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="record 1 is corrupt"):
        verify_store(store)


# --------------------------------------------------------------------------------------------
# review
# --------------------------------------------------------------------------------------------


def test_export_takes_reviewed_records_and_leaves_out_clean_ones(store, tmp_path):
    assert [r["id"] for r in list_records(store, review="unreviewed", verdict="rejected")] == [1, 3, 4]
    assert mark_records(store, [1, 4], "adversarial") == 2 and mark_records(store, [3], "clean") == 1
    assert mark_records(store, [2], "unsure") == 1
    manifest = export_quarantine(store, tmp_path / "reviewed")  # default: marked adversarial only
    assert manifest["count"] == 2 and manifest["left_out"] == {"clean": 1, "unsure": 0, "unreviewed": 0}
    np.testing.assert_array_equal(load_adversarial_dataset(tmp_path / "reviewed").index, [1, 4])
    everything = export_quarantine(store, tmp_path / "all", include="all", unreviewed=True)
    assert everything["count"] == 3 and everything["left_out"] == {"clean": 1, "unsure": 1, "unreviewed": 0}
    assert [r["id"] for r in list_records(store, review="clean")] == [3]
    fields, image = show_record(store, 3)
    assert fields["review"] == "clean" and fields["reviewed_time"] and fields["request_id"] == "early"
    np.testing.assert_array_equal(image, _images(3)[2])


def test_unreviewed_records_are_left_out_by_default_with_a_hint(store, tmp_path):
    with pytest.raises(ValueError, match=r"'unreviewed': 3.*quarantine mark"):
        export_quarantine(store, tmp_path / "out")


def test_review_refuses_bad_input(store):
    with pytest.raises(ValueError, match=r"no records \[99\]"):
        mark_records(store, [1, 99], "clean")
    assert list_records(store, review="clean") == []  # all or none
    with pytest.raises(ValueError, match="review must be one of"):
        mark_records(store, [1], "benign")
    with pytest.raises(ValueError, match="review must be one of"):
        list_records(store, review="maybe")
    with pytest.raises(ValueError, match="no record 42"):
        show_record(store, 42)


# --------------------------------------------------------------------------------------------
# retraining on a quarantine export (digits: a detector trained on FGSM meets PGD-L2 in production)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def production(digits, digits_classifier, tmp_path_factory):
    """A detector trained on FGSM (dataset path recorded for replay), and a quarantine export of
    every input a guard saw while PGD-L2 examples of the test split arrived (rejected or not)."""
    root = tmp_path_factory.mktemp("production")
    generate_dataset(digits_classifier, FGSM(eps=0.3), ArraySource(digits.x_train, digits.y_train), root / "fgsm",
                     source_info={"data": "digits", "split": "train"}, progress=False)
    fgsm = load_adversarial_dataset(root / "fgsm")
    fit_detector([fgsm], epochs=4, verbose=0, paths=[str(root / "fgsm")]).save(root / "detector")
    guard = Guard(digits_classifier, load_detector(root / "detector"))
    attack = parse_attack_spec("pgd:eps=1.5,norm=2,steps=10")
    x = attack(digits_classifier, digits.x_test, digits.y_test).x_adv
    with Quarantine(root / "quarantine", sample_accepted=1.0, seed=0) as quarantine:
        for start in range(0, len(x), 32):
            result = guard.predict(x[start : start + 32])
            quarantine.record(x[start : start + 32], result.scores, result.rejected, request_id=f"req-{start}",
                              model=guard.name, classifier_fingerprint=model_fingerprint(digits_classifier))
    export_quarantine(root / "quarantine", root / "export", include="all", unreviewed=True)
    return {"root": root, "fgsm": fgsm, "export": load_adversarial_dataset(root / "export"), "x": x,
            "guard": guard, "attack": attack}


def test_split_takes_clean_images_only_from_ordinary_datasets(production):
    fgsm, export = production["fgsm"], production["export"]
    split = split_by_source([export, fgsm], 0.2, seed=0)
    alone = split_by_source([fgsm], 0.2, seed=0)
    np.testing.assert_array_equal(split.x_clean_fit, alone.x_clean_fit)  # unchanged by the export
    np.testing.assert_array_equal(split.x_clean_held_out, alone.x_clean_held_out)
    np.testing.assert_array_equal(split.adversarial_fit[1], alone.adversarial_fit[0])
    fit, held = split.adversarial_fit[0], split.adversarial_held_out[0]
    assert len(held) == round(0.2 * len(export.index)) and len(fit) + len(held) == len(export.index)
    rows = {image.tobytes() for image in export.x_adv}
    assert {image.tobytes() for image in fit}.isdisjoint(image.tobytes() for image in held)
    assert {image.tobytes() for image in np.concatenate([fit, held])} == rows


def test_retrain_needs_a_dataset_with_clean_images(production):
    detector = production["guard"].detector
    with pytest.raises(ValueError, match="no clean images"):
        retrain_detector(detector, [production["export"]], [], epochs=1, verbose=0)


def test_retrain_on_a_quarantine_export_raises_its_detection(production, digits, digits_classifier, capsys):
    root = production["root"]
    assert main(["retrain", "--detector", str(root / "detector"), "--adversarial", str(root / "export"),
                 "--epochs", "6"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table.splitlines()
            if line.startswith(("new:", "replay:"))}
    before, after = rows["new:quarantine:0"]
    assert after >= before + 0.1, table  # 0.57 -> 0.74 when measured
    old_before, old_after = rows["replay:fgsm:1"]
    assert old_after >= old_before - 0.01, table
    retrained = load_detector(root / "detector.v2")
    assert retrained.info["trained_on"][-1]["adversarial_only"] is True
    assert retrained.calibration.fpr <= 0.05
    # PGD-L2 on images the quarantine never saw is caught more often too
    fresh = production["attack"](digits_classifier, digits.x_train[:300], digits.y_train[:300]).x_adv
    assert retrained.predict(fresh).mean() >= production["guard"].detector.predict(fresh).mean() + 0.05
    assert [attack.name for attack in trained_attacks(root / "detector.v2")] == ["fgsm"]  # evaluate's defaults


# --------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------


def test_quarantine_commands_info_and_export(store, tmp_path, capsys):
    assert main(["quarantine", "info", "--store", str(store)]) == 0
    info = capsys.readouterr().out
    assert "3 rejected, 2 accepted" in info and "digits (5)" in info and FINGERPRINT[:16] in info
    assert main(["quarantine", "export", "--store", str(store), "--out", str(tmp_path / "out"), "--include", "all",
                 "--include-unreviewed"]) == 0
    assert "examples:   5 in 1 shards" in capsys.readouterr().out
    assert main(["dataset", "verify", str(tmp_path / "out")]) == 0


def test_quarantine_review_commands_list_show_mark_verify_and_export(store, tmp_path, capsys):
    assert main(["quarantine", "list", "--store", str(store), "--review", "unreviewed", "--verdict", "rejected"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[1:]] == ["1", "3", "4"]
    assert main(["quarantine", "mark", "--store", str(store), "--id", "1", "3-4", "--as", "adversarial"]) == 0
    assert main(["quarantine", "mark", "--store", str(store), "--id", "3", "--as", "clean"]) == 0
    assert capsys.readouterr().out.splitlines() == ["marked 3 records adversarial", "marked 1 records clean"]
    assert main(["quarantine", "show", "--store", str(store), "--id", "3", "--png", str(tmp_path / "3.png")]) == 0
    shown = capsys.readouterr().out
    assert "review:                 clean" in shown and "request_id:             early" in shown
    assert cv2.imread(str(tmp_path / "3.png"), cv2.IMREAD_UNCHANGED).shape == SHAPE[:2]
    with pytest.raises(SystemExit, match="2"):
        main(["quarantine", "mark", "--store", str(store), "--id", "9-3", "--as", "clean"])
    assert "not a record id or range" in capsys.readouterr().err
    assert main(["quarantine", "verify", "--store", str(store)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 5 records verified"
    assert main(["quarantine", "export", "--store", str(store), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "examples:   2 in 1 shards" in out and "left out:   1 (1 marked clean, 0 unsure, 0 not reviewed)" in out


@pytest.mark.parametrize("args, message", [
    (["quarantine", "info", "--store", "{tmp}/missing"], "quarantine store not found"),
    (["quarantine", "export", "--store", "{tmp}/missing", "--out", "{tmp}/out"], "quarantine store not found"),
    (["quarantine", "export", "--store", "{tmp}/empty", "--out", "{tmp}/out"], "no quarantined records"),
    (["quarantine", "export", "--store", "{tmp}/empty", "--out", "{tmp}/out", "--since", "soon"], "ISO 8601"),
    (["quarantine", "mark", "--store", "{tmp}/empty", "--id", "4", "--as", "clean"], "has no records [4]"),
    (["quarantine", "show", "--store", "{tmp}/empty", "--id", "1"], "has no record 1"),
    (["quarantine", "list", "--store", "{tmp}/missing"], "quarantine store not found"),
])
def test_quarantine_commands_refuse_bad_input_in_one_line(args, message, tmp_path, capsys):
    Quarantine(tmp_path / "empty").close()
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
