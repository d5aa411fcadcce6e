"""`quickstart` cut off in a stage resumes there when run again (quickstart.json records the run);
another command into the folder is refused. The stages are stand-ins that write what the real ones
write and count their calls: resuming inside a stage is each stage's own test (tests/test_harden.py,
tests/test_report.py, tests/test_dataset.py)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import training.quickstart as quickstart_module
from training.quickstart import quickstart

REPORT = {"attacks": {"pgd": {"eps": 0.1, "guarded_accuracy": 0.5}}, "detector": {"guarded_clean_accuracy": 0.9}}


class Cut(Exception):
    """The process dying in a stage."""


@pytest.fixture
def stages(monkeypatch) -> dict:
    """Stand-in stages; `calls` counts each, `cut` names the one that dies on its next call."""
    state = {"calls": Counter(), "cut": None}

    def stand_in(name, write):
        def stage(*args, **kwargs):
            state["calls"][name] += 1
            if state["cut"] == name:
                state["cut"] = None
                raise Cut(name)
            return write(*args, **kwargs)
        return stage

    def report(path: Path) -> dict:
        path.mkdir(parents=True, exist_ok=True)
        (path / "report.json").write_text(json.dumps(REPORT))
        return REPORT

    monkeypatch.setattr(quickstart_module, "train_classifier_stage", stand_in("classifier", lambda data, out, **_: out.write_text("m")))
    monkeypatch.setattr(quickstart_module, "attack_stage", stand_in("attack", lambda model, data, attack, out, **_: out.mkdir(parents=True)))
    monkeypatch.setattr(quickstart_module, "train_detector_stage", stand_in("detector", lambda datasets, out, **_: out.mkdir()))
    monkeypatch.setattr(quickstart_module, "evaluate_stage", stand_in("evaluation", lambda model, detector, data, out, **_: report(out)))
    monkeypatch.setattr(quickstart_module, "harden", stand_in("robust", lambda model, data, out, *_, **__: report(out / "report")))
    return state


def test_an_interrupted_quickstart_resumes_at_the_stage_it_was_in(tmp_path, stages):
    out, lines = tmp_path / "run", []
    stages["cut"] = "robust"
    with pytest.raises(Cut):
        quickstart("digits", out, detector_epochs=2, log=lines.append)
    record = json.loads((out / "quickstart.json").read_text())
    assert record["done"] == ["classifier", "datasets", "detector", "evaluation"] and not record["finished"]

    with pytest.raises(FileExistsError, match="holds an interrupted quickstart with another setting detector_epochs: run that command again"):
        quickstart("digits", out, detector_epochs=3, log=lines.append)
    lines.clear()
    quickstart("digits", out, detector_epochs=2, log=lines.append)
    assert stages["calls"] == {"classifier": 1, "attack": 2, "detector": 1, "evaluation": 1, "robust": 2}
    assert lines[0] == f"resuming the interrupted quickstart in {out} (finished: classifier, datasets, detector, evaluation)"
    assert "[3/5] detector: finished by the interrupted run, kept" in lines
    assert "robust (harden, joint rule)" in lines[-1]  # the table, from both stored reports
    assert json.loads((out / "quickstart.json").read_text())["finished"]

    with pytest.raises(FileExistsError, match="already exists: rerun with --overwrite"):
        quickstart("digits", out, detector_epochs=2, log=lines.append)


def test_a_quickstart_cut_off_in_its_first_stage_starts_it_again_and_overwrite_starts_over(tmp_path, stages):
    out = tmp_path / "run"
    stages["cut"] = "classifier"
    with pytest.raises(Cut):
        quickstart("digits", out, robust=False, log=lambda _: None)
    quickstart("digits", out, robust=False, log=lambda _: None)
    assert stages["calls"] == {"classifier": 2, "attack": 2, "detector": 1, "evaluation": 1}

    stages["cut"] = "detector"
    with pytest.raises(Cut):
        quickstart("digits", out, robust=False, overwrite=True, log=lambda _: None)
    assert json.loads((out / "quickstart.json").read_text())["done"] == ["classifier", "datasets"]
    quickstart("digits", out, robust=False, seed=1, overwrite=True, log=lambda _: None)  # another run, started over
    assert stages["calls"] == {"classifier": 4, "attack": 6, "detector": 3, "evaluation": 2}
