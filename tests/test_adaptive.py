"""Tests for the adaptive attack (attacks.adaptive), the detectors' differentiable stand-ins
(detector.differentiable) and the adaptive part of the evaluation, including the gradient-masking
flag. Small cases on digits."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from keras import ops

from attacks import APGD, FGSM, PGD
from attacks.adaptive import AdaptiveAPGD, AdaptivePGD, joint_model
from attacks.orthogonal import OrthogonalPGD, SelectivePGD
from foundation.backend import value_and_grad
from detector import Detector, EnsembleDetector, InputDetector
from detector import adaptive_evaluation
from detector.adaptive_evaluation import SUITE, AdaptiveSettings
from detector.adaptive_outcomes import judge
from detector.calibration import Calibration
from detector.differentiable import stand_in
from detector.evaluation import evaluate, format_table
from training.detector import make_detector

from doubles import SyntheticDetector

EPS = 0.3
N_TEST = 120


@pytest.fixture(scope="module")
def training_pair(digits, digits_classifier) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits.x_train[:800], digits.y_train[:800]
    adversarial = np.concatenate([a(digits_classifier, x, y).x_adv for a in (FGSM(eps=EPS), PGD(eps=EPS, steps=5))])
    return np.concatenate([x, x]), adversarial


@pytest.fixture(scope="module")
def input_detector(digits, training_pair) -> InputDetector:
    detector = InputDetector(epochs=4).fit(*training_pair, verbose=0)
    return detector.calibrate(digits.x_train[800:], 0.05)


@pytest.fixture(scope="module")
def test_images(digits) -> tuple[np.ndarray, np.ndarray]:
    return digits.x_test[:N_TEST], digits.y_test[:N_TEST]


def test_adaptive_worst_case_lowers_guarded_accuracy_of_an_input_detector(digits_classifier, input_detector, test_images):
    x, y = test_images
    settings = AdaptiveSettings(steps=10, lambdas=(1.0, 10.0), target_classes=2)
    report = evaluate(digits_classifier, input_detector, x, y, [PGD(eps=EPS, steps=10)], data="d", adaptive=settings,
                      taylor_inputs=0, progress=False)
    plain = report["attacks"]["pgd"]
    assert plain["guarded_accuracy"] > 0.9  # the detector catches PGD that does not know it
    section = report["adaptive"]
    assert section["stand_in"] == {"method": "white-box", "n_checked": 2 * N_TEST, "decision_agreement": 1.0}
    assert list(section["attacks"]) == ["adaptive_worst_case@eps=0.3"]
    row = section["attacks"]["adaptive_worst_case@eps=0.3"]
    assert row["guarded_accuracy"] < plain["guarded_accuracy"] - 0.4, row["guarded_accuracy"]
    assert row["non_adaptive_attack"] == "pgd" and row["non_adaptive_guarded_accuracy"] == plain["guarded_accuracy"]
    assert row["guarded_accuracy_drop"] == pytest.approx(plain["guarded_accuracy"] - row["guarded_accuracy"])
    assert row["worst_case_guarded_accuracy"] == row["guarded_accuracy"]
    assert row["gradient_masking_check"] is False and "note" not in row
    assert report["detector"]["gradient_masking_check"] is False
    assert row["mean_linf"] <= EPS + 1e-6
    assert "adaptive_worst_case@eps=0.3" in report["curves"]
    # the worst case per input: no better than any attack alone, each broken input won by one attack
    suite = row["suite"]
    assert list(suite) == [*SUITE, "pgd"]  # the detector-unaware attack at the same budget joins the worst case
    for name, own in suite.items():
        assert row["guarded_accuracy"] <= own["guarded_accuracy"] + 1e-12, name
        assert own["guarded_accuracy"] == pytest.approx(1.0 - own["success_rate"])
        assert own["steps"] == (20 if name == "orthogonal_pgd_warm" else 10) and own["params"]["eps"] == EPS  # warm: twice
    assert sum(own["won"] for own in suite.values()) == round(row["success_rate"] * N_TEST)
    assert row["guarded_accuracy"] == pytest.approx(1.0 - row["success_rate"])
    assert row["strongest"] == min(suite, key=lambda k: suite[k]["guarded_accuracy"])
    assert (suite["adaptive_pgd"]["restarts"], suite["apgd_ce"]["restarts"], suite["orthogonal_pgd"]["restarts"]) == (2, 2, 1)
    assert suite["apgd_dlr_targeted"]["target_classes"] <= 2
    assert row["params"] | {"suite": None} == {"attack": "adaptive_worst_case", "eps": EPS, "norm": "inf", "steps": 10,
                                                "restarts": 1, "suite": None}
    table = format_table(report)
    assert "adaptive_worst_case@eps=0.3" in table and "  orthogonal_pgd" in table and "won" in table


def test_the_suite_can_be_narrowed(digits_classifier, input_detector, test_images):
    x, y = test_images[0][:30], test_images[1][:30]
    report = evaluate(digits_classifier, input_detector, x, y, [FGSM(eps=EPS)], data="d", taylor_inputs=0, progress=False,
                      adaptive=AdaptiveSettings(steps=3, suite=("selective_pgd", "apgd_ce")))
    row = report["adaptive"]["attacks"]["adaptive_worst_case@eps=0.3"]
    assert list(row["suite"]) == ["apgd_ce", "selective_pgd", "fgsm"]  # in the suite's order, then the evaluated attacks
    assert report["adaptive"]["settings"]["suite"] == ["apgd_ce", "selective_pgd"]


@pytest.mark.parametrize("name", ["adaptive_pgd", "orthogonal_pgd", "orthogonal_pgd_warm", "selective_pgd"])
def test_more_steps_and_restarts_never_find_less(name, monkeypatch, digits_classifier, input_detector, test_images):
    """Past the base steps the suite's PGD-family attacks keep the default's step (and the warm start its
    APGD iterations), so a longer run repeats the shorter one's iterates and keeps the best of all: per
    input, a kept example that ranks no lower (broken > misclassified > neither), at equal rank with
    a score no higher. (At eps 0.1, where about half the inputs break: with the step shrinking as
    2.5 eps / steps, 2 to 11 inputs of each attack kept a higher score.)"""
    monkeypatch.setattr(adaptive_evaluation, "BASE_STEPS", 4)  # the tests' stand-in for 60
    x, y = test_images
    joint = joint_model(digits_classifier, input_detector.scoring_model(None))
    scale = float(np.std(input_detector.score(x)))

    def judged(steps: int, restarts: int) -> tuple[np.ndarray, np.ndarray]:
        settings = AdaptiveSettings(steps=steps, restarts=restarts, suite=(name,))
        attack = adaptive_evaluation.suite(PGD(eps=0.1), settings, input_detector.threshold, scale)[name]
        outcome = judge(digits_classifier, input_detector, attack(joint, x, y), y, 256)
        return outcome.misclassified.astype(int) + outcome.broken, outcome.scores

    rank, score = judged(4, 1)
    longer_rank, longer_score = judged(12, 2)
    assert (longer_rank >= rank).all()
    same = longer_rank == rank
    assert (longer_score[same] <= score[same] + 1e-5).all(), np.max(longer_score[same] - score[same])
    assert (longer_rank > rank).any() or (longer_score[same] < score[same] - 1e-5).any()  # and found more


def test_orthogonal_pgd_warm_starts_from_the_classifier_alone_example(digits_classifier, input_detector, test_images):
    """With a threshold no score reaches, success is misclassification: the warm attack keeps its first
    start, APGD-CE's example against the classifier alone, so it fools the classifier wherever that did."""
    x, y = test_images
    joint = joint_model(digits_classifier, input_detector.scoring_model(None))
    # a budget that fools the classifier on some inputs only; orthogonal steps too small to move (APGD has its own)
    common = {"eps": 0.05, "threshold": 1e9, "steps": 5, "step_size": 1e-5}
    cold = OrthogonalPGD(**common)(joint, x, y)  # compiled first: the warm attack must not reuse its graph
    warm = OrthogonalPGD(**common, start="classifier_adversarial")(joint, x, y)
    alone = APGD(eps=0.05, steps=5, random_start=False)(digits_classifier, x, y)
    fooled_alone = np.argmax(digits_classifier.predict(alone.x_adv, verbose=0), axis=-1) != y
    assert cold.success.sum() < fooled_alone.sum()  # the cold attack stays near the input
    assert warm.success[fooled_alone].all() and warm.success.sum() >= fooled_alone.sum() > 0


