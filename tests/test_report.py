"""Tests for the report files (report.json, report.md, PNG figures, report.html) written by the
evaluate stage, rerun determinism and fingerprints, the evaluate command's errors for bad input, and
the cross-attack matrix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from attacks import FGSM, PGD, AttackResult
from attacks.adaptive import AdaptiveAPGD, AdaptivePGD
from detector import InputDetector, load_detector
from detector.adaptive_evaluation import AdaptiveSettings
from detector.cross_attack import cross_attack_matrix
from detector.evaluation import detector_fingerprint
from detector.plots import eps_groups
from detector.report import markdown
from foundation.models import save_model
from foundation.storage import model_fingerprint
from safetynet.cli import main
from training.classifier import train_classifier
from training.evaluate_stage import CHECKPOINTS, evaluate_stage

EPS = 0.3
SMALL = AdaptiveSettings(steps=5, lambdas=(1.0, 10.0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits, digits_classifier) -> dict[str, Any]:
    """A classifier file, an input detector made for it (fitted, and saved as a directory), and
    another classifier's file."""
    folder = tmp_path_factory.mktemp("report")
    x, y = digits.x_train[:600], digits.y_train[:600]
    adversarial = np.concatenate([a(digits_classifier, x, y).x_adv for a in (FGSM(eps=EPS), PGD(eps=EPS, steps=5))])
    detector = InputDetector(epochs=3).fit(np.concatenate([x, x]), adversarial, verbose=0)
    detector.calibrate(digits.x_train[600:], 0.05)
    detector.classifier_fingerprint = model_fingerprint(digits_classifier)
    detector.save(folder / "detector")
    save_model(digits_classifier, folder / "classifier.keras")
    other = train_classifier(x, y, digits.num_classes, epochs=1, seed=1, verbose=0)
    save_model(other, folder / "other.keras")
    return {"model": folder / "classifier.keras", "detector": folder / "detector", "other": folder / "other.keras",
            "fitted": detector}


@pytest.mark.slow  # 45 s on 2 cores: pytest -m slow
def test_evaluate_writes_json_markdown_figures_and_html(saved, digits, tmp_path):
    out = tmp_path / "eval"
    report = evaluate_stage(saved["model"], saved["detector"], digits, out, attacks=["fgsm", "pgd:steps=5"],
                            eps_sweep=[0.1, 0.3], n=60, adaptive=SMALL, cross_attack=True, cross_attack_n=200,
                            cross_attack_epochs=1, html=True, log=lambda _: None)
    assert json.loads((out / "report.json").read_text()) == report
    assert list(report["attacks"]) == ["fgsm@eps=0.1", "fgsm@eps=0.3", "pgd@eps=0.1", "pgd@eps=0.3"]
    assert [row["eps"] for row in report["attacks"].values()] == [0.1, 0.3, 0.1, 0.3]
    params = report["attacks"]["pgd@eps=0.1"]["params"]
    assert params["step_size"] is None and params["rel_stepsize"] == pytest.approx(2.5 / 5)  # follows the new eps
    assert report["attacks"]["pgd@eps=0.3"]["params"]["eps"] == 0.3
    assert set(report["adaptive"]["attacks"]) == {"adaptive_worst_case@eps=0.1", "adaptive_worst_case@eps=0.3"}
    assert report["cross_attack"]["train"] == list(report["attacks"])
    assert set(eps_groups(report)) == {"fgsm", "pgd", "adaptive_worst_case"}

    text = (out / "report.md").read_text()
    for heading in ("## Summary", "## Attacks (non-adaptive)", "## Adaptive attacks", "## Adaptive suite", "## Cross-attack matrix",
                    "## Reproducibility", "## Figures"):
        assert heading in text, heading
    table_rows = [line for line in text.splitlines() if line.startswith("| ")]
    for name in ["fgsm@eps=0.1", "fgsm@eps=0.3", "pgd:steps=5@eps=0.1", "pgd:steps=5@eps=0.3", *report["adaptive"]["attacks"]]:
        assert any(line.startswith(f"| {name} |") for line in table_rows), name  # pgd's non-default steps spelt out

    for name in ("roc", "histograms", "cross_attack", "guarded_vs_eps", "taylor"):
        path = out / "plots" / f"{name}.png"
        assert f"(plots/{name}.png)" in text
        image = cv2.imread(str(path))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100, name
    page = (out / "report.html").read_text()
    suite_rows = [line for line in table_rows if line.startswith("| adaptive_worst_case@eps=0.3 | orthogonal_pgd |")]
    assert len(suite_rows) == 1  # each attack of the suite on its own row, per budget
    assert page.count("<table>") == 6 and page.count("data:image/png;base64,") == 5
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


@pytest.mark.slow  # 30 s on 2 cores: pytest -m slow
def test_rerun_gives_the_same_report(saved, digits, tmp_path):
    def run(out: Path) -> dict:
        report = evaluate_stage(saved["model"], saved["detector"], digits, out, attacks=["pgd:steps=5"], n=40,
                                adaptive=SMALL, seed=3, command=["safetynet", "evaluate"], log=lambda _: None)
        assert report["reproducibility"].pop("created")
        return report

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first == second
    info = first["reproducibility"]
    assert info["seed"] == 3 and info["command"] == ["safetynet", "evaluate"]
    assert info["classifier_fingerprint"] == first["classifier"]["fingerprint"]
    assert info["detector_fingerprint"] == first["detector"]["fingerprint"]
    assert {"numpy", "keras", "scikit-learn"} <= set(info["versions"])


