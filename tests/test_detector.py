"""Tests for detector: threshold calibration, the Detector interface, InputDetector, the on-disk
layout (save / load_detector) and training.detector.fit_detector.

One InputDetector is trained per module (through fit_detector, on stored FGSM and PGD
datasets of the digits training split) and shared by the tests below.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from attacks import FGSM, PGD
from attacks.dataset import AdversarialDataset, ArraySource, generate_dataset, load_adversarial_dataset
from foundation.storage import model_fingerprint
from detector import FAMILIES, Calibration, InputDetector, calibrate_threshold, load_detector
from detector.base import FORMAT_VERSION, MANIFEST
from detector.benign_shift import BENIGN_SHIFTS, shifted_fprs
from detector.calibration import CAP_CONFIDENCE, allowed_false_positives, capped_calibration, upper_bound
from detector.input_detector import MODEL_FILE
from training.detector import fit_detector, split_by_source

from doubles import NaNForDarkImages, SyntheticDetector

EPS = 0.3


# --------------------------------------------------------------------------------------------
# Small synthetic detectors: scores are fixed functions of the image, so results are exact.
# --------------------------------------------------------------------------------------------


def _content_noise(image: np.ndarray) -> float:
    """A standard normal draw seeded by the image's bytes (same image -> same value)."""
    seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(image, np.float32).tobytes()).digest()[:8], "little")
    return float(np.random.default_rng(seed).standard_normal())


class MeanPixelDetector(SyntheticDetector):
    """Mean pixel value plus content-seeded noise: continuous, deterministic, exchangeable."""

    def _score(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return np.array([float(image.mean()) + 0.05 * _content_noise(image) for image in x])


# --------------------------------------------------------------------------------------------
# calibrate_threshold on hand-computed cases
# --------------------------------------------------------------------------------------------


def test_calibrate_threshold_arange_flags_exactly_five_percent():
    scores = np.arange(100, dtype=np.float64)
    cal = calibrate_threshold(scores, 0.05)
    assert int(np.sum(scores > cal.threshold)) == 5
    assert cal.threshold == 94.0  # 95..99 are above it, 94 itself is not
    assert cal.fpr == pytest.approx(0.05)
    assert cal.target_fpr == 0.05
    assert cal.n_clean == 100
    expected = binomtest(5, 100).proportion_ci(method="exact")
    assert cal.fpr_interval == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert cal.fpr_interval[0] < 0.05 < cal.fpr_interval[1]


def test_calibrate_threshold_ignores_input_order():
    scores = np.arange(100, dtype=np.float64)
    shuffled = np.random.default_rng(3).permutation(scores)
    assert calibrate_threshold(shuffled, 0.1) == calibrate_threshold(scores, 0.1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.01, 0.05, 0.1, 0.25])
def test_calibrate_threshold_is_the_smallest_threshold_within_target(seed, target):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=int(rng.integers(20, 400))), 1)  # rounding makes ties
    cal = calibrate_threshold(scores, target)
    flagged = int(np.sum(scores > cal.threshold))
    assert flagged <= math.floor(target * len(scores))  # never more than the target
    assert cal.fpr == flagged / len(scores)
    # any smaller threshold also flags the scores equal to this one, which would exceed the target
    assert int(np.sum(scores >= cal.threshold)) > math.floor(target * len(scores))


def test_calibrate_threshold_ties_are_never_split():
    # 10 tied top scores, 5% allowed: flagging any of them flags all 10 (10%), so none is flagged
    scores = np.array([0.0] * 90 + [1.0] * 10)
    cal = calibrate_threshold(scores, 0.05)
    assert cal.threshold == 1.0
    assert cal.fpr == 0.0
    assert int(np.sum(scores > cal.threshold)) == 0
    assert cal.fpr_interval[0] == 0.0
    assert cal.fpr_interval[1] == pytest.approx(binomtest(0, 100).proportion_ci(method="exact").high)
    # exactly 5 tied top scores fit the 5% budget
    scores = np.array([0.0] * 95 + [1.0] * 5)
    cal = calibrate_threshold(scores, 0.05)
    assert cal.threshold == 0.0 and cal.fpr == 0.05
    # all scores tied: nothing can be flagged
    cal = calibrate_threshold(np.full(50, 3.0), 0.5)
    assert cal.threshold == 3.0 and cal.fpr == 0.0