@pytest.mark.parametrize("loss", ["margin", "ce", "dlr"])
def test_adaptive_pgd_succeeds_only_when_misclassified_and_under_the_threshold(loss, digits_classifier, input_detector,
                                                                                test_images):
    x, y = test_images
    x_before = x.copy()
    joint = joint_model(digits_classifier, input_detector.scoring_model(None))
    attack = AdaptivePGD(eps=EPS, threshold=input_detector.threshold, score_scale=2.0, lambdas=(1.0, 10.0), steps=10,
                         loss=loss, random_start=loss == "ce")
    result = attack(joint, x, y)
    predicted = np.argmax(digits_classifier.predict(result.x_adv, verbose=0), axis=-1)
    evades = (predicted != y) & (input_detector.score(result.x_adv) <= input_detector.threshold)
    assert result.success.mean() > 0.5
    np.testing.assert_array_equal(result.success, evades)
    assert np.abs(result.x_adv - x).max() <= EPS + 1e-6 and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    np.testing.assert_array_equal(x, x_before)  # the caller's arrays are left alone
    again = attack(joint, x, y, batch_size=50)  # random starts depend on (seed, index), not on batching
    np.testing.assert_allclose(again.x_adv, result.x_adv, atol=1e-5)
    assert attack.get_params()["lambdas"] == [1.0, 10.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": float("nan")}, "threshold"),
        ({"score_scale": 0.0}, "score_scale"),
        ({"lambdas": (1.0, -1.0)}, "lambdas"),
        ({"lambdas": ()}, "lambdas"),
        ({"eps": 1.5}, "eps must lie"),
        ({"norm": "1"}, "norm must be"),
        ({"loss": "hinge"}, "loss must be"),
        ({"confidence": -1.0}, "confidence"),
    ],
)
def test_adaptive_pgd_validates_its_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptivePGD(**({"eps": EPS, "threshold": 0.0} | kwargs))


