"""The acceptance figures of the MNIST pipeline (README "Measured on MNIST"), with the adaptive suite
on the first 100 test images instead of 1,000 (the README command's part that takes most of its
time; 100 keeps CI well inside its time on a slow machine); about 5 minutes on 2 cores.

Run with `pytest -m slow`.
"""
from __future__ import annotations

import json

import pytest

from safetynet.cli import main


@pytest.mark.slow
def test_mnist_quickstart_meets_its_targets(shared_data, tmp_path):
    npz = shared_data / "mnist" / "mnist_keras_arrays.npz"
    assert main(["quickstart", "--data", str(npz), "--no-robust", "--adaptive-n", "100", "--out", str(tmp_path / "mnist")]) == 0
    report = json.loads((tmp_path / "mnist" / "report.json").read_text())
    assert report["n"] == 10_000
    assert report["classifier"]["clean_accuracy"] >= 0.985
    assert report["detector"]["clean_fpr"] <= 0.06
    assert report["attacks"]["pgd"]["success_rate"] >= 0.95
    for name in ("fgsm", "pgd"):
        assert report["attacks"][name]["eps"] == pytest.approx(0.3)
        assert report["attacks"][name]["auroc"] >= 0.99
        assert report["attacks"][name]["tpr"] >= 0.95
    # a detector in front of a non-robust classifier: the adaptive suite, on the first 100, breaks it
    (worst,) = report["adaptive"]["attacks"].values()
    assert report["adaptive"]["settings"]["max_inputs"] == 100 and worst["n"] == 100
    assert worst["worst_case_guarded_accuracy"] <= 0.25
