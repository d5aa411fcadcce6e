"""Calibrating on named clean images the classifier never trained on (`training.calibration_images`,
`fit_detector(calibration_images=)`, `train-detector` / `retrain --calibrate-on`)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from training.calibration_images import CalibrationImages


@pytest.mark.parametrize("text, parsed", [
    ("digits:test:0:200", ("digits", "test", 0, 200)),
    ("digits:train:1200:", ("digits", "train", 1200, None)),
    ("/data/with:colon/mnist.npz:test:1000:3000", ("/data/with:colon/mnist.npz", "test", 1000, 3000)),
])
def test_the_spec_names_a_split_and_a_range(text, parsed):
    images = CalibrationImages.parse(text)
    assert (images.data, images.split, images.start, images.stop) == parsed
    assert str(images) == text


@pytest.mark.parametrize("text, message", [
    ("digits:test", "expected DATA:SPLIT:START:STOP"),
    (":test:0:10", "expected DATA:SPLIT:START:STOP"),
    ("digits:valid:0:10", "must be one of"),
    ("digits:test:a:10", "must be image indices"),
    ("digits:test:-5:10", "must be image indices"),
    ("digits:test:10:10", "greater than START"),
])
def test_a_bad_spec_is_refused_with_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        CalibrationImages.parse(text)


def test_the_images_are_that_range_of_the_split_and_no_shorter(digits):
    np.testing.assert_array_equal(CalibrationImages.parse("digits:train:1200:").load(), digits.x_train[1200:])
    np.testing.assert_array_equal(CalibrationImages.parse("digits:test:10:30").load(), digits.x_test[10:30])
    with pytest.raises(ValueError, match=f"has {len(digits.x_test)} images"):
        CalibrationImages.parse("digits:test:300:400").load()


def test_overlap_with_the_evaluated_test_images_is_found(tmp_path, monkeypatch):
    images = CalibrationImages.parse("digits:test:180:")
    assert not images.overlaps("digits", "test", 180) and images.overlaps("digits", "test", 181)
    assert not images.overlaps("digits", "train", 1000) and not images.overlaps("mnist", "test", 1000)
    (tmp_path / "data.npz").touch()
    monkeypatch.chdir(tmp_path)
    assert CalibrationImages.parse(f"{tmp_path}/data.npz:test:0:10").overlaps("data.npz", "test", 5)  # one file, two spellings


@pytest.fixture(scope="module")
def digits_sets(digits, digits_classifier, tmp_path_factory):
    """FGSM and PGD datasets of the first 300 digits training images."""
    from attacks import FGSM, PGD
    from attacks.dataset import ArraySource, generate_dataset, load_adversarial_dataset

    root = tmp_path_factory.mktemp("calibration_sets")
    source = ArraySource(digits.x_train[:300], digits.y_train[:300])
    for attack in (FGSM(eps=0.3), PGD(eps=0.3, steps=5)):
        generate_dataset(digits_classifier, attack, source, root / attack.name, progress=False)
    return [load_adversarial_dataset(root / name) for name in ("fgsm", "pgd")]


def test_fit_detector_sets_the_threshold_on_the_given_images(digits, digits_classifier, digits_sets):
    from detector.calibration import calibrate_threshold
    from training.detector import fit_detector

    given = digits.x_test[:200]
    fitted = {images is None: fit_detector(digits_sets, family="margin", classifier=digits_classifier, calibration_images=images,
                                           benign_augmentation=False, verbose=0)
              for images in (None, given)}
    detector = fitted[False]
    assert detector.calibration.n_clean == 200 and detector.info["n_calibration"] == 200
    assert detector.info["calibrated_on"] == "given images" and fitted[True].info["calibrated_on"] == "held-out sources"
    assert detector.threshold == pytest.approx(calibrate_threshold(detector.score(given), 0.05).threshold)
    assert detector.threshold != fitted[True].threshold  # the held-out training images give another threshold


def test_given_images_that_do_not_fit_are_refused_before_anything_is_fitted(digits_sets, monkeypatch):
    from training import detector as module

    monkeypatch.setattr(module, "make_detector", lambda *a, **k: pytest.fail("a detector was fitted"))
    with pytest.raises(ValueError, match=r"images of shape \(4, 4, 1\) do not fit the adversarial datasets' images"):
        module.fit_detector(digits_sets, calibration_images=np.zeros((50, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0.0, 1.0\]"):
        module.fit_detector(digits_sets, calibration_images=np.full((50, 8, 8, 1), 2.0, np.float32))
    sources = digits_sets[0].x_clean
    with pytest.raises(ValueError, match=r"of the 300 calibration images are source images the detector is fitted on"):
        module.fit_detector(digits_sets, calibration_images=sources)


def test_retraining_a_detector_calibrated_on_given_images_needs_them_again(digits, digits_classifier, digits_sets):
    from training.detector import fit_detector
    from training.retrain import retrain_detector

    given = digits.x_test[:200]
    detector = fit_detector(digits_sets[:1], family="margin", classifier=digits_classifier, calibration_images=given, verbose=0)
    with pytest.raises(ValueError, match="calibrated on given clean images"):
        retrain_detector(detector, digits_sets[1:], digits_sets[:1], classifier=digits_classifier, verbose=0)
    retrained, _ = retrain_detector(detector, digits_sets[1:], digits_sets[:1], classifier=digits_classifier,
                                    calibration_images=given, verbose=0)
    assert retrained.info["calibrated_on"] == "given images" and retrained.calibration.n_clean == 200


def test_the_cli_records_the_images_and_retrain_calibrates_on_them_again(quickstart_dir, tmp_path, capsys):
    from safetynet.cli import main

    datasets = [str(quickstart_dir / "datasets" / name) for name in ("fgsm", "pgd")]
    detector = tmp_path / "detector"
    assert main(["train-detector", "--adversarial", datasets[0], "--out", str(detector), "--epochs", "1",
                 "--calibrate-on", "digits:test:0:200"]) == 0
    assert "on images digits:test:0:200" in capsys.readouterr().out
    info = json.loads((detector / "manifest.json").read_text())["info"]
    assert (info["calibration_images"], info["n_calibration"], info["calibrated_on"]) == ("digits:test:0:200", 200, "given images")
    assert main(["retrain", "--detector", str(detector), "--adversarial", datasets[1], "--epochs", "1"]) == 0
    retrained = json.loads((tmp_path / "detector.v2" / "manifest.json").read_text())
    assert retrained["info"]["calibration_images"] == "digits:test:0:200"
    assert retrained["info"]["n_calibration"] == retrained["calibration"]["n_clean"] == 200
    # evaluating on the images the threshold was set on is refused before any attack runs
    model = str(quickstart_dir / "classifier.keras")
    assert main(["evaluate", "--model", model, "--detector", str(detector), "--n", "50", "--out", str(tmp_path / "eval")]) == 2
    assert "threshold was set on digits:test:0:200, which includes some of the 50 test images" in capsys.readouterr().err


def test_a_bad_calibrate_on_is_a_one_line_usage_error(capsys):
    from safetynet.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train-detector", "--adversarial", "x", "--out", "y", "--calibrate-on", "digits:valid:0:10"])
    assert exit_.value.code == 2 and "must be one of ('train', 'test')" in capsys.readouterr().err
