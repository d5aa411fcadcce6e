"""Tests for serving.guard: guarded predictions, calibrated rejection rates, failing closed,
fingerprint checks, input validation and loading a guard from saved files."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from doubles import NaNForDarkImages
from scipy.stats import binomtest

from attacks import PGD
from detector import InputDetector
from foundation.models import save_model
from foundation.storage import model_fingerprint
from serving.guard import Guard, GuardResult

EPS = 0.3
TARGET_FPR = 0.05  # conftest's digits_detector: calibrated at this FPR on the training images after
N_FIT = 1100  # the first N_FIT, which it is fitted on


@pytest.fixture(scope="module")
def detector(digits_detector) -> InputDetector:
    return digits_detector


@pytest.fixture(scope="module")
def guard(digits_classifier, detector) -> Guard:
    return Guard(digits_classifier, detector)


@pytest.fixture(scope="module")
def clean_result(guard, digits) -> GuardResult:
    return guard.predict(digits.x_test)


def test_predict_outputs_are_consistent(clean_result, digits, digits_classifier, detector):
    result = clean_result
    n = len(digits.x_test)
    assert result.probabilities.shape == (n, digits.num_classes)
    assert result.labels.shape == result.scores.shape == result.rejected.shape == (n,)
    assert result.rejected.dtype == bool
    assert np.all(result.probabilities >= 0)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(axis=1))
    # the probabilities are the softmax of the classifier's logits
    logits = digits_classifier.predict(digits.x_test, verbose=0).astype(np.float64)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    # the same scores to float32 round-off: the guard's batches differ from the detector's, and oneDNN's
    # kernels may sum a short last batch in another order (1 ulp seen in CI)
    np.testing.assert_allclose(result.scores, detector.score(digits.x_test), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(result.rejected, result.scores > detector.threshold)
    # the classifier is good on clean data
    assert np.mean(result.labels == digits.y_test) > 0.85


def test_clean_rejection_rate_matches_calibrated_target(clean_result, detector, digits):
    """Calibrated on training images the detector never saw, the guard rejects about TARGET_FPR of
    the clean test images: the target lies inside the exact 99% interval of the observed rate."""
    assert detector.calibration.n_clean == len(digits.x_train) - N_FIT
    assert detector.calibration.fpr <= TARGET_FPR
    k, n = int(clean_result.rejected.sum()), len(clean_result.rejected)
    interval = binomtest(k, n).proportion_ci(confidence_level=0.99, method="exact")
    assert interval.low <= TARGET_FPR <= interval.high, (k, n)


def test_pgd_inputs_are_rejected(guard, digits, digits_classifier):
    result = PGD(eps=EPS)(digits_classifier, digits.x_test, digits.y_test)
    guarded = guard.predict(result.x_adv)
    assert guarded.rejected.mean() > 0.9
    assert guarded.rejected[result.success].mean() > 0.9
    # what the guard accepts after PGD is mostly still classified correctly or rare
    accepted_wrong = ~guarded.rejected & (guarded.labels != digits.y_test)
    assert accepted_wrong.mean() < 0.1


def test_guard_fails_closed_on_nan_scores(digits, digits_classifier):
    cutoff = float(np.quantile(digits.x_train.reshape(len(digits.x_train), -1).mean(axis=1), 0.2))
    nan_detector = NaNForDarkImages(cutoff)
    finite = digits.x_train[digits.x_train.reshape(len(digits.x_train), -1).mean(axis=1) >= cutoff]
    nan_detector.calibrate(finite, 0.1)
    result = Guard(digits_classifier, nan_detector).predict(digits.x_test)
    nan = np.isnan(result.scores)
    assert nan.sum() > 20 and (~nan).sum() > 20
    assert result.rejected[nan].all()
    np.testing.assert_array_equal(result.rejected[~nan], result.scores[~nan] > nan_detector.threshold)


def test_detector_for_another_classifier_is_refused(digits_classifier, detector, digits):
    foreign = copy.copy(detector)
    foreign.classifier_fingerprint = "0" * 64
    with pytest.raises(ValueError, match="different classifier"):
        Guard(digits_classifier, foreign)
    result = Guard(digits_classifier, foreign, check_fingerprint=False).predict(digits.x_test[:10])
    assert result.rejected.shape == (10,)


def test_uncalibrated_detector_is_refused(digits_classifier, detector):
    uncalibrated = copy.copy(detector)
    uncalibrated.calibration = None
    with pytest.raises(ValueError, match="not calibrated"):
        Guard(digits_classifier, uncalibrated)
    with pytest.raises(ValueError, match="not calibrated"):
        Guard(digits_classifier, uncalibrated, check_fingerprint=False)


def test_bad_batch_size_is_refused(digits_classifier, detector):
    with pytest.raises(ValueError, match="batch_size"):
        Guard(digits_classifier, detector, batch_size=0)


def _with_nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[1, 3, 3, 0] = np.nan
    return x


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda x: x[0], "4-D"),
        (lambda x: x.reshape(len(x), -1), "4-D"),
        (lambda x: (x * 16).astype(np.int64), "floating point"),
        (lambda x: x * 2.0, r"must lie in \[0.0, 1.0\]"),
        (lambda x: x - 0.5, r"must lie in \[0.0, 1.0\]"),
        (_with_nan, "NaN"),
        (lambda x: np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), "do not fit the guard's input"),
        (lambda x: np.repeat(x, 3, axis=-1), "do not fit the guard's input"),
        (lambda x: x[:0], "empty"),
    ],
    ids=["rank3", "rank2", "int", "above1", "below0", "nan", "size", "channels", "empty"],
)
def test_bad_inputs_are_refused(guard, digits, make, message):
    with pytest.raises(ValueError, match=message):
        guard.predict(make(digits.x_test[:8]))


def test_from_paths_matches_in_memory_guard(tmp_path, digits_classifier, detector, guard, clean_result, digits):
    classifier_path = save_model(digits_classifier, tmp_path / "classifier.keras")
    detector_dir = detector.save(tmp_path / "detector")
    loaded = Guard.from_paths(classifier_path, detector_dir)  # fingerprint check on by default
    assert model_fingerprint(loaded.classifier) == detector.classifier_fingerprint
    result = loaded.predict(digits.x_test)
    np.testing.assert_allclose(result.probabilities, clean_result.probabilities, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.labels, clean_result.labels)
    np.testing.assert_allclose(result.scores, clean_result.scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(result.rejected, clean_result.rejected)
    assert loaded.detector.threshold == detector.threshold


def test_from_paths_passes_options(tmp_path, digits_classifier, detector):
    classifier_path = save_model(digits_classifier, tmp_path / "classifier.keras")
    foreign = copy.copy(detector)
    foreign.classifier_fingerprint = "f" * 64
    detector_dir = foreign.save(tmp_path / "detector")
    with pytest.raises(ValueError, match="different classifier"):
        Guard.from_paths(classifier_path, detector_dir)
    loaded = Guard.from_paths(classifier_path, detector_dir, check_fingerprint=False, batch_size=7)
    assert loaded.batch_size == 7


def test_from_paths_missing_files(tmp_path, detector):
    detector_dir = detector.save(tmp_path / "detector")
    with pytest.raises(FileNotFoundError, match="classifier model not found: .*missing.keras"):
        Guard.from_paths(tmp_path / "missing.keras", detector_dir)


class RaisesOnBrightBatches(NaNForDarkImages):
    """Raises (a detector crash) on any batch holding a bright image; else the mean pixel value."""

    kind = "raise-test"

    def _score(self, x: np.ndarray) -> np.ndarray:
        means = np.asarray(x, np.float64).reshape(len(x), -1).mean(axis=1)
        if (means > self.cutoff).any():
            raise RuntimeError("detector crashed")
        return means


def test_detector_errors_flag_their_batch_and_are_counted(digits, digits_classifier):
    means = digits.x_test.reshape(len(digits.x_test), -1).mean(axis=1)
    cutoff = float(np.quantile(means, 0.95))
    crashing = RaisesOnBrightBatches(cutoff)
    crashing.calibrate(digits.x_test[means <= cutoff], 0.1)
    x = digits.x_test[np.argsort(means)]  # the brightest images last: only the final batches crash
    guard = Guard(digits_classifier, crashing, batch_size=32)
    result = guard.predict(x)
    bright = np.sort(means) > cutoff
    crashed = np.repeat([bright[i : i + 32].any() for i in range(0, len(x), 32)], 32)[: len(x)]
    assert 0 < crashed.sum() < len(x)
    assert np.isnan(result.scores[crashed]).all() and result.rejected[crashed].all()
    assert np.isfinite(result.scores[~crashed]).all()
    assert guard.stats.detector_errors == crashed.sum()
    assert guard.stats.inputs == len(x)
    assert guard.stats.rejected == int(result.rejected.sum())


def test_flag_policy_reports_but_never_rejects(digits_classifier, detector, digits):
    x_adv = PGD(eps=EPS)(digits_classifier, digits.x_test[:64], digits.y_test[:64]).x_adv
    flagging = Guard(digits_classifier, detector, policy="flag").predict(x_adv)
    rejecting = Guard(digits_classifier, detector).predict(x_adv)
    assert not flagging.rejected.any()
    assert flagging.flagged.mean() > 0.9
    np.testing.assert_array_equal(flagging.flagged, rejecting.rejected)
    with pytest.raises(ValueError, match=r"Guard: policy must be one of \['flag', 'reject'\], got 'block'"):
        Guard(digits_classifier, detector, policy="block")


def test_guard_directory_round_trip(tmp_path, digits_classifier, detector, clean_result, digits):
    Guard(digits_classifier, detector, policy="flag", name="digits", batch_size=16).save(tmp_path / "guard")
    loaded = Guard.load(tmp_path / "guard")
    assert (loaded.policy, loaded.name, loaded.batch_size) == ("flag", "digits", 16)
    result = loaded.predict(digits.x_test)
    np.testing.assert_allclose(result.scores, clean_result.scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(result.flagged, clean_result.rejected)
    assert Guard.load(tmp_path / "guard", policy="reject").policy == "reject"
    with pytest.raises(FileNotFoundError, match="guard directory not found"):
        Guard.load(tmp_path / "nowhere")


def test_guard_without_classifier_scores_only(digits, detector):
    guard = Guard(None, detector)
    result = guard.predict(digits.x_test[:20])
    assert result.probabilities is None and result.labels is None
    np.testing.assert_allclose(result.scores, detector.score(digits.x_test[:20]), rtol=1e-6, atol=1e-6)
    assert guard.input_shape == digits.x_test.shape[1:]
