"""Tests for detector.evaluation: the report schema, hand-checked AUROC / TPR / FPR, counting only
adversarial examples an attack turned, report keys, the text table, report.json, and a real detector."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest
from keras import ops
from sklearn.metrics import roc_auc_score

from attacks import FGSM, PGD
from attacks.base import Attack, AttackResult
from foundation.storage import model_fingerprint
from detector import metrics
from detector.calibration import Calibration
from detector.evaluation import evaluate, format_table, write_report

from doubles import SyntheticDetector

EPS = 0.3
FAST: dict[str, Any] = {"adaptive": None, "taylor_inputs": 0}  # tests of the adaptive part: test_adaptive.py


# --------------------------------------------------------------------------------------------
# Test doubles
# --------------------------------------------------------------------------------------------


class CornerDetector(SyntheticDetector):
    """Hand-set scores: 10 x the top-left pixel (always 0 in clean digits) plus the mean pixel."""

    kind = "corner-test"

    def _score(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return 10.0 * x[:, 0, 0, 0] + x.reshape(len(x), -1).mean(axis=1)


RECORDED: list[tuple[str, float, AttackResult]] = []


class _Recording:
    """Keeps each result the attack returns, so a test can recompute the report by hand."""

    def __call__(self, *args, **kwargs):
        result = super().__call__(*args, **kwargs)
        RECORDED.append((self.name, self.eps, result))
        return result


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordingFGSM(_Recording, FGSM):
    pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordingPGD(_Recording, PGD):
    pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScriptedAttack(Attack):
    """Every other input 'succeeds' and gets a bright top-left pixel; the others come back unchanged."""

    name = "scripted"
    eps: float = 1.0

    def _batch(self, forward, x, y, noise, targeted):  # pragma: no cover - __call__ is scripted
        raise AssertionError("not used")

    def __call__(self, model, x, y, *, targets=None, batch_size=256, progress=False) -> AttackResult:
        x = np.asarray(x, np.float32)
        success = np.arange(len(x)) % 2 == 0
        x_adv = x.copy()
        x_adv[success, 0, 0, 0] = 1.0
        delta = (x_adv - x).reshape(len(x), -1)
        return AttackResult(x_adv, success, np.abs(delta).max(axis=1), np.linalg.norm(delta, axis=1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class IdentityAttack(Attack):
    """A user-defined attack without an `eps`: returns the input; succeeds where the model errs."""

    name = "identity"

    def _batch(self, forward, x, y, noise, targeted):
        predicted = ops.cast(ops.argmax(forward(x), axis=-1), y.dtype)
        fooled = predicted == y if targeted else predicted != y
        zeros = ops.zeros((ops.shape(x)[0],))
        return x, fooled, zeros, zeros


def _raise_on_constant(token: str):
    raise AssertionError(f"report.json holds the non-JSON constant {token}")


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corner(digits) -> CornerDetector:
    return CornerDetector().calibrate(digits.x_train, 0.1)


@pytest.fixture(scope="module")
def recorded_report(digits, digits_classifier, corner):
    RECORDED.clear()
    attacks = [RecordingFGSM(eps=0.1), RecordingPGD(eps=0.1, steps=5)]
    report = evaluate(
        digits_classifier, corner, digits.x_test, digits.y_test, attacks, data="digits:test", progress=False, **FAST
    )
    return report, list(RECORDED)


# --------------------------------------------------------------------------------------------
# Report schema and hand-checked numbers
# --------------------------------------------------------------------------------------------


def test_report_schema(recorded_report):
    report, _ = recorded_report
    assert {"data", "classifier", "detector", "attacks"} <= set(report)
    assert report["data"] == "digits:test"
    assert {"clean_accuracy"} <= set(report["classifier"])
    assert {"kind", "threshold", "target_fpr", "clean_fpr"} <= set(report["detector"])
    assert list(report["attacks"]) == ["fgsm", "pgd"]
    for row in report["attacks"].values():
        assert {"eps", "success_rate", "auroc", "tpr"} <= set(row)
        for key in ("eps", "success_rate", "auroc", "tpr"):
            assert isinstance(row[key], float), (key, row[key])


def test_report_numbers_match_hand_computation(recorded_report, digits, digits_classifier, corner):
    report, recorded = recorded_report
    x, y = digits.x_test, digits.y_test
    predicted = np.argmax(digits_classifier.predict(x, verbose=0), axis=-1)
    assert report["classifier"]["clean_accuracy"] == pytest.approx(np.mean(predicted == y))
    assert report["classifier"]["fingerprint"] == model_fingerprint(digits_classifier)
    assert report["n"] == len(x)

    clean = corner.score(x)
    threshold = corner.threshold
    det = report["detector"]
    assert det["kind"] == "corner-test"
    assert det["threshold"] == threshold
    assert det["target_fpr"] == 0.1
    assert det["calibration_fpr"] == corner.calibration.fpr
    assert det["calibrated_on"] == "held-out sources"  # what a detector without --calibrate-on reports
    assert det["clean_fpr"] == pytest.approx(np.mean(clean > threshold))
    assert 0.0 < det["clean_fpr"] < 0.3  # calibrated on train, so near the target on test

    assert [(name, eps) for name, eps, _ in recorded] == [("fgsm", 0.1), ("pgd", 0.1)]
    for name, eps, result in recorded:
        row = report["attacks"][name]
        success = result.success
        assert 0.05 < success.mean() < 0.95, (name, success.mean())  # a mix, so the mask matters
        turned = success & (predicted == y)  # the positives: successes from images the classifier got right
        assert 0 < turned.sum() < success.sum(), name  # the classifier errs on some, so that mask matters too
        adversarial = corner.score(result.x_adv)
        labels = np.r_[np.zeros(len(clean)), np.ones(turned.sum())]
        auroc = roc_auc_score(labels, np.r_[clean, adversarial[turned]])
        assert row["eps"] == eps
        assert row["success_rate"] == pytest.approx(success.mean())
        assert row["n_successful"] == int(success.sum()) and row["n_turned"] == int(turned.sum())
        assert row["auroc"] == pytest.approx(auroc, abs=1e-12)
        assert row["tpr"] == pytest.approx(np.mean(adversarial[turned] > threshold))
        assert row["guarded_accuracy"] == pytest.approx(np.mean((adversarial > threshold) | ~success))
        assert row["mean_linf"] == pytest.approx(result.linf.mean())
        assert row["params"]["attack"] == name


def test_only_successful_adversarials_are_positives(digits, digits_classifier, corner):
    x = digits.x_test
    report = evaluate(digits_classifier, corner, x, digits.y_test, [ScriptedAttack()], data="d", progress=False)
    row = report["attacks"]["scripted"]
    # recompute what the attack returned
    result = ScriptedAttack()(digits_classifier, x, digits.y_test)
    clean, adversarial = corner.score(x), corner.score(result.x_adv)
    success = result.success & (np.argmax(digits_classifier.predict(x, verbose=0), axis=-1) == digits.y_test)
    auroc_successful = roc_auc_score(
        np.r_[np.zeros(len(clean)), np.ones(success.sum())], np.r_[clean, adversarial[success]]
    )
    auroc_all = roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(adversarial))], np.r_[clean, adversarial])
    tpr_all = np.mean(adversarial > corner.threshold)
    assert auroc_successful == 1.0 and auroc_all < 0.9  # the case tells the two apart
    assert tpr_all < 0.9
    assert row["auroc"] == auroc_successful
    assert row["tpr"] == 1.0
    assert row["success_rate"] == 0.5
    assert row["n_successful"] == len(x) // 2
    assert row["guarded_accuracy"] == 1.0  # successes flagged; failures need no flagging


def test_same_name_different_eps_get_distinct_keys(digits, digits_classifier, corner):
    attacks = [FGSM(eps=0.05), FGSM(eps=0.3)]
    report = evaluate(digits_classifier, corner, digits.x_test, digits.y_test, attacks, data="d", progress=False, **FAST)
    assert len(report["attacks"]) == 2
    rows = list(report["attacks"].values())
    assert [row["eps"] for row in rows] == [0.05, 0.3]
    assert rows[0]["success_rate"] < rows[1]["success_rate"]
    assert list(report["attacks"]) == ["fgsm@eps=0.05", "fgsm@eps=0.3"]  # no bare "fgsm" that is secretly eps 0.05


def test_report_keys_name_the_parameters_that_differ_from_the_defaults():
    from attacks import parse_attack_spec
    from detector.evaluation import attack_keys, attack_label, display_name

    def keys(*specs):
        return attack_keys([parse_attack_spec(spec, defaults={"eps": 0.3}) for spec in specs])

    assert keys("fgsm", "pgd", "pgd:steps=40") == ["fgsm", "pgd@eps=0.3", "pgd:steps=40@eps=0.3"]
    assert keys("fgsm:eps=0.1", "fgsm:eps=0.3", "pgd:steps=40,eps=8/255") == ["fgsm@eps=0.1", "fgsm@eps=0.3", "pgd"]
    assert keys("pgd:steps=10,rel_stepsize=0.25", "pgd:rel_stepsize=0.1") == ["pgd@eps=0.3", "pgd:rel_stepsize=0.1@eps=0.3"]
    assert keys("fgsm", "fgsm") == ["fgsm@eps=0.3", "fgsm@eps=0.3#2"]
    labels = [attack_label(parse_attack_spec(spec, defaults={"eps": 0.3})) for spec in ("pgd:steps=40", "pgd:eps=8/255,steps=20,norm=2", "cw")]
    assert labels == ["pgd:steps=40", "pgd:norm=2,steps=20", "cw"]
    row = {"label": "pgd:steps=40", "params": {"attack": "pgd"}}
    assert display_name("pgd", row) == "pgd:steps=40" and display_name("pgd@eps=0.1", row) == "pgd:steps=40@eps=0.1"
    assert display_name("pgd:steps=40@eps=0.1", row) == "pgd:steps=40@eps=0.1"


def test_histograms_show_each_side_as_a_fraction_of_its_images():
    """10,000 clean scores beside 50 adversarial ones: raw counts made the adversarial bars invisible."""
    from detector.plots import histogram_figure

    histogram = {"edges": [0.0, 1.0, 2.0, 3.0], "clean": [9000, 1000, 0], "adversarial": [0, 10, 40]}
    report = {"curves": {"fgsm": {"histogram": histogram}}, "detector": {"threshold": 1.5}}
    axes = histogram_figure(report).axes[0]
    heights = [patch.get_data().values for patch in axes.patches]
    np.testing.assert_allclose(heights[0], [0.9, 0.1, 0.0])
    np.testing.assert_allclose(heights[1], [0.0, 0.2, 0.8])
    assert "10000 clean, 50 adversarial" in axes.get_title()


def test_every_attack_gets_its_own_row(digits, digits_classifier, corner):
    x, y = digits.x_test[:40], digits.y_test[:40]
    attacks = [PGD(eps=0.1, steps=2), PGD(eps=0.1, steps=3), PGD(eps=0.1, steps=4)]
    report = evaluate(digits_classifier, corner, x, y, attacks, data="d", progress=False, **FAST)
    assert len(report["attacks"]) == 3
    assert sorted(row["params"]["steps"] for row in report["attacks"].values()) == [2, 3, 4]


def test_evaluate_needs_a_calibrated_detector(digits, digits_classifier):
    with pytest.raises(ValueError, match="not calibrated"):
        evaluate(digits_classifier, CornerDetector(), digits.x_test, digits.y_test, [FGSM(eps=0.1)], data="d",
                 progress=False)


# --------------------------------------------------------------------------------------------
# format_table and write_report
# --------------------------------------------------------------------------------------------


def test_format_table_lists_attacks_and_accuracy(recorded_report):
    report, _ = recorded_report
    table = format_table(report)
    assert f"{report['classifier']['clean_accuracy']:.4f}" in table
    assert "digits:test" in table
    lines = table.splitlines()
    for name, row in report["attacks"].items():
        line = next(line for line in lines if line.startswith(name))
        assert f"{row['auroc']:.4f}" in line and f"{row['success_rate']:.4f}" in line
    long_key = "pgd@eps=0.0313725490196078,norm=2"  # keys may be longer than the default column: columns stay aligned
    widened = format_table(report | {"attacks": {**report["attacks"], long_key: next(iter(report["attacks"].values()))}})
    rows = [line for line in widened.splitlines() if line.split()[:1] and line.split()[0] in report["attacks"] | {long_key: 0}]
    assert len({len(line) for line in rows}) == 1 and all(line[len(long_key)] == " " for line in rows)


def test_write_report_round_trip(recorded_report, tmp_path):
    report, _ = recorded_report
    path = write_report(report, tmp_path / "out")
    assert path == tmp_path / "out" / "report.json"
    with open(path, encoding="utf-8") as stream:
        assert json.load(stream) == report
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp files left


def test_zero_successes_give_none_and_valid_json(digits, digits_classifier, corner, tmp_path):
    predicted = np.argmax(digits_classifier.predict(digits.x_test, verbose=0), axis=-1)
    correct = predicted == digits.y_test
    x, y = digits.x_test[correct], digits.y_test[correct]
    report = evaluate(digits_classifier, corner, x, y, [FGSM(eps=0.0)], data="d", progress=False)
    row = report["attacks"]["fgsm"]
    assert row["success_rate"] == 0.0 and row["n_successful"] == 0
    assert row["auroc"] is None and row["tpr"] is None
    assert "n/a" in format_table(report)
    text = write_report(report, tmp_path).read_text(encoding="utf-8")
    assert json.loads(text, parse_constant=_raise_on_constant) == report


def test_attack_without_eps_gives_valid_json(digits, digits_classifier, corner, tmp_path):
    report = evaluate(digits_classifier, corner, digits.x_test, digits.y_test, [IdentityAttack()], data="d",
                      progress=False)
    row = report["attacks"]["identity"]
    assert row["eps"] is None
    text = write_report(report, tmp_path).read_text(encoding="utf-8")
    json.loads(text, parse_constant=_raise_on_constant)


def test_the_classifiers_own_errors_are_no_detection_positives(digits, digits_classifier, corner):
    """An attack that changes nothing 'succeeds' on exactly the images the classifier already gets
    wrong, as a minimal attack (CW, DeepFool) does: it turned none, so it has no detection figures,
    and its guarded accuracy is the guarded clean accuracy."""
    report = evaluate(digits_classifier, corner, digits.x_test, digits.y_test, [IdentityAttack()], data="d",
                      progress=False)
    row = report["attacks"]["identity"]
    assert row["n_successful"] > 0 and row["n_turned"] == 0  # the classifier errs on a few images
    assert row["auroc"] is None and row["tpr"] is None
    assert row["auroc_all"] is not None
    assert row["guarded_accuracy"] == pytest.approx(report["detector"]["guarded_clean_accuracy"])


# --------------------------------------------------------------------------------------------
# The real detector
# --------------------------------------------------------------------------------------------


def test_real_detector_detects_fgsm_and_pgd(digits, digits_classifier, digits_detector):
    attacks = [FGSM(eps=EPS), PGD(eps=EPS)]
    report = evaluate(
        digits_classifier, digits_detector, digits.x_test, digits.y_test, attacks, data="digits", progress=False, **FAST
    )
    assert report["detector"]["kind"] == "input"
    assert report["classifier"]["clean_accuracy"] > 0.85
    assert report["detector"]["clean_fpr"] < 0.15
    for name in ("fgsm", "pgd"):
        row = report["attacks"][name]
        assert row["eps"] == EPS
        assert row["success_rate"] > 0.5, name
        assert row["auroc"] > 0.95, (name, row["auroc"])
        assert row["tpr"] > 0.8, (name, row["tpr"])
        assert math.isfinite(row["guarded_accuracy"]) and row["guarded_accuracy"] > 0.8


# --------------------------------------------------------------------------------------------
# Metrics against hand-computed cases
# --------------------------------------------------------------------------------------------

NEGATIVES = np.arange(100, dtype=np.float64)  # 0, 1, ..., 99
POSITIVES = np.array([99.5, 98.5, 97.5, 50.0, 10.0])


def test_auroc_by_hand():
    # of the 100 negatives, the positives beat 100, 99, 98, 50 and 10, and tie (half a win) with 50 and 10
    assert metrics.auroc(NEGATIVES, POSITIVES) == pytest.approx((100 + 99 + 98 + 50.5 + 10.5) / 500)
    assert metrics.auroc(np.ones(4), np.array([1.0, 2.0])) == pytest.approx(0.75)  # a tie counts half
    assert metrics.auroc(NEGATIVES, np.empty(0)) is None


def test_tpr_at_fpr_by_hand():
    # 1% FPR: the lowest threshold flagging at most 1 of 100 negatives is 98 (only 99 above it)
    assert metrics.tpr_at_fpr(NEGATIVES, POSITIVES, 0.01) == pytest.approx(2 / 5)
    # 5% FPR: threshold 94 (95..99 above it); 99.5, 98.5, 97.5 are above it
    assert metrics.tpr_at_fpr(NEGATIVES, POSITIVES, 0.05) == pytest.approx(3 / 5)
    assert metrics.tpr_at_fpr(NEGATIVES, np.array([np.nan]), 0.01) == 1.0  # NaN fails closed
    row = metrics.detection(NEGATIVES, POSITIVES, threshold=97.0, suffix="_all")
    assert row == {"auroc_all": pytest.approx(0.716), "tpr_all": pytest.approx(0.6),
                   "tpr_at_1pct_fpr_all": pytest.approx(0.4), "tpr_at_5pct_fpr_all": pytest.approx(0.6)}


def test_guarded_accuracy_and_json_by_hand():
    rejected = np.array([True, False, False, True])
    misclassified = np.array([True, True, False, False])
    assert metrics.guarded_accuracy(rejected, misclassified) == 0.75  # only the 2nd input gets through
    assert metrics.jsonable({"a": (1, np.float32(0.5)), "b": np.nan, "c": np.array([True]), 3: np.int64(2)}) == \
        {"a": [1, 0.5], "b": None, "c": [True], "3": 2}


def test_targeted_guarded_accuracy_counts_misclassification_not_the_target(digits, digits_classifier):
    never = CornerDetector()
    never.calibration = Calibration(threshold=1e9, target_fpr=0.05, fpr=0.0, fpr_interval=(0.0, 0.1), n_clean=100)
    x, y = digits.x_test[:150], digits.y_test[:150]
    attack = PGD(eps=0.15, steps=5)
    report = evaluate(digits_classifier, never, x, y, [attack], data="d", targets="random", progress=False, **FAST)
    result = attack(digits_classifier, x, y, targets="random")
    predicted = np.argmax(digits_classifier.predict(result.x_adv, verbose=0), axis=-1)
    assert np.any((predicted != y) & ~result.success)  # misled, but not to the target: the case that matters
    row = report["attacks"]["pgd"]
    assert row["targeted"] is True and row["tpr"] == 0.0
    assert row["success_rate"] == pytest.approx(result.success.mean())
    assert row["guarded_accuracy"] == pytest.approx(np.mean(predicted == y))
    assert row["misclassification_rate"] == pytest.approx(np.mean(predicted != y))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForbiddenAttack(Attack):
    name = "forbidden"

    def _batch(self, forward, x, y, noise, targeted):  # pragma: no cover
        raise AssertionError("not used")

    def __call__(self, *args, **kwargs):
        raise AssertionError("an attack ran before the inputs were checked")


def test_a_detector_for_another_classifier_is_refused_before_any_work(digits, digits_classifier, corner):
    other = CornerDetector()
    other.calibration, other.classifier_fingerprint = corner.calibration, "0" * 64
    with pytest.raises(ValueError, match="different classifier"):
        evaluate(digits_classifier, other, digits.x_test, digits.y_test, [ForbiddenAttack()], data="d", progress=False)