def test_calibrate_threshold_too_few_scores_flags_nothing():
    scores = np.arange(10, dtype=np.float64)
    cal = calibrate_threshold(scores, 0.05)  # 5% of 10 is 0.5 -> no image may be flagged
    assert cal.threshold == 9.0 and cal.fpr == 0.0


def test_calibrate_threshold_budget_is_exact_for_decimal_targets():
    scores = np.arange(100, dtype=np.float64)
    cal = calibrate_threshold(scores, 0.29)
    assert int(np.sum(scores > cal.threshold)) == 29
    assert cal.fpr == pytest.approx(0.29)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_calibrate_threshold_rejects_target_outside_unit_interval(target):
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate_threshold(np.arange(100.0), target)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_calibrate_threshold_rejects_non_finite_scores(bad):
    scores = np.arange(100.0)
    scores[17] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        calibrate_threshold(scores, 0.05)


@pytest.mark.parametrize("scores", [np.array([]), np.zeros((10, 2))], ids=["empty", "2-D"])
def test_calibrate_threshold_rejects_empty_or_not_1d(scores):
    with pytest.raises(ValueError, match="non-empty 1-D"):
        calibrate_threshold(scores, 0.05)


def test_calibration_json_round_trip():
    cal = calibrate_threshold(np.arange(200.0), 0.05)
    again = Calibration.from_json(json.loads(json.dumps(cal.to_json())))
    assert again == cal
    assert isinstance(again.fpr_interval, tuple)
    # a plain calibration's record has exactly the keys it always had
    assert set(cal.to_json()) == {"threshold", "target_fpr", "fpr", "fpr_interval", "n_clean"}


def test_capped_calibration_takes_the_largest_threshold_and_says_which_cap_bound():
    clean = np.arange(100.0)  # 5% alone: 94
    shifted = {"mild": np.arange(100.0) + 1.0, "hard": np.arange(100.0) + 20.0}  # 10% alone: 90 and 109
    cal = capped_calibration(clean, shifted, 0.05, 0.10, confidence=None)  # each cap on these scores only
    assert cal.threshold == 109.0 and cal.bound_by == "hard"
    assert cal.nominal_threshold == 94.0 and cal.shifted_fpr == 0.10 and cal.shifted_confidence is None
    assert {name: {k: v for k, v in c.items() if k != "fpr_upper"} for name, c in cal.shifted.items()} == {
        "mild": {"threshold": 90.0, "fpr": 0.0, "n": 100}, "hard": {"threshold": 109.0, "fpr": 0.10, "n": 100}}
    assert cal.shifted["hard"]["fpr_upper"] == pytest.approx(upper_bound(10, 100, 0.95)) and cal.warnings() == []
    assert cal.fpr == 0.0 and cal.n_clean == 100 and cal.target_fpr == 0.05
    # the smallest threshold within every cap: a hair lower flags 11% of "hard"
    assert np.mean(shifted["hard"] > np.nextafter(cal.threshold, -np.inf)) == 0.11
    assert Calibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal
    # corruptions the detector already takes in its stride leave the nominal threshold
    mild = capped_calibration(clean, {"mild": shifted["mild"]}, 0.05, 0.10, confidence=None)
    assert mild.threshold == 94.0 and mild.bound_by == "nominal" and mild.fpr == 0.05


def test_a_cap_holds_with_its_confidence_where_the_sample_rate_does_not():
    """Uniform scores, so a threshold t flags 1 - t of new images: over 400 calibrations on 300 images,
    the default cap at 10% is exceeded on new images in at most about 5% of them (95% confidence);
    set at the sample's own rate it is exceeded about half the time."""
    rng = np.random.default_rng(0)
    clean = np.zeros(300)  # the nominal target never binds
    exceeded = {"confidence": 0, "sample": 0}
    for _ in range(400):
        noisy = {"noise": rng.random(300)}
        exceeded["confidence"] += 1 - capped_calibration(clean, noisy, 0.05, 0.10).threshold > 0.10
        exceeded["sample"] += 1 - capped_calibration(clean, noisy, 0.05, 0.10, confidence=None).threshold > 0.10
    assert exceeded["confidence"] <= 32 and exceeded["sample"] >= 150, exceeded


