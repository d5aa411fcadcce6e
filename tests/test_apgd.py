"""APGD (Croce & Hein 2020): its checkpoint schedule, its budget, and its strength against PGD at the
same number of gradient steps, with the CE and DLR losses, untargeted and targeted."""
from __future__ import annotations

import numpy as np
import pytest

from attacks import APGD, PGD, make_attack
from attacks.apgd import checkpoints


def test_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [1]


@pytest.fixture(scope="module")
def images(digits):
    return digits.x_test[:120], digits.y_test[:120]


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_is_at_least_as_strong_as_pgd_at_the_same_steps(digits_classifier, images, loss):
    x, y = images
    apgd = APGD(eps=0.08, steps=20, loss=loss)(digits_classifier, x, y)
    pgd = PGD(eps=0.08, steps=20, loss=loss)(digits_classifier, x, y)
    assert np.abs(apgd.x_adv - x).max() <= 0.08 + 1e-6
    predicted = np.argmax(digits_classifier.predict(apgd.x_adv, verbose=0), axis=-1)
    np.testing.assert_array_equal(apgd.success, predicted != y)
    assert apgd.success.mean() >= pgd.success.mean() - 0.02, (apgd.success.mean(), pgd.success.mean())
    assert apgd.success.mean() > 0.15  # a comparison worth making: the attack fools a fair share


def test_targeted_apgd_dlr_reaches_its_targets(digits_classifier, images):
    x, y = images
    result = APGD(eps=0.3, steps=20, loss="dlr")(digits_classifier, x, y, targets="random")
    predicted = np.argmax(digits_classifier.predict(result.x_adv, verbose=0), axis=-1)
    np.testing.assert_array_equal(result.success, predicted == result.targets)
    assert result.success.mean() > 0.8


def test_apgd_takes_eps_at_call_and_is_a_cli_name(digits_classifier, images):
    x, y = images
    attack = make_attack("apgd", eps=0.3, steps=5, loss="dlr")
    assert isinstance(attack, APGD) and attack.get_params()["loss"] == "dlr"
    small = attack(digits_classifier, x[:10], y[:10], eps=0.01)
    assert np.abs(small.x_adv - x[:10]).max() <= 0.01 + 1e-6
    with pytest.raises(ValueError, match=r"apgd takes no call-time budget \['step_size'\]"):
        attack(digits_classifier, x[:10], y[:10], step_size=0.1)
