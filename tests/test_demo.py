"""Tests for the epsilon demo (serving.demo_engine, serving.demo): image preparation, the attacks it
runs against the library's, the guard's verdicts, the Taylor picture, the page callbacks, the CLI, and
(with ../shared/data) the default ImageNet MobileNet and its FGSM latency."""
from __future__ import annotations

import functools
import json
import shutil
import statistics
import time

import cv2
import keras
import numpy as np
import pytest
from matplotlib.figure import Figure

from attacks import FGSM, PGD
from detector import InputDetector
from detector.metrics import fgsm_taylor
from foundation.images import read_image
from foundation.models import load_model
from foundation.storage import model_fingerprint
from safetynet.cli import main
from serving import Guard
from serving.demo import (
    UNTARGETED,
    DemoPage,
    display_image,
    example_images,
    taylor_figure,
)
from serving.demo_engine import DemoEngine, fit_image
from serving.demo_model import IMAGENET_INDEX, IMAGENET_WEIGHTS, imagenet_class_names, imagenet_mobilenet
from training.data import load_dataset

LARGE_EPS = 0.45  # FGSM at this eps on 8x8 digits: the small detector below rejects it


@functools.cache
def small_guard() -> Guard:
    """A guard for 8x8 digits that trains in seconds: a small CNN classifier and an
    InputDetector(epochs=1) fitted on FGSM images and calibrated on a few clean ones. Built once per
    session (the browser test uses it too)."""
    digits = load_dataset("digits")
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([
        keras.Input(digits.input_shape), keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(digits.num_classes),
    ])
    classifier.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(digits.x_train, digits.y_train, epochs=15, batch_size=64, verbose=0)
    x, y = digits.x_train[:400], digits.y_train[:400]
    adversarial = np.concatenate([FGSM(eps=eps)(classifier, x, y).x_adv for eps in (0.3, 0.5)])
    detector = InputDetector(epochs=1).fit(np.concatenate([x, x]), adversarial, verbose=0)
    detector.calibrate(digits.x_test[:100], 0.05)
    detector.classifier_fingerprint = model_fingerprint(classifier)
    return Guard(classifier, detector)


def demo_image(engine: DemoEngine, digits) -> np.ndarray:
    """The first test digit the guard accepts clean and rejects after FGSM at LARGE_EPS."""
    for image in digits.x_test[100:]:
        result = engine.update(image, "FGSM", LARGE_EPS)
        if result.before.verdict == "accepted" and result.after.verdict == "rejected":
            return image
    raise AssertionError("no test digit is accepted clean and rejected at LARGE_EPS: the small guard is too weak")


@pytest.fixture(scope="module")
def guard() -> Guard:
    return small_guard()


@pytest.fixture(scope="module")
def engine(guard) -> DemoEngine:
    return DemoEngine(guard.classifier, guard=guard)


@pytest.fixture(scope="module")
def image(engine, digits) -> np.ndarray:
    return demo_image(engine, digits)


def test_fit_image_center_crops_resizes_and_converts_to_gray():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = (255, 0, 0)  # the central square is red, the sides black
    fitted = fit_image(image, (8, 8, 3))
    assert fitted.shape == (8, 8, 3) and fitted.dtype == np.float32
    np.testing.assert_allclose(fitted[..., 0], 1.0)
    np.testing.assert_allclose(fitted[..., 1:], 0.0)
    gray = fit_image(np.full((4, 4, 3), 255, np.uint8), (16, 16, 1))  # upscaled too
    assert gray.shape == (16, 16, 1)
    np.testing.assert_allclose(gray, 1.0)


def test_demo_images_read_gray_16_bit_and_alpha_as_rgb_and_refuse_other_files(tmp_path):
    cv2.imwrite(str(tmp_path / "gray16.png"), np.full((5, 7), 65535, np.uint16))
    cv2.imwrite(str(tmp_path / "alpha.png"), np.dstack([np.zeros((5, 7, 3), np.uint8), np.full((5, 7), 9, np.uint8)]))
    for name in ("gray16.png", "alpha.png"):
        decoded = read_image(tmp_path / name, 3)  # as DemoEngine.prepare reads
        assert decoded.shape == (5, 7, 3) and decoded.dtype == np.uint8
    assert read_image(tmp_path / "gray16.png", 3).min() == 255
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot decode image file .*notes\.txt"):
        read_image(tmp_path / "notes.txt", 3)
    assert example_images(tmp_path) == [str(tmp_path / "alpha.png"), str(tmp_path / "gray16.png")]
    assert example_images(tmp_path / "absent") == []