def test_the_confidence_cap_flags_the_most_its_upper_bound_allows():
    scores = {"noise": np.arange(1000.0)}
    cal = capped_calibration(np.zeros(1000), scores, 0.05, 0.10)
    assert cal.shifted_confidence == CAP_CONFIDENCE == 0.95 and cal.bound_by == "noise"
    flagged_count = int(np.sum(scores["noise"] > cal.threshold))
    assert flagged_count == allowed_false_positives(1000, 0.10, 0.95) == 84  # 8.4%, the bound 9.98%
    assert upper_bound(84, 1000, 0.95) <= 0.10 < upper_bound(85, 1000, 0.95)
    assert cal.shifted["noise"]["fpr_upper"] == pytest.approx(upper_bound(84, 1000, 0.95))
    assert Calibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal


def test_too_few_calibration_images_to_bound_a_cap_flag_none_and_say_so():
    cal = capped_calibration(np.zeros(20), {"jpeg": np.arange(20.0)}, 0.05, 0.10)
    assert cal.threshold == 19.0 and cal.shifted["jpeg"]["fpr"] == 0.0  # flags none of them
    assert cal.shifted["jpeg"]["fpr_upper"] > 0.10  # 20 images cannot show 10% at 95%: 29 can
    assert allowed_false_positives(29, 0.10, 0.95) == 0 and upper_bound(0, 29, 0.95) <= 0.10
    [warning] = cal.warnings()
    assert "20 calibration images" in warning and "jpeg" in warning and "above the cap 0.1" in warning


def test_capped_calibration_rejects_a_bad_cap_or_no_corruption():
    with pytest.raises(ValueError, match="shifted_fpr"):
        capped_calibration(np.arange(100.0), {"a": np.arange(100.0)}, 0.05, 1.0)
    with pytest.raises(ValueError, match="at least one benign corruption"):
        capped_calibration(np.arange(100.0), {}, 0.05, 0.10)
    with pytest.raises(ValueError, match="confidence"):
        capped_calibration(np.arange(100.0), {"a": np.arange(100.0)}, 0.05, 0.10, confidence=1.0)


# --------------------------------------------------------------------------------------------
# Detector interface with synthetic detectors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2])
def test_calibrated_fpr_holds_on_fresh_clean_data(digits, target):
    """Calibrated on the training images, the detector flags about `target` of the (never seen)
    test images: the target lies inside the exact 99% interval of the observed test rate."""
    detector = MeanPixelDetector().calibrate(digits.x_train, target)
    assert detector.calibration.n_clean == len(digits.x_train)
    assert detector.calibration.fpr <= target
    flagged = detector.predict(digits.x_test)
    assert flagged.dtype == bool and flagged.shape == (len(digits.x_test),)
    k, n = int(flagged.sum()), len(flagged)
    interval = binomtest(k, n).proportion_ci(confidence_level=0.99, method="exact")
    assert interval.low <= target <= interval.high, (k, n, target)


def _dark_cutoff(digits) -> float:
    """The 20th percentile of the training images' mean pixel value."""
    return float(np.quantile(digits.x_train.reshape(len(digits.x_train), -1).mean(axis=1), 0.2))


def test_predict_matches_threshold_and_fails_closed_on_nan(digits):
    cutoff = _dark_cutoff(digits)
    detector = NaNForDarkImages(cutoff=cutoff)
    finite = digits.x_train[digits.x_train.reshape(len(digits.x_train), -1).mean(axis=1) >= cutoff]
    detector.calibrate(finite, 0.1)
    x = digits.x_test
    scores = detector.score(x)
    nan = np.isnan(scores)
    assert nan.sum() > 20 and (~nan).sum() > 20  # the case is meaningful
    flagged = detector.predict(x)
    assert flagged[nan].all()  # a detector failure is a rejection
    np.testing.assert_array_equal(flagged[~nan], scores[~nan] > detector.threshold)


