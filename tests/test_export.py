"""Tests for the fused scoring models (`Detector.scoring_model`), the guard's fast path built on
them, and `export_guard`: a SavedModel that plain TensorFlow serves with the guard's answers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from attacks import FGSM
from foundation.storage import model_fingerprint
from detector import ActivationDetector, Detector, EnsembleDetector, InputDetector, JointDetector, SqueezeDetector
from safetynet.cli import main
from serving.export import export_guard
from serving.guard import Guard
from training.detector import make_detector

EPS = 0.3
N_FIT = 800  # training images the detectors are fitted on; the rest calibrate them
OUTPUTS = {"probabilities", "label", "adversarial_score", "flagged", "rejected"}

# Runs in a fresh interpreter: TensorFlow and NumPy only, no safetynet module, as a server would.
LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    images = np.load(sys.argv[1])
    for export in sys.argv[2:]:
        serve = tf.saved_model.load(export).signatures["serving_default"]
        outputs = {name: value.numpy() for name, value in serve(images=tf.constant(images)).items()}
        np.savez(export + ".npz", **outputs)
    ours = {"attacks", "detector", "serving", "training", "safetynet"} & set(sys.modules)
    assert not ours, f"project modules were imported: {ours}"
    """
)


@pytest.fixture(scope="module")
def fit_data(digits, digits_classifier) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean fitting images, their FGSM versions, clean calibration images)."""
    x_fit, y_fit = digits.x_train[:N_FIT], digits.y_train[:N_FIT]
    return x_fit, FGSM(eps=EPS)(digits_classifier, x_fit, y_fit).x_adv, digits.x_train[N_FIT:]


@pytest.fixture(scope="module")
def input_detector(fit_data, digits_classifier) -> InputDetector:
    x_fit, x_adv, x_calibrate = fit_data
    detector = InputDetector(epochs=2).fit(x_fit, x_adv, verbose=0).calibrate(x_calibrate)
    detector.classifier_fingerprint = model_fingerprint(digits_classifier)
    return detector


@pytest.fixture(scope="module")
def activation_detector(fit_data, digits_classifier) -> ActivationDetector:
    x_fit, x_adv, x_calibrate = fit_data
    return ActivationDetector(digits_classifier, epochs=3).fit(x_fit, x_adv, verbose=0).calibrate(x_calibrate)


@pytest.fixture(scope="module")
def detectors(input_detector, activation_detector, fit_data, digits_classifier) -> dict[str, Detector]:
    """Every family, fitted on the same pairs and calibrated on the same clean images."""
    x_fit, x_adv, x_calibrate = fit_data
    fitted = {family: make_detector(family, digits_classifier, epochs=2, seed=0).fit(x_fit, x_adv, verbose=0).calibrate(x_calibrate)
              for family in ("mahalanobis", "safetynet", "squeeze", "margin", "shift_margin", "shift_drop", "odds")}
    half = len(x_fit) // 2
    ensemble = EnsembleDetector([input_detector, fitted["safetynet"], fitted["squeeze"]]).fit(x_fit[half:], x_adv[half:], verbose=0)
    joint = JointDetector(input_detector, digits_classifier).fit(x_fit[half:], x_adv[half:], verbose=0)
    return {"input": input_detector, "activations": activation_detector, **fitted,
            "ensemble": ensemble.calibrate(x_calibrate), "joint": joint.calibrate(x_calibrate)}


FAMILIES = ["input", "activations", "mahalanobis", "safetynet", "squeeze", "margin", "shift_margin", "shift_drop", "odds",
            "ensemble", "joint"]


@pytest.fixture(scope="module")
def x_eval(digits, digits_classifier) -> np.ndarray:
    """Clean test images and FGSM versions of them: some accepted, some rejected."""
    x, y = digits.x_test[:150], digits.y_test[:150]
    return np.concatenate([x, FGSM(eps=EPS)(digits_classifier, x, y).x_adv])


# `odds` scores are z-scores of the small change noise makes to logit gaps of about 10: a difference of
# nearly equal numbers divided by its clean spread, so float32 round-off of the logits (batched one way
# here, another way in `score`) comes out about 100 times larger (9e-5 of the spread seen in CI)
ROUNDOFF = {"odds": 1e-3}


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_model_matches_score_and_logits(family, detectors, digits_classifier, x_eval):
    """Every family's graph gives its NumPy score to float32 round-off: 1e-5 of the scores' spread
    (Mahalanobis scores spread over +-10 and differ by up to 3e-5 through the classifier's features)."""
    detector = detectors[family]
    outputs = detector.scoring_model(digits_classifier).predict_on_batch(x_eval)
    assert set(outputs) == {"logits", "score"}
    expected = detector.score(x_eval)
    spread = max(1.0, float(np.std(expected)))
    np.testing.assert_allclose(outputs["score"], expected, rtol=1e-5, atol=ROUNDOFF.get(family, 1e-5) * spread)
    np.testing.assert_allclose(outputs["logits"], digits_classifier.predict_on_batch(x_eval), rtol=1e-5, atol=1e-5)
    alone = detector.scoring_model(None).predict_on_batch(x_eval)
    assert set(alone) == {"score"}
    np.testing.assert_allclose(alone["score"], outputs["score"], rtol=1e-5, atol=1e-5)


def test_activations_scoring_model_runs_the_classifier_once(activation_detector, digits_classifier):
    """The logits and the detector's activations come from one copy of the classifier's graph."""
    model = activation_detector.scoring_model(digits_classifier)
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    assert nested == [f"{digits_classifier.name}_trunk", "activation_detector"]
    trunk = model.get_layer(f"{digits_classifier.name}_trunk")
    assert [layer.name for layer in trunk.layers] == [layer.name for layer in digits_classifier.layers]


def test_activations_scoring_model_on_a_sequential_classifier(linear_model_factory):
    classifier = linear_model_factory(0)
    x = np.random.default_rng(0).random((64, 6, 6, 1), np.float32)
    detector = ActivationDetector(classifier, layers=[classifier.layers[0].name], epochs=1).fit(x[:32], 1 - x[:32], verbose=0)
    outputs = detector.scoring_model(classifier).predict_on_batch(x)
    np.testing.assert_allclose(outputs["score"], detector.score(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["logits"], classifier.predict_on_batch(x), rtol=1e-5, atol=1e-5)


def test_only_steps_outside_keras_leave_a_family_without_scoring_model(digits_classifier):
    """Non-local means (OpenCV, the colour squeezer) and Lee et al.'s noise step have no graph."""
    colour = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    assert SqueezeDetector(colour).scoring_model(colour) is None
    assert SqueezeDetector(colour, squeezers=["bit_depth:5", "median:3"]).scoring_model(colour) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_guard_matches_the_unfused_guard(family, detectors, digits_classifier, x_eval, monkeypatch):
    fused = Guard(digits_classifier, detectors[family], batch_size=64)
    unfused = Guard(digits_classifier, detectors[family], batch_size=64)
    unfused.scoring_model = None
    expected = unfused.predict(x_eval)
    monkeypatch.setattr(detectors[family], "score", _explode)  # the fast path never calls it
    result = fused.predict(x_eval)
    np.testing.assert_allclose(result.probabilities, expected.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.labels, expected.labels)
    np.testing.assert_allclose(result.scores, expected.scores, rtol=1e-5, atol=1e-5 * max(1.0, float(np.std(expected.scores))))
    np.testing.assert_array_equal(result.rejected, expected.rejected)
    assert 0 < result.rejected.sum() < len(x_eval)
    assert fused.stats.detector_errors == 0


def test_fused_failures_fall_back_and_fail_closed(input_detector, digits_classifier, x_eval, monkeypatch):
    guard = Guard(digits_classifier, input_detector, batch_size=64)
    expected = guard.predict(x_eval)
    # the fused model raises: classifier and detector run apart, same answers, no detector error
    monkeypatch.setattr(guard.scoring_model, "predict_on_batch", _explode)
    result = guard.predict(x_eval)
    np.testing.assert_allclose(result.scores, expected.scores, rtol=1e-5, atol=1e-5)
    assert guard.stats.detector_errors == 0
    # ... and so does the detector: every input flagged, scored NaN and counted
    monkeypatch.setattr(input_detector, "score", _explode)
    result = guard.predict(x_eval)
    assert np.isnan(result.scores).all() and result.rejected.all()
    np.testing.assert_array_equal(result.labels, expected.labels)
    assert guard.stats.detector_errors == len(x_eval)


def test_nan_scores_from_the_fused_model_are_flagged_and_counted(input_detector, digits_classifier, x_eval, monkeypatch):
    guard = Guard(digits_classifier, input_detector, policy="flag", batch_size=64)
    predict_on_batch = guard.scoring_model.predict_on_batch

    def nan_for_odd_rows(batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = predict_on_batch(batch)
        outputs["score"][1::2] = np.nan
        return outputs

    monkeypatch.setattr(guard.scoring_model, "predict_on_batch", nan_for_odd_rows)
    result = guard.predict(x_eval[:64])
    assert result.flagged[1::2].all() and not result.rejected.any()
    assert guard.stats.detector_errors == 32


def _explode(*args: object, **kwargs: object) -> None:
    raise RuntimeError("boom")


VARIANTS = {  # name: (family, policy, with classifier)
    "input-reject": ("input", "reject", True),
    "activations-reject": ("activations", "reject", True),
    "activations-flag": ("activations", "flag", True),
    "input-no-classifier": ("input", "reject", False),
    **{f"{family}-reject": (family, "reject", True) for family in ("mahalanobis", "safetynet", "squeeze", "ensemble", "joint")},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, detectors, digits_classifier, x_eval) -> dict[str, tuple[Guard, dict[str, np.ndarray], Path]]:
    """Every variant exported, then answered by plain TensorFlow in ONE subprocess (one TF start)."""
    root = tmp_path_factory.mktemp("exports")
    guards = {
        name: Guard(digits_classifier if with_classifier else None, detectors[family], policy=policy)
        for name, (family, policy, with_classifier) in VARIANTS.items()
    }
    for name, guard in guards.items():
        assert export_guard(guard, root / name) == root / name
    np.save(root / "images.npy", x_eval)
    subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(root / "images.npy"), *(str(root / n) for n in guards)],
                   check=True, cwd=root, timeout=300)
    return {name: (guard, dict(np.load(root / f"{name}.npz")), root / name) for name, guard in guards.items()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_savedmodel_answers_like_the_guard(name, served, x_eval):
    guard, outputs, _ = served[name]
    expected = guard.predict(x_eval)
    accepted = ~expected.rejected
    np.testing.assert_allclose(outputs["adversarial_score"][accepted], expected.scores[accepted], rtol=1e-5, atol=1e-5)
    assert np.isnan(outputs["adversarial_score"][expected.rejected]).all()  # masked, as HTTP nulls it
    np.testing.assert_array_equal(outputs["flagged"], expected.flagged)
    np.testing.assert_array_equal(outputs["rejected"], expected.rejected)
    assert outputs["flagged"].dtype == outputs["rejected"].dtype == bool
    assert 0 < expected.flagged.sum() < len(x_eval)
    if guard.classifier is None:
        assert set(outputs) == {"adversarial_score", "flagged", "rejected"}
    else:
        assert set(outputs) == OUTPUTS
        np.testing.assert_allclose(outputs["probabilities"][accepted], expected.probabilities[accepted], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(outputs["label"][accepted], expected.labels[accepted])
        assert np.isnan(outputs["probabilities"][expected.rejected]).all() and (outputs["label"][expected.rejected] == -1).all()
        assert outputs["label"].dtype == np.int64
    if guard.policy == "flag":
        assert not outputs["rejected"].any()


def test_savedmodel_and_http_give_the_same_fields_for_rejected_rows(served, x_eval):
    """Row by row: HTTP's null is the SavedModel's mask (NaN, label -1); the rest agree."""
    import httpx
    from test_http import running

    from serving.http import create_app

    guard, outputs, _ = served["input-reject"]
    with running(create_app(guard, max_batch=len(x_eval))) as url:
        response = httpx.post(f"{url}/v1/models/{guard.name}:predict", json={"instances": x_eval.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert any(row["rejected"] for row in rows) and not all(row["rejected"] for row in rows)
    for i, row in enumerate(rows):
        assert set(row) == set(outputs) == OUTPUTS
        assert row["rejected"] == outputs["rejected"][i] and row["flagged"] == outputs["flagged"][i]
        for name in ("probabilities", "label", "adversarial_score"):
            masked = outputs[name][i]
            assert (row[name] is None) == (bool(np.isnan(masked).all()) if name != "label" else masked == -1), name
        if not row["rejected"]:
            np.testing.assert_allclose(row["probabilities"], outputs["probabilities"][i], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(row["adversarial_score"], outputs["adversarial_score"][i], rtol=1e-5, atol=1e-5)
            assert row["label"] == outputs["label"][i]


def test_export_keeps_scores_of_rejected_rows_for_trusted_callers(input_detector, digits_classifier, x_eval, tmp_path):
    import tensorflow as tf

    guard = Guard(digits_classifier, input_detector)
    export_guard(guard, tmp_path / "trusted", scores_for_rejected=True)
    outputs = tf.saved_model.load(str(tmp_path / "trusted")).signatures["serving_default"](images=tf.constant(x_eval))
    expected = guard.predict(x_eval)
    np.testing.assert_allclose(outputs["adversarial_score"].numpy(), expected.scores, rtol=1e-5, atol=1e-5)
    assert np.isnan(outputs["probabilities"].numpy()[expected.rejected]).all() and expected.rejected.any()


def test_export_records_its_settings(served):
    guard, _, export = served["activations-flag"]
    metadata = json.loads((export / "assets.extra" / "safetynet.json").read_text())
    assert metadata["policy"] == "flag" and metadata["detector"] == "activations"
    assert metadata["threshold"] == guard.detector.threshold


def test_exported_model_flags_images_it_would_refuse(served, x_eval):
    """Images the guard refuses (outside the clip range, NaN) are flagged, per image, when served."""
    import tensorflow as tf

    guard, _, export = served["input-reject"]
    bad = x_eval[:3].copy()
    bad[0] *= 2.0
    bad[1] -= 0.5
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="must lie in"):
        guard.predict(bad[:2])
    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    outputs = serve(images=tf.constant(np.concatenate([bad, x_eval[:1]])))
    np.testing.assert_array_equal(outputs["rejected"].numpy()[:3], True)


def test_unexportable_family_is_refused_and_leaves_nothing_behind(digits_classifier, input_detector, digits, tmp_path):
    squeeze = SqueezeDetector(digits_classifier, squeezers=["bit_depth:1", "nl_means:13:3:2"]).calibrate(digits.x_train[N_FIT:])
    guard = Guard(digits_classifier, squeeze)
    with pytest.raises(ValueError, match=r"'squeeze' detector cannot be exported: .*OpenCV's non-local means"):
        export_guard(guard, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []
    export_guard(Guard(digits_classifier, input_detector), tmp_path / "export")  # an existing export stays whole
    with pytest.raises(ValueError, match="cannot be exported"):
        export_guard(guard, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (tmp_path / "export" / "saved_model.pb").is_file()


def test_cli_export(tmp_path, digits_classifier, activation_detector, digits, x_eval, capsys):
    import tensorflow as tf

    guard = Guard(digits_classifier, activation_detector, name="digits")
    guard.save(tmp_path / "guard")
    assert main(["export", "--guard", str(tmp_path / "guard"), "--out", str(tmp_path / "served")]) == 0
    assert "served" in capsys.readouterr().out
    serve = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    outputs = serve(images=tf.constant(x_eval))
    np.testing.assert_array_equal(outputs["rejected"].numpy(), guard.predict(x_eval).rejected)
    squeeze = SqueezeDetector(digits_classifier, squeezers=["nl_means:13:3:2"]).calibrate(digits.x_train[N_FIT:])
    Guard(digits_classifier, squeeze).save(tmp_path / "squeeze")
    assert main(["export", "--guard", str(tmp_path / "squeeze"), "--out", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safetynet export: error:") and "non-local means" in err
    assert not (tmp_path / "nothing").exists()