@pytest.mark.parametrize("cls", [AdaptiveAPGD, OrthogonalPGD, SelectivePGD])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": float("inf")}, "threshold"),
        ({"score_scale": -1.0}, "score_scale"),
        ({"eps": 1.5}, "eps must lie"),
        ({"norm": "1"}, "norm must be"),
        ({"loss": "hinge"}, "loss must be"),
        ({"steps": 0}, "steps must be"),
        ({"restarts": 0}, "restarts must be"),
    ],
)
def test_the_suites_attacks_validate_their_parameters(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**({"eps": EPS, "threshold": 0.0} | kwargs))


@pytest.mark.parametrize("start_steps", [0, 2.5, "120"])
def test_the_warm_starts_iterations_are_validated(start_steps):
    with pytest.raises(ValueError, match="start_steps"):
        OrthogonalPGD(eps=EPS, threshold=0.0, start="classifier_adversarial", start_steps=start_steps)


def test_apgd_on_the_joint_model_validates_its_lambdas():
    for lambdas in ((), (1.0, -0.5), (float("nan"),)):
        with pytest.raises(ValueError, match="lambdas"):
            AdaptiveAPGD(eps=EPS, threshold=0.0, lambdas=lambdas)
    with pytest.raises(ValueError, match="loss must be"):
        AdaptiveAPGD(eps=EPS, threshold=0.0, loss="margin")  # APGD-CE and APGD-DLR only