def test_calibrate_refuses_nan_scores(digits):
    detector = NaNForDarkImages(cutoff=_dark_cutoff(digits))
    with pytest.raises(ValueError, match="NaN"):
        detector.calibrate(digits.x_train, 0.05)
    assert detector.calibration is None


def test_threshold_and_predict_need_calibration(digits):
    for detector in (MeanPixelDetector(), InputDetector()):
        with pytest.raises(ValueError, match="not calibrated"):
            detector.threshold
    with pytest.raises(ValueError, match="not calibrated"):
        MeanPixelDetector().predict(digits.x_test[:4])


def test_families_registry():
    assert FAMILIES["input"] is InputDetector


# --------------------------------------------------------------------------------------------
# fit_detector and the real InputDetector (trained once for the module)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(digits, digits_classifier, tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial")
    loaded = []
    for attack in (FGSM(eps=EPS), PGD(eps=EPS)):
        generate_dataset(
            digits_classifier, attack, ArraySource(digits.x_train, digits.y_train), root / attack.name,
            source_info={"data": "digits", "split": "train"}, progress=False,
        )
        loaded.append(load_adversarial_dataset(root / attack.name))
    return loaded


@pytest.fixture(scope="module")
def fitted(datasets):
    """fit_detector on both datasets, spying on what reached fit and calibrate."""
    captured: dict[str, np.ndarray] = {}
    original_fit, original_calibrate = InputDetector.fit, InputDetector.calibrate

    def spy_fit(self, x_clean, x_adversarial, **kwargs):
        captured["fit_clean"], captured["fit_adversarial"] = np.array(x_clean), np.array(x_adversarial)
        return original_fit(self, x_clean, x_adversarial, **kwargs)

    def spy_calibrate(self, clean_x, target_fpr=0.05, **kwargs):
        captured["calibration"] = np.array(clean_x)
        captured["shifted"] = kwargs.get("shifted")
        return original_calibrate(self, clean_x, target_fpr, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InputDetector, "fit", spy_fit)
        patch.setattr(InputDetector, "calibrate", spy_calibrate)
        detector = fit_detector(datasets, target_fpr=0.05, calibration_fraction=0.2, epochs=4, verbose=0)
    return detector, captured


@pytest.fixture(scope="module")
def detector(fitted) -> InputDetector:
    return fitted[0]


@pytest.fixture(scope="module")
def test_adversarials(digits, digits_classifier):
    return {
        attack.name: attack(digits_classifier, digits.x_test, digits.y_test)
        for attack in (FGSM(eps=EPS), PGD(eps=EPS))
    }


def _rows(x: np.ndarray) -> list[bytes]:
    return [np.ascontiguousarray(row, np.float32).tobytes() for row in x]


def test_input_detector_separates_held_out_adversarials(detector, digits, test_adversarials):
    clean = detector.score(digits.x_test)
    assert clean.dtype == np.float64 and clean.shape == (len(digits.x_test),)
    for name, result in test_adversarials.items():
        assert result.success.mean() > 0.5, name
        adversarial = detector.score(result.x_adv[result.success])
        labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        auroc = roc_auc_score(labels, np.r_[clean, adversarial])
        assert auroc > 0.95, (name, auroc)
        assert detector.predict(result.x_adv[result.success]).mean() > 0.8, name