def test_an_interrupted_evaluate_resumes_and_clears_its_checkpoints(saved, digits, tmp_path, monkeypatch):
    """The stage keeps finished adaptive attacks in --out/adaptive-progress; the same call after an
    interruption reuses them, writes the report and removes the folder."""
    out, settings = tmp_path / "eval", AdaptiveSettings(steps=3, lambdas=(1.0,), suite=("adaptive_pgd", "apgd_ce"))
    real = AdaptiveAPGD.__call__

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AdaptiveAPGD, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_stage(saved["model"], saved["detector"], digits, out, attacks=["pgd:steps=3"], n=20, adaptive=settings,
                       log=lambda _: None)
    assert [p.name for p in (out / CHECKPOINTS).iterdir()] == ["adaptive_worst_case@eps=0.3-adaptive_pgd.npz"]
    monkeypatch.setattr(AdaptiveAPGD, "__call__", real)
    monkeypatch.setattr(AdaptivePGD, "__call__", interrupted)  # must not run again
    report = evaluate_stage(saved["model"], saved["detector"], digits, out, attacks=["pgd:steps=3"], n=20, adaptive=settings,
                            log=lambda _: None)
    assert list(report["adaptive"]["attacks"]["adaptive_worst_case@eps=0.3"]["suite"]) == ["adaptive_pgd", "apgd_ce", "pgd"]
    assert (out / "report.json").is_file() and not (out / CHECKPOINTS).exists()


def test_markdown_without_optional_sections(saved, digits, tmp_path):
    report = evaluate_stage(saved["model"], saved["detector"], digits, tmp_path, attacks=["cw:steps=5"], n=20,
                            adaptive=SMALL, log=lambda _: None)
    assert "adaptive" not in report  # no L-p budget to attack adaptively
    text = markdown(report, [])
    assert "## Attacks" in text and "## Adaptive" not in text and "## Cross-attack" not in text
    assert not (tmp_path / "plots" / "guarded_vs_eps.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attacks", "pgd:eps"], "cannot parse"),
        (["--attacks", "pgd:eps=0.3,stepz=4"], "takes no parameter"),
        (["--attacks", "fgsm", "--eps-sweep", "0.1", "1.5"], "eps must lie"),
        (["--attacks", "fgsm", "--lambdas", "-1"], "lambdas"),
        (["--attacks", "fgsm", "--adaptive-steps", "0"], "steps must be"),
        (["--attacks", "fgsm", "--model", "{other}"], "different classifier"),
        (["--attacks", "fgsm", "--n", "0"], "n must be"),
    ],
)
def test_bad_input_fails_before_any_work(args, message, saved, tmp_path, capsys):
    values = {"other": saved["other"]}
    argv = ["evaluate", "--model", str(saved["model"]), "--detector", str(saved["detector"]),
            "--out", str(tmp_path / "eval"), *[a.format(**values) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "eval").exists()


def test_an_unknown_attack_is_refused_while_parsing(saved, tmp_path, capsys):
    with pytest.raises(SystemExit, match="^2$"):  # before anything loads: tests/test_cli.py
        main(["evaluate", "--model", str(saved["model"]), "--detector", str(saved["detector"]), "--attacks", "fgsm2",
              "--out", str(tmp_path / "eval")])
    assert "unknown attack 'fgsm2'" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_detector_fingerprint_survives_save_and_load(saved):
    assert detector_fingerprint(load_detector(saved["detector"])) == detector_fingerprint(saved["fitted"])
    retuned = load_detector(saved["detector"]).calibrate(np.zeros((10, 8, 8, 1), np.float32), 0.1)
    assert detector_fingerprint(retuned) != detector_fingerprint(saved["fitted"])


# --------------------------------------------------------------------------------------------
# Cross-attack matrix (the Python API)
# --------------------------------------------------------------------------------------------


def test_cross_attack_matrix_trains_one_detector_per_attack(digits, digits_classifier):
    x_train, y_train = digits.x_train[:400], digits.y_train[:400]
    x, y = digits.x_test[:120], digits.y_test[:120]
    attacks = {"fgsm": FGSM(eps=EPS), "pgd": PGD(eps=EPS, steps=5)}
    pgd_pair = (x_train, attacks["pgd"](digits_classifier, x_train, y_train).x_adv)
    fits = []

    def fit(clean, adversarial):
        fits.append((len(clean), len(adversarial)))
        return InputDetector(epochs=3).fit(clean, adversarial, verbose=0)

    results = {name: a(digits_classifier, x, y) for name, a in attacks.items()}
    wrong = np.argmax(digits_classifier.predict(x, verbose=0), axis=-1) != y
    assert wrong.any()
    zeros = np.zeros(len(x), np.float32)  # "succeeds" on the classifier's own errors, unchanged: turns none
    results["unchanged"] = AttackResult(x, wrong, zeros, zeros)
    matrix = cross_attack_matrix(digits_classifier, {"fgsm": attacks["fgsm"], "pgd": pgd_pair}, results, x, y, fit,
                                 x_train=x_train, y_train=y_train, target_fpr=0.05)
    assert matrix["train"] == ["fgsm", "pgd"] and matrix["test"] == ["fgsm", "pgd", "unchanged"]
    assert len(fits) == 2 and all(c == a < 400 for c, a in fits)  # calibration images held out
    assert np.shape(matrix["auroc"]) == np.shape(matrix["tpr"]) == (2, 3)
    assert min(min(row[:2]) for row in matrix["auroc"]) > 0.8  # FGSM and PGD at 0.3 look alike
    assert all(row[2] is None for row in matrix["auroc"] + matrix["tpr"])  # no positives, no figure
    assert all(0.0 <= fpr < 0.25 for fpr in matrix["clean_fpr"])
    json.dumps(matrix)
    with pytest.raises(ValueError, match="x_train"):
        cross_attack_matrix(digits_classifier, {"fgsm": attacks["fgsm"]}, results, x, y, fit)
