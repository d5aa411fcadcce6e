"""The `margin` family: minimal attacks (CW-L2 at confidence 0, DeepFool) end at a top-two logit gap
near zero, which it flags; a confident attack (PGD, or CW asked for a margin) it does not, which is
why it is an ensemble member and never the guard on its own."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from attacks import PGD, CarliniWagnerL2, DeepFool
from detector import MarginDetector, load_detector

N = 200


def auroc(detector: MarginDetector, clean: np.ndarray, adversarial: np.ndarray) -> float:
    scores = np.r_[detector.score(clean), detector.score(adversarial)]
    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(adversarial))], scores))


@pytest.fixture(scope="module")
def margin(digits, digits_classifier) -> MarginDetector:
    detector = MarginDetector(digits_classifier)
    return detector.fit(digits.x_train[:100], digits.x_train[100:200], verbose=0).calibrate(digits.x_train[200:700], 0.05)


@pytest.fixture(scope="module")
def attacked(digits, digits_classifier) -> dict[str, np.ndarray]:
    """Successful adversarial test images per attack."""
    x, y = digits.x_test[:N], digits.y_test[:N]
    attacks = {"cw": CarliniWagnerL2(binary_search_steps=4, steps=50), "deepfool": DeepFool(),
               "cw_confident": CarliniWagnerL2(binary_search_steps=4, steps=50, confidence=10.0, initial_const=10.0),
               "pgd": PGD(eps=0.3)}
    out = {}
    for name, attack in attacks.items():
        result = attack(digits_classifier, x, y)
        assert result.success.mean() > 0.8, name
        out[name] = result.x_adv[result.success]
    return out


def test_score_is_minus_the_top_two_logit_gap(margin, digits, digits_classifier):
    x = digits.x_test[:50]
    logits = np.sort(digits_classifier.predict_on_batch(x), axis=-1)
    np.testing.assert_allclose(margin.score(x), logits[:, -2] - logits[:, -1], rtol=1e-5, atol=1e-5)
    assert (margin.score(x) <= 0).all()


def test_minimal_attacks_are_flagged_and_confident_ones_are_not(margin, digits, attacked):
    clean = digits.x_test[N:]
    assert margin.predict(clean).mean() < 0.12
    for name in ("cw", "deepfool"):
        assert auroc(margin, clean, attacked[name]) > 0.95, name
        assert margin.predict(attacked[name]).mean() > 0.9, name
    # what an attacker who knows the family does: ask for a margin; it then sees almost nothing
    assert margin.predict(attacked["cw_confident"]).mean() < 0.2
    assert auroc(margin, clean, attacked["pgd"]) < 0.9


def test_saved_margin_detector_needs_its_classifier(margin, digits, digits_classifier, tmp_path):
    margin.save(tmp_path / "margin")
    assert sorted(p.name for p in (tmp_path / "margin").iterdir()) == ["manifest.json"]
    loaded = load_detector(tmp_path / "margin", classifier=digits_classifier)
    np.testing.assert_array_equal(loaded.score(digits.x_test), margin.score(digits.x_test))
    assert loaded.threshold == margin.threshold
