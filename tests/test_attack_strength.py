"""Strength of the gradient-sign family on the MNIST reference CNN (first 1,000 test images)."""
from __future__ import annotations

import numpy as np
import pytest

from attacks import PGD

pytestmark = pytest.mark.slow  # MNIST (with the shared MNIST classifier's setup): pytest -m slow


def test_pgd40_at_eps_03_leaves_at_most_one_percent_accuracy(mnist, mnist_classifier):
    x, y = mnist.x_test[:1000], mnist.y_test[:1000]
    result = PGD(eps=0.3, steps=40)(mnist_classifier, x, y)
    accuracy = np.mean(np.argmax(mnist_classifier.predict(result.x_adv, verbose=0), axis=1) == y)
    assert accuracy <= 0.01
    assert np.abs(result.x_adv - x).max() <= 0.3 + 1e-6


def test_targeted_pgd_reaches_random_targets_on_90_percent(mnist, mnist_classifier):
    x, y = mnist.x_test[:1000], mnist.y_test[:1000]
    result = PGD(eps=0.3, steps=40)(mnist_classifier, x, y, targets="random")
    predicted = np.argmax(mnist_classifier.predict(result.x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(result.success, predicted == result.targets)
    assert np.all(result.targets != y)
    assert result.success_rate >= 0.9