def test_joint_model_needs_logits_from_somewhere(input_detector):
    with pytest.raises(ValueError, match="give the classifier"):
        joint_model(None, input_detector.scoring_model(None))
    with pytest.raises(ValueError, match="K >= 2"):
        AdaptivePGD(eps=EPS, threshold=0.0)(input_detector.model, np.zeros((2, 8, 8, 1), np.float32), np.zeros(2, int))


@pytest.fixture(scope="module")
def families(digits, digits_classifier, training_pair) -> dict[str, Detector]:
    clean, adversarial = training_pair
    calibration = digits.x_train[800:]
    fitted = {family: make_detector(family, digits_classifier, epochs=2, seed=0).fit(clean, adversarial, verbose=0)
              .calibrate(calibration, 0.05) for family in ("mahalanobis", "safetynet", "squeeze")}
    ensemble = EnsembleDetector([fitted["safetynet"], fitted["squeeze"]]).fit(clean[::4], adversarial[::4], verbose=0)
    return fitted | {"ensemble": ensemble.calibrate(calibration, 0.05)}


@pytest.mark.parametrize("family, method", [("mahalanobis", "white-box"), ("safetynet", "bpda"), ("squeeze", "bpda"),
                                            ("ensemble", "ensemble(bpda, bpda)")])
def test_stand_ins_reproduce_the_real_scores_and_have_gradients(family, method, families, digits_classifier, test_images):
    detector = families[family]
    x = np.concatenate([test_images[0], PGD(eps=EPS, steps=3)(digits_classifier, *test_images).x_adv])
    standin = stand_in(detector, x)
    assert standin.method == method
    approx = np.asarray(standin.model.predict(x, verbose=0), np.float64).reshape(-1)
    np.testing.assert_allclose(approx, detector.score(x), rtol=1e-3, atol=1e-3)
    _, _, grad = value_and_grad(lambda z: (ops.reshape(standin.model(z), (-1,)), z), ops.convert_to_tensor(x))
    grad = ops.convert_to_numpy(grad)
    assert np.isfinite(grad).all() and (np.abs(grad).reshape(len(x), -1).max(axis=1) > 0).mean() > 0.5


class AlwaysReject(SyntheticDetector):
    """Flags everything: no attack gets through, so the adaptive attack cannot lower guarded accuracy."""

    kind = "always-reject"

    def _score(self, x: np.ndarray) -> np.ndarray:
        return 1.0 + np.asarray(x, np.float64).reshape(len(x), -1).mean(axis=1)


def test_no_drop_under_the_adaptive_attack_is_flagged_for_gradient_masking(digits_classifier, test_images):
    detector = AlwaysReject()
    detector.calibration = Calibration(threshold=0.0, target_fpr=0.05, fpr=1.0, fpr_interval=(0.9, 1.0), n_clean=100)
    x, y = test_images[0][:40], test_images[1][:40]
    report = evaluate(digits_classifier, detector, x, y, [FGSM(eps=EPS)], data="d", taylor_inputs=0, progress=False,
                      adaptive=AdaptiveSettings(steps=3, lambdas=(1.0,), surrogate_epochs=1, max_inputs=25))
    assert report["adaptive"]["stand_in"]["method"] == "surrogate"  # a NumPy score: a trained mimic stands in
    row = report["adaptive"]["attacks"]["adaptive_worst_case@eps=0.3"]
    assert row["guarded_accuracy"] == row["non_adaptive_guarded_accuracy"] == 1.0
    assert all(own["won"] == 0 and own["guarded_accuracy"] == 1.0 for own in row["suite"].values())
    assert row["n"] == 25 and report["attacks"]["fgsm"]["n_successful"] > 25  # the first 25 inputs only
    assert row["gradient_masking_check"] is True and "masked" in row["note"]
    assert report["detector"]["gradient_masking_check"] is True


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": 0}, "adaptive steps must be an integer >= 1, got 0"),
    ({"lambdas": ()}, r"lambdas must be one or more finite numbers >= 0, got \[\]"),
    ({"lambdas": (float("inf"),)}, r"lambdas must be one or more finite numbers >= 0, got \[inf\]"),
    ({"masking_margin": 1.5}, r"masking_margin must lie in \[0, 1\), got 1.5"),
    ({"loss": "hinge"}, "the adaptive loss must be 'margin', 'ce' or 'dlr', got 'hinge'"),
    ({"max_inputs": 0}, "adaptive max_inputs must be an integer >= 1, got 0"),
    ({"restarts": 0}, "adaptive restarts must be an integer >= 1, got 0"),
    ({"target_classes": 0}, "target_classes must be an integer >= 1, got 0"),
    ({"apgd_lambdas": (-1.0,)}, r"apgd_lambdas must be one or more finite numbers >= 0, got \[-1.0\]"),
    ({"apgd_lambdas": ()}, r"apgd_lambdas must be one or more finite numbers >= 0, got \[\]"),
    ({"suite": ()}, r"the adaptive suite must be one or more of \[.*\], got \[\]$"),
    ({"suite": ("pgd",)}, r"the adaptive suite must be one or more of \[.*\], got \['pgd'\]"),
    ({"suite": ("apgd_ce", "cw")}, r"the adaptive suite must be one or more of \[.*\], got \['apgd_ce', 'cw'\]"),
])
def test_adaptive_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveSettings(**kwargs)