def test_fit_detector_holds_out_calibration_images(fitted, datasets, digits_classifier):
    detector, captured = fitted
    sources = set(np.concatenate([d.index for d in datasets]).tolist())
    info = detector.info
    n_held_out = round(0.2 * len(sources))
    # benign augmentation (the default): each clean fitting image also comes corrupted; the
    # calibration images come pristine and, apart, under each benign corruption
    assert info["benign_augmentation"] is True
    assert info["n_calibration"] == n_held_out
    assert info["n_fit_clean"] == 2 * (len(sources) - n_held_out)
    assert detector.calibration.n_clean == info["n_calibration"]
    assert detector.calibration.target_fpr == 0.05
    assert len(captured["calibration"]) == info["n_calibration"]
    assert len(captured["fit_clean"]) == info["n_fit_clean"]
    assert len(captured["fit_adversarial"]) == info["n_fit_adversarial"] == info["n_fit_clean"]

    # map images back to their source index (digits has no duplicate images); the fitting originals
    # come first, then one corrupted copy of each, which is no clean image of any source
    clean_source = {row: int(i) for d in datasets for row, i in zip(_rows(d.x_clean), d.index)}
    adversarial_source = {row: int(i) for d in datasets for row, i in zip(_rows(d.x_adv), d.index)}
    originals, copies = np.split(captured["fit_clean"], 2)
    for changed in [copies, *captured["shifted"].values()]:
        assert not set(_rows(changed)) & set(clean_source)
    pairs = {"fit copies": (originals, copies)} | {name: (captured["calibration"], x) for name, x in captured["shifted"].items()}
    for name, (original, changed) in pairs.items():
        change = np.abs(changed - original).reshape(len(changed), -1).mean(axis=1)
        assert (change > 0).all(), name  # each copy is its own image, corrupted
        if not name.startswith("shift"):  # a 1-2 px shift of an 8x8 digit moves as much ink as another digit
            assert change.mean() < 0.2, name  # ... a little, and in order
    held_out = {clean_source[row] for row in _rows(captured["calibration"])}
    fit_clean = {clean_source[row] for row in _rows(np.split(captured["fit_clean"], 2)[0])}
    fit_adversarial = {adversarial_source[row] for row in _rows(captured["fit_adversarial"])}
    assert len(held_out) == n_held_out
    assert held_out.isdisjoint(fit_clean)
    assert held_out.isdisjoint(fit_adversarial)  # no adversarial version of a calibration image
    assert held_out | fit_clean == sources

    # the achieved FPR is the held-out clean images'
    scores = detector.score(captured["calibration"])
    assert np.mean(scores > detector.threshold) == pytest.approx(detector.calibration.fpr)
    assert detector.calibration.fpr <= 0.05

    assert detector.classifier_fingerprint == model_fingerprint(digits_classifier)
    assert [entry["attack"]["attack"] for entry in info["trained_on"]] == ["fgsm", "pgd"]
    assert [entry["count"] for entry in info["trained_on"]] == [len(d.index) for d in datasets]


def test_threshold_caps_each_corruption_and_is_the_smallest_that_does(fitted):
    """On the calibration data itself: at most 5% of the pristine held-out images and at most 10% of
    them under each benign corruption are flagged, and a hair lower threshold breaks the cap that
    `bound_by` names."""
    detector, captured = fitted
    calibration = detector.calibration
    assert set(captured["shifted"]) == set(BENIGN_SHIFTS) and calibration.shifted_fpr == 0.10
    groups = {"nominal": (detector.score(captured["calibration"]), 0.05)}
    groups |= {name: (detector.score(x), 0.10) for name, x in captured["shifted"].items()}
    lower = np.nextafter(calibration.threshold, -np.inf)
    broken = []
    for name, (scores, cap) in groups.items():
        assert len(scores) == detector.info["n_calibration"]
        allowed = allowed_false_positives(len(scores), cap, None if name == "nominal" else CAP_CONFIDENCE)
        assert int(np.sum(scores > calibration.threshold)) <= allowed, name
        if int(np.sum(scores > lower)) > allowed:
            broken.append(name)
        if name != "nominal":
            assert calibration.shifted[name]["fpr"] == np.mean(scores > calibration.threshold)
            assert calibration.shifted[name]["n"] == len(scores)
            assert calibration.shifted[name]["fpr_upper"] <= cap  # the cap holds with 95% confidence
    assert calibration.shifted_confidence == CAP_CONFIDENCE
    assert calibration.bound_by in broken, (calibration.bound_by, broken)
    own = {"nominal": calibration.nominal_threshold} | {n: c["threshold"] for n, c in calibration.shifted.items()}
    assert calibration.threshold == own[calibration.bound_by] == max(own.values())
    assert detector.calibration.to_json()["bound_by"] == calibration.bound_by  # the manifest says why