def test_attacks_give_the_library_attacks_images(engine, image):
    label = engine.update(image, "FGSM", 0.0).before.top5[0][0]
    y = np.array([engine.class_names.index(label)])
    for name, attack in (("FGSM", FGSM(eps=0.2)), ("PGD", PGD(eps=0.2, steps=10))):
        expected = attack(engine.classifier, image[None], y).x_adv[0]
        np.testing.assert_allclose(engine.update(image, name, 0.2).adversarial, expected, atol=1e-6)
    targeted = FGSM(eps=0.2)(engine.classifier, image[None], y, targets=np.array([(y[0] + 1) % 10])).x_adv[0]
    np.testing.assert_allclose(engine.update(image, "FGSM", 0.2, target=int((y[0] + 1) % 10)).adversarial, targeted, atol=1e-6)


def test_update_shows_images_norms_top5_and_the_verdict_change(engine, image):
    clean = engine.update(image, "FGSM", 0.0)
    np.testing.assert_array_equal(clean.adversarial, image)
    assert clean.linf == 0 and clean.after == clean.before
    np.testing.assert_allclose(clean.perturbation, 0.5)  # no perturbation: mid-gray
    assert clean.before.verdict == "accepted" and clean.before.score <= engine.guard.detector.threshold
    result = engine.update(image, "FGSM", LARGE_EPS)
    assert result.linf == pytest.approx(LARGE_EPS, abs=1e-6)
    assert result.after.verdict == "rejected" and result.after.score > engine.guard.detector.threshold
    assert result.perturbation.min() >= 0 and result.perturbation.max() <= 1
    assert np.abs(result.perturbation - 0.5).max() == pytest.approx(0.5, abs=1e-6)  # amplified to full range
    for prediction in (result.before, result.after):
        assert len(prediction.top5) == 5
        probabilities = [p for _, p in prediction.top5]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_a_targeted_attack_raises_the_target_probability(engine, image):
    before = dict(engine.update(image, "PGD", 0.0, target=3).before.top5)
    after = dict(engine.update(image, "PGD", 0.3, target=3).after.top5)
    assert after.get("3", 0.0) > before.get("3", 0.0)


def test_without_a_detector_the_verdict_says_so(guard, image):
    result = DemoEngine(guard.classifier).update(image, "FGSM", 0.1)
    assert result.before.verdict == result.after.verdict == "no detector"
    assert result.before.score is None and result.after.score is None


