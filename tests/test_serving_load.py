"""The quarantine under load and a SIGKILL mid-burst (`benchmarks/serving_load.py`, shortened):
`safetynet serve --quarantine` in a subprocess, 32 clients, a quarter of the images PGD examples."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_http import guard, pgd  # noqa: F401 (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serving_load import load_and_kill, request_bodies  # noqa: E402


@pytest.fixture(scope="module")
def figures(guard, pgd, digits, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("load")
    guard.save(root / "guard")
    bodies = request_bodies(digits.x_test, pgd, batch=8, fraction=0.25, count=64)
    return load_and_kill(root / "guard", root / "quarantine", bodies, clients=32, seconds=6.0, kill_after=4.0)


def test_load_answers_everything_and_the_quarantine_keeps_up(figures):
    load = figures["load"]
    assert load["requests"] > 100 and load["errors"] == 0 and load["client_failures"] == {}, load
    assert load["quarantine_dropped"] == load["quarantine_refused"] == load["quarantine_errors"] == 0, load
    assert load["quarantine_stored_rejected"] >= load["rejects_answered"] > 0, load  # every answered reject stored
    assert load["queue_depth_max"] <= 32 * 8, load  # at most every client's batch waits: bounded


def test_a_sigkill_mid_burst_loses_no_answered_or_counted_reject_and_the_store_verifies(figures):
    kill = figures["kill"]
    assert kill["rejects_answered"] > 0 and kill["answered_rejects_lost"] == 0, kill
    assert kill["stored_after_restart"] >= kill["metrics_last_counted_stored"] > 0, kill
    assert kill["store_verified_records"] >= kill["stored_after_restart"], kill
    assert kill["statuses"] == {"200": kill["requests"]}, kill  # nothing but 200 until the kill