def test_benign_augmentation_lowers_the_clean_fpr_under_shift(detector, datasets, digits):
    """Fitted and calibrated on pristine images only, the detector rejects many clean test digits moved
    by one pixel or resized; with the default augmentation far fewer, at the same target FPR."""
    plain = fit_detector(datasets, target_fpr=0.05, epochs=4, benign_augmentation=False, verbose=0)
    assert plain.info["benign_augmentation"] is False
    assert plain.info["n_calibration"] == detector.info["n_calibration"]
    # without augmentation the threshold is the plain one of the pristine held-out images, as ever
    held_out = split_by_source(datasets, 0.2, 0).x_clean_held_out
    assert plain.calibration == calibrate_threshold(plain.score(held_out), 0.05)
    assert "bound_by" not in plain.calibration.to_json()
    off, on = shifted_fprs(plain, digits.x_test), shifted_fprs(detector, digits.x_test)
    assert on["shift1"] < off["shift1"] - 0.1, (off, on)
    assert on["resize0.75"] < off["resize0.75"] - 0.3, (off, on)


def _minimal_attack_dataset(changed: np.ndarray, success: np.ndarray) -> AdversarialDataset:
    """Records 0..n-1 of random images; `changed` ones perturbed, the others returned unchanged."""
    rng = np.random.default_rng(0)
    x_clean = rng.random((len(changed), 4, 4, 1)).astype(np.float32)
    x_adv = x_clean + 0.1 * changed[:, None, None, None].astype(np.float32)
    l2 = np.linalg.norm((x_adv - x_clean).reshape(len(x_clean), -1), axis=1)
    return AdversarialDataset(manifest={"attack": {"attack": "cw"}}, x_clean=x_clean, x_adv=x_adv,
                              y=np.zeros(len(changed), np.int64), target=np.full(len(changed), -1), success=success,
                              linf=l2, l2=l2, index=np.arange(len(changed)))