def test_taylor_curve_starts_at_the_loss_with_the_gradient_l1_norm_as_slope(engine, image):
    curve = engine.taylor(image)
    assert curve.eps[0] == 0 and curve.eps[-1] == pytest.approx(engine.eps_max) and np.all(np.diff(curve.eps) > 0)
    assert curve.loss[0] == pytest.approx(curve.first_order[0], rel=1e-4, abs=1e-5)
    label = int(np.argmax(engine.classifier.predict(image[None], verbose=0)))
    reference = fgsm_taylor(engine.classifier, image[None], np.array([label]), curve.eps)  # the same curve, its own gradient
    slope = np.diff(curve.first_order) / np.diff(curve.eps)
    np.testing.assert_allclose(slope, reference["grad_l1"][0], rtol=1e-3)  # ||grad J||_1, not any constant
    np.testing.assert_allclose(curve.first_order, reference["first_order"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(curve.loss, reference["loss"][0], rtol=1e-4, atol=1e-5)
    # the loss itself leaves the image at that slope (measured within 3% at the first eps), and the attack raises it
    assert (curve.loss[1] - curve.loss[0]) / curve.eps[1] == pytest.approx(slope[0], rel=0.1)
    assert curve.loss.max() > curve.loss[0]
    targeted = engine.taylor(image, target=3)
    assert targeted.targeted and targeted.loss[0] < 0  # J = -CE(target)
    figure = taylor_figure(curve, 0.1)
    assert isinstance(figure, Figure) and len(figure.axes[0].lines) == 3


@pytest.mark.parametrize(("call", "message"), [
    (lambda e, x: e.update(x, "CW", 0.1), "unknown attack 'CW'"),
    (lambda e, x: e.update(x, "FGSM", 0.7), r"eps must lie in \[0, 0.5\]"),
    (lambda e, x: e.update(x[:4], "FGSM", 0.1), "does not fit the classifier's input"),
    (lambda e, x: e.update(x, "FGSM", 0.1, target=10), r"target must be a class index in \[0, 9\]"),
    (lambda e, x: e.update(x + 2, "FGSM", 0.1), r"images must lie in \[0.0, 1.0\]"),
])
def test_bad_requests_name_the_problem(engine, image, call, message):
    with pytest.raises(ValueError, match=message):
        call(engine, image)


def test_page_callbacks_return_what_the_components_show(engine, image, tmp_path):
    page = DemoPage(engine)
    path = tmp_path / "digit.png"
    cv2.imwrite(str(path), np.round(image * 255).astype(np.uint8))
    prepared = page.prepare(str(path))
    assert prepared.shape == (8, 8, 1)
    outputs = page.update(prepared, "FGSM", LARGE_EPS, UNTARGETED)
    original, perturbation, adversarial, top_before, top_after, verdict_before, verdict_after, summary = outputs
    for shown in (original, perturbation, adversarial):
        assert shown.shape == (224, 224, 3) and shown.dtype == np.uint8  # enlarged for display
    assert len(top_before) == len(top_after) == 5
    assert "accepted" in verdict_before and "rejected" in verdict_after and "threshold" in verdict_after
    assert "FGSM" in summary and "0.450" in summary
    assert isinstance(page.plot(prepared, LARGE_EPS, "3"), Figure)
    assert page.update(None, "FGSM", 0.1, UNTARGETED)[-1] == "Choose or upload an image."
    assert display_image(np.zeros((300, 200, 3))).shape == (300, 200, 3)  # large images stay as they are


def test_engine_from_a_saved_guard_and_from_a_model_with_a_detector(guard, tmp_path, image):
    guard.save(tmp_path / "guard")
    from_guard = DemoEngine.from_options(guard=tmp_path / "guard")
    assert from_guard.guard is not None and from_guard.class_names == [str(i) for i in range(10)]
    expected = from_guard.update(image, "FGSM", 0.2)
    separate = DemoEngine.from_options(model=tmp_path / "guard" / "classifier.keras", detector=tmp_path / "guard" / "detector")
    assert separate.update(image, "FGSM", 0.2).after == expected.after
    with pytest.raises(ValueError, match="either a guard directory or a model"):
        DemoEngine.from_options(guard=tmp_path / "guard", detector=tmp_path / "guard" / "detector")


def test_imagenet_class_names_tell_duplicates_apart(tmp_path):
    index = {"0": ["n1", "crane"], "1": ["n2", "Labrador_retriever"], "2": ["n3", "crane"]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert imagenet_class_names(tmp_path / "index.json") == ["crane (0)", "Labrador retriever", "crane (2)"]


def test_missing_imagenet_weights_say_which_files_go_where(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match=f"{IMAGENET_WEIGHTS} and {IMAGENET_INDEX} in {tmp_path}"):
        imagenet_mobilenet(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert main(["demo", "--save-model", str(tmp_path / "m.keras")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(tmp_path / "models") in error and "copy both there" in error
    assert main(["demo", "--model", str(tmp_path / "absent.keras")]) == 2
    assert "classifier model not found" in capsys.readouterr().err


def test_default_imagenet_mobilenet_classifies_the_photos_and_fgsm_updates_in_under_a_second(
    shared_data, tmp_path, monkeypatch
):
    models = tmp_path / "keras" / "models"
    models.mkdir(parents=True)
    for name in (IMAGENET_WEIGHTS, IMAGENET_INDEX):
        shutil.copy(shared_data / "imagenet" / name, models / name)
    monkeypatch.setenv("KERAS_HOME", str(models.parent))
    engine = DemoEngine.from_options()
    assert engine.input_shape == (224, 224, 3) and engine.eps_max == 0.1 and engine.guard is None
    image = engine.prepare(shared_data / "photos" / "YellowLabradorLooking_new.jpg")
    clean = engine.update(image, "FGSM", 0.0)  # compiles the gradient and the forward pass, once
    assert clean.before.top5[0][0] == "Labrador retriever"
    latencies = []
    for eps in np.linspace(0.001, 0.1, 7):  # as a slider would move: every eps is new
        start = time.perf_counter()
        result = engine.update(image, "FGSM", eps)
        latencies.append(time.perf_counter() - start)
    print(f"FGSM update latency on MobileNet 224x224: median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < 1.0
    assert result.after.top5[0][0] != "Labrador retriever"
    assert main(["demo", "--save-model", str(tmp_path / "mobilenet.keras")]) == 0
    logits = load_model(tmp_path / "mobilenet.keras").predict_on_batch(image[None])
    assert engine.class_names[int(np.argmax(logits))] == "Labrador retriever"