def test_an_interrupted_adaptive_evaluation_resumes_from_the_attacks_it_finished(monkeypatch, tmp_path, digits_classifier,
                                                                                input_detector, test_images):
    """Each finished attack is stored; rerun after an interruption, the evaluation reuses those
    (without running them) and gives the uninterrupted report; other settings run them again."""
    x, y = test_images[0][:30], test_images[1][:30]
    settings = AdaptiveSettings(steps=3, lambdas=(1.0,), target_classes=2, suite=("adaptive_pgd", "apgd_ce", "apgd_dlr_targeted"))

    def run(checkpoints, adaptive=settings):
        return evaluate(digits_classifier, input_detector, x, y, [PGD(eps=EPS, steps=3)], data="d", adaptive=adaptive,
                        taylor_inputs=0, progress=False, checkpoints=checkpoints)["adaptive"]["attacks"]

    expected = run(None)
    calls = {"pgd": 0, "apgd": 0, "stop_at": 1}
    real_pgd, real_apgd = AdaptivePGD.__call__, AdaptiveAPGD.__call__

    def counted(self, *args, **kwargs):
        calls["pgd"] += 1
        return real_pgd(self, *args, **kwargs)

    def interrupted(self, *args, **kwargs):  # APGD-CE, then the targeted attack's first and second target
        calls["apgd"] += 1
        if calls["apgd"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return real_apgd(self, *args, **kwargs)

    monkeypatch.setattr(AdaptivePGD, "__call__", counted)
    monkeypatch.setattr(AdaptiveAPGD, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    assert calls["pgd"] == 1 and [p.name for p in tmp_path.iterdir()] == ["adaptive_worst_case@eps=0.3-adaptive_pgd.npz"]
    calls |= {"apgd": 0, "stop_at": 3}  # stopped during the second target: the first one is kept
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    assert calls["pgd"] == 1  # adaptive PGD came from its checkpoint
    assert sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir()) == [
        "adaptive_pgd.npz", "apgd_ce.npz", "apgd_dlr_targeted-target1.npz"]
    calls |= {"apgd": 0, "stop_at": 0}
    assert run(tmp_path) == expected and calls == {"pgd": 1, "apgd": 1, "stop_at": 0}  # the second target alone ran
    assert len(list(tmp_path.iterdir())) == 5
    assert run(tmp_path) == expected and calls["pgd"] == 1  # every attack from its checkpoint
    run(tmp_path, dataclasses.replace(settings, steps=4))
    assert calls["pgd"] == 2  # other settings: run again
    (tmp_path / "adaptive_worst_case@eps=0.3-adaptive_pgd.npz").write_bytes(b"not a checkpoint")
    assert run(tmp_path) == expected and calls["pgd"] == 3  # an unreadable one: run again
