"""Black-box attacks: transfer from a surrogate, and fooling images from noise."""
from __future__ import annotations

import json

import numpy as np
import pytest

from attacks import PGD
from attacks.dataset import load_adversarial_dataset
from attacks.transfer import fooling_images, transfer_attack
from foundation.models import save_model
from foundation.storage import model_fingerprint
from safetynet.cli import main
from training.classifier import train_classifier


@pytest.fixture(scope="module")
def surrogate(digits):
    """A look-alike of `digits_classifier`: same data and architecture, another seed."""
    return train_classifier(digits.x_train, digits.y_train, digits.num_classes, epochs=8, seed=7, verbose=0)


def test_examples_crafted_on_a_surrogate_transfer_to_the_target(digits, digits_classifier, surrogate):
    x, y = digits.x_test[:200], digits.y_test[:200]
    result = transfer_attack(PGD(eps=0.3, steps=10), surrogate, digits_classifier, x, y)
    predicted = np.argmax(digits_classifier.predict(result.crafted.x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(result.target_success, predicted != y)
    assert result.crafted.success_rate > 0.95
    assert result.transfer_rate > 0.5  # most white-box examples on the surrogate also fool the target
    assert result.success_rate == pytest.approx(result.target_success.mean())


def test_fooling_images_from_noise_reach_their_targets(digits_classifier):
    targets = np.arange(40) % 10
    result = fooling_images(digits_classifier, 40, targets=targets, seed=3)
    predicted = np.argmax(digits_classifier.predict(result.x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(result.success, predicted == targets)
    assert result.success_rate >= 0.9
    untargeted = fooling_images(digits_classifier, 20, seed=3)
    assert untargeted.success_rate >= 0.9 and untargeted.targets is None
    with pytest.raises(ValueError, match="n must be"):
        fooling_images(digits_classifier, 0)


def test_cli_transfer_dataset_records_both_models(digits, digits_classifier, surrogate, tmp_path):
    target_path = save_model(digits_classifier, tmp_path / "target.keras")
    surrogate_path = save_model(surrogate, tmp_path / "surrogate.keras")
    out = tmp_path / "transfer"
    assert main(["attack", "--model", str(target_path), "--surrogate", str(surrogate_path), "--attack", "pgd",
                 "--n", "100", "--split", "test", "--targets", "random", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classifier_fingerprint"] == model_fingerprint(digits_classifier)
    assert manifest["crafted_on"] == model_fingerprint(surrogate)
    data = load_adversarial_dataset(out)
    assert np.all(data.target != data.y)
    predicted = np.argmax(digits_classifier.predict(data.x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(data.success, predicted == data.target)