def test_records_a_minimal_attack_left_unchanged_are_no_positives():
    """CW returns the images it could not fool, and those the classifier already got wrong,
    unchanged: clean images, neither fitted as adversarial nor counted in the held-out TPR."""
    changed = np.arange(200) % 3 != 0
    data = _minimal_attack_dataset(changed, success=np.arange(200) % 2 == 0)  # some unchanged ones "succeed"
    split = split_by_source([data], 0.2, 0)
    held_sources = {image.tobytes() for image in split.x_clean_held_out}
    held = np.array([image.tobytes() in held_sources for image in data.x_clean])
    np.testing.assert_array_equal(split.adversarial_fit[0], data.x_adv[~held & changed])
    np.testing.assert_array_equal(split.adversarial_held_out[0], data.x_adv[held & changed & data.success])
    assert (held & ~changed & data.success).any() and (~held & ~changed).any()  # the case tells the rules apart
    with pytest.raises(ValueError, match="no perturbed image"):
        split_by_source([_minimal_attack_dataset(np.zeros(50, bool), np.ones(50, bool))], 0.2, 0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_fit_detector_rejects_bad_calibration_fraction(datasets, fraction):
    with pytest.raises(ValueError, match="calibration_fraction"):
        fit_detector(datasets, calibration_fraction=fraction, epochs=1, verbose=0)


def test_fit_detector_rejects_empty_list():
    with pytest.raises(ValueError, match="at least one"):
        fit_detector([], epochs=1, verbose=0)


def test_fit_detector_rejects_datasets_of_different_classifiers(
    datasets, digits, digits_classifier, tmp_path
):
    other = keras.models.clone_model(digits_classifier)
    other.set_weights([w * 1.01 for w in digits_classifier.get_weights()])
    assert model_fingerprint(other) != model_fingerprint(digits_classifier)
    generate_dataset(other, FGSM(eps=EPS), ArraySource(digits.x_train[:16], digits.y_train[:16]), tmp_path / "other", progress=False)
    foreign = load_adversarial_dataset(tmp_path / "other")
    with pytest.raises(ValueError, match="different classifiers"):
        fit_detector([datasets[0], foreign], epochs=1, verbose=0)


# --------------------------------------------------------------------------------------------
# InputDetector input checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 9, 9, 1), (3, 8, 8, 3), (3, 8, 8)])
def test_score_rejects_wrong_image_shape(detector, shape):
    with pytest.raises(ValueError, match="do not fit the detector's input"):
        detector.score(np.zeros(shape, np.float32))


def test_score_needs_a_trained_model():
    with pytest.raises(ValueError, match="the input detector is untrained"):
        InputDetector().score(np.zeros((2, 8, 8, 1), np.float32))


def test_fit_rejects_mismatched_shapes():
    detector = InputDetector(epochs=1)
    with pytest.raises(ValueError, match="differ in shape"):
        detector.fit(np.zeros((8, 8, 8, 1), np.float32), np.zeros((8, 9, 9, 1), np.float32), verbose=0)
    assert detector.model is None


@pytest.mark.parametrize(
    ("options", "message"),
    [({"epochs": 0}, "epochs must be an integer >= 1, got 0"), ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
     ({"validation_fraction": 0.0}, r"validation_fraction must be a number in \(0, 0.5\), got 0.0"),
     ({"validation_fraction": 0.5}, r"validation_fraction must be a number in \(0, 0.5\), got 0.5")],
)
def test_input_detector_rejects_bad_hyperparameters(options, message):
    with pytest.raises(ValueError, match=f"^InputDetector: {message}$"):
        InputDetector(**options)


# --------------------------------------------------------------------------------------------
# save / load_detector
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(detector, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("saved") / "detector"
    assert detector.save(directory) == directory
    return directory


def _copy(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def test_save_load_round_trip(detector, saved, digits):
    assert sorted(p.name for p in saved.iterdir()) == sorted([MANIFEST, MODEL_FILE])
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["kind"] == "input"
    assert manifest["hyperparameters"] == detector.get_params()

    loaded = load_detector(saved)
    assert isinstance(loaded, InputDetector)
    x = np.concatenate([digits.x_test, digits.x_train[:50]])
    np.testing.assert_array_equal(loaded.score(x), detector.score(x))
    np.testing.assert_array_equal(loaded.predict(x), detector.predict(x))
    assert loaded.calibration == detector.calibration
    assert loaded.threshold == detector.threshold
    assert loaded.classifier_fingerprint == detector.classifier_fingerprint
    assert loaded.info == detector.info
    assert loaded.get_params() == detector.get_params()


def test_save_replaces_existing_directory_atomically(detector, tmp_path):
    directory = tmp_path / "parent" / "det"
    detector.save(directory)
    (directory / "stale.txt").write_text("from an older save")
    detector.save(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([MANIFEST, MODEL_FILE])
    assert [p.name for p in directory.parent.iterdir()] == ["det"]  # no temp or .old dirs left
    assert load_detector(directory).threshold == detector.threshold


def test_failed_save_keeps_the_old_directory(detector, tmp_path):
    directory = tmp_path / "det"
    detector.save(directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(ValueError, match="the input detector is untrained"):
        InputDetector().save(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["det"]


def test_load_refuses_newer_format_version(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps(manifest | {"format_version": 999}))
    with pytest.raises(ValueError, match="999"):
        load_detector(directory)


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_detector(tmp_path / "nothing-here")


def test_load_missing_manifest(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    (directory / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_detector(directory)


def test_load_corrupt_manifest(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    (directory / MANIFEST).write_text('{"format_version": 1, "kind": "inp')
    with pytest.raises(ValueError, match="corrupt"):
        load_detector(directory)


def test_load_manifest_that_is_not_an_object(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    (directory / MANIFEST).write_text("[]")
    with pytest.raises(ValueError, match=r"detector manifest is corrupt \(.*\): expected a JSON object, got list"):
        load_detector(directory)


def test_load_missing_model_file(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    (directory / MODEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model file missing"):
        load_detector(directory)


def test_load_corrupt_model_file(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    (directory / MODEL_FILE).write_bytes(b"not a keras archive")
    with pytest.raises(ValueError, match=f"detector model .*{MODEL_FILE} is corrupt"):
        load_detector(directory)


def test_load_unknown_kind(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps(manifest | {"kind": "no-such-family"}))
    with pytest.raises(ValueError, match="unknown kind 'no-such-family'"):
        load_detector(directory)


def test_load_uncalibrated_detector_keeps_it_uncalibrated(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps(manifest | {"calibration": None}))
    loaded = load_detector(directory)
    assert loaded.calibration is None
    with pytest.raises(ValueError, match="not calibrated"):
        loaded.threshold
