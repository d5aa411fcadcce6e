"""Correctness of the gradient-sign family. Runs under every Keras backend (KERAS_BACKEND=jax too)."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from attacks import BIM, FGSM, MIFGSM, PGD, make_attack, parse_attack_spec


@pytest.fixture(scope="module")
def linear_model(linear_model_factory) -> keras.Model:
    return linear_model_factory(1)


@pytest.fixture(scope="module")
def interior_batch() -> tuple[np.ndarray, np.ndarray]:
    """Images far enough from 0 and 1 that a 0.05 step never hits the clip range."""
    rng = np.random.default_rng(2)
    return rng.uniform(0.2, 0.8, (40, 6, 6, 1)).astype("float32"), rng.integers(0, 4, 40)


def analytic_gradient(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d CE(W x + b, y) / dx = W (softmax - onehot(y)), per sample."""
    w, b = model.layers[-1].get_weights()
    logits = x.reshape(len(x), -1) @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return (p @ w.T).reshape(x.shape)


def test_fgsm_moves_exactly_eps_times_sign_of_the_analytic_gradient(linear_model, interior_batch):
    x, y = interior_batch
    eps = 0.05
    result = FGSM(eps=eps)(linear_model, x, y)
    expected = eps * np.sign(analytic_gradient(linear_model, x, y))
    np.testing.assert_allclose(result.x_adv - x, expected, atol=1e-6)


@pytest.mark.parametrize("attack", [FGSM(eps=0.1), BIM(eps=0.1, steps=7), PGD(eps=0.1, steps=7)])
def test_linf_bound_and_clip_range_hold(linear_model, attack):
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (50, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 4, 50)
    result = attack(linear_model, x, y)
    assert np.abs(result.x_adv - x).max() <= attack.eps + 1e-6
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    np.testing.assert_allclose(result.linf, np.abs(result.x_adv - x).reshape(50, -1).max(1), atol=1e-6)


def test_l2_step_has_exactly_the_requested_norm(linear_model, interior_batch):
    x, y = interior_batch
    result = BIM(eps=0.5, steps=1, step_size=0.3, norm="2")(linear_model, x, y)
    norms = np.linalg.norm((result.x_adv - x).reshape(len(x), -1), axis=1)
    np.testing.assert_allclose(norms, 0.3, rtol=1e-5)
    np.testing.assert_allclose(result.l2, norms, rtol=1e-5)


def test_l2_projection_never_exceeds_eps(linear_model):
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (30, 6, 6, 1)).astype("float32")
    result = PGD(eps=0.4, steps=10, norm="2")(linear_model, x, rng.integers(0, 4, 30))
    assert np.linalg.norm((result.x_adv - x).reshape(30, -1), axis=1).max() <= 0.4 + 1e-5


def test_caller_arrays_are_not_modified_and_eps_zero_returns_the_input(linear_model, interior_batch):
    x, y = interior_batch
    x_copy, y_copy = x.copy(), y.copy()
    PGD(eps=0.1, steps=3)(linear_model, x, y)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(y, y_copy)
    for attack in (FGSM(eps=0.0), PGD(eps=0.0, steps=3), PGD(eps=0.0, steps=3, norm="2")):
        np.testing.assert_array_equal(attack(linear_model, x, y).x_adv, x)


@pytest.mark.parametrize("attack", [FGSM(eps=0.2), PGD(eps=0.2, steps=10), PGD(eps=0.2, steps=3, restarts=3)])
@pytest.mark.parametrize("targeted", [False, True])
def test_success_flag_matches_the_model_prediction(linear_model, interior_batch, attack, targeted):
    """Whether judged on first access (one start) or inside the restart loop, success is exactly
    "the model now predicts something else" (untargeted) or "...the target" (targeted)."""
    x, y = interior_batch
    targets = (y + 1) % 4 if targeted else None
    result = attack(linear_model, x, y, targets=targets, batch_size=16)
    assert ("pending" in repr(result)) == (attack.restarts == 1)
    predicted = np.argmax(linear_model.predict(result.x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(result.success, predicted == targets if targeted else predicted != y)
    assert "pending" not in repr(result)


def test_batching_and_padding_give_the_same_result_as_one_batch(linear_model):
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (23, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 4, 23)
    attack = BIM(eps=0.1, steps=5)
    whole = attack(linear_model, x, y, batch_size=64)
    pieces = attack(linear_model, x, y, batch_size=5)
    np.testing.assert_allclose(whole.x_adv, pieces.x_adv, atol=1e-6)
    np.testing.assert_array_equal(whole.success, pieces.success)


def test_pgd_is_at_least_as_strong_as_fgsm_on_a_trained_cnn(digits, digits_classifier):
    x, y = digits.x_test[:200], digits.y_test[:200]
    fgsm = FGSM(eps=0.15)(digits_classifier, x, y)
    pgd = PGD(eps=0.15, steps=20)(digits_classifier, x, y)
    assert pgd.success_rate >= fgsm.success_rate
    assert pgd.success_rate > 0.6


def test_targeted_pgd_reaches_its_targets(digits, digits_classifier):
    x, y = digits.x_test[:100], digits.y_test[:100]
    targets = (y + 1) % 10
    result = PGD(eps=0.3, steps=20)(digits_classifier, x, y, targets=targets)
    predicted = np.argmax(digits_classifier.predict(result.x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(result.success, predicted == targets)
    assert result.success_rate >= 0.9


def test_early_stop_freezes_samples_at_their_first_success(digits, digits_classifier):
    x, y = digits.x_test[:64], digits.y_test[:64]
    full = BIM(eps=0.2, steps=10, step_size=0.05, early_stop=True)(digits_classifier, x, y)
    frozen_any = False
    for k in range(1, 10):
        at_k = BIM(eps=0.2, steps=k, step_size=0.05, early_stop=True)(digits_classifier, x, y)
        done = at_k.success
        frozen_any |= done.any()
        # a sample that succeeded by step k keeps exactly its step-k image to the end
        np.testing.assert_array_equal(full.x_adv[done], at_k.x_adv[done])
    assert frozen_any
    no_stop = BIM(eps=0.2, steps=10, step_size=0.05)(digits_classifier, x, y)
    assert np.abs(no_stop.x_adv - x).mean() > np.abs(full.x_adv - x).mean()


def test_random_start_is_reproducible_and_seeded(linear_model, interior_batch):
    x, y = interior_batch
    first = PGD(eps=0.1, steps=2, seed=3)(linear_model, x, y)
    again = PGD(eps=0.1, steps=2, seed=3)(linear_model, x, y)
    other = PGD(eps=0.1, steps=2, seed=4)(linear_model, x, y)
    np.testing.assert_array_equal(first.x_adv, again.x_adv)
    assert not np.array_equal(first.x_adv, other.x_adv)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PGD(eps=-0.1), "eps must be"),
        (lambda: PGD(eps=float("nan")), "eps must be"),
        (lambda: PGD(eps=1.5), "eps must lie"),
        (lambda: PGD(eps=0.1, steps=0), "steps must be"),
        (lambda: PGD(eps=0.1, step_size=-1.0), "step_size must be"),
        (lambda: PGD(eps=0.1, norm="1"), "PGD: norm must be .inf. or .2."),
        (lambda: PGD(eps=0.1, clip=(1.0, 0.0)), "clip must be"),
        (lambda: make_attack("fgsm", eps=0.1, steps=3), "no parameter"),
        (lambda: make_attack("cw2", eps=0.1), "unknown attack"),
        (lambda: make_attack("pgd", eps=0.1, bogus=1), "no parameter"),
        (lambda: make_attack("pgd"), "needs the parameter"),
        (lambda: parse_attack_spec("pgd:eps"), "cannot parse"),
    ],
)
def test_bad_parameters_are_refused_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "x, y, kwargs, message",
    [
        (np.zeros((6, 6, 1), "float32"), [0], {}, "4-D"),
        (np.zeros((2, 6, 6, 1), "uint8"), [0, 1], {}, "floating point"),
        (np.full((2, 6, 6, 1), 1.5, "float32"), [0, 1], {}, "must lie in"),
        (np.full((2, 6, 6, 1), np.nan, "float32"), [0, 1], {}, "NaN"),
        (np.zeros((2, 5, 5, 1), "float32"), [0, 1], {}, "do not fit"),
        (np.zeros((2, 6, 6, 1), "float32"), [0, 4], {}, "labels must lie"),
        (np.zeros((2, 6, 6, 1), "float32"), [0], {}, "labels must be a 1-D array of 2"),
        (np.zeros((2, 6, 6, 1), "float32"), [0.0, 1.0], {}, "integer"),
        (np.zeros((2, 6, 6, 1), "float32"), [0, 1], {"targets": [0, 9]}, "targets must lie"),
        (np.zeros((0, 6, 6, 1), "float32"), [], {}, "empty"),
    ],
)
def test_bad_inputs_are_refused_at_call(linear_model, x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PGD(eps=0.1, steps=2)(linear_model, x, np.asarray(y), **kwargs)


def test_spec_parsing_reads_fractions_defaults_and_overrides():
    attack = parse_attack_spec("pgd:eps=8/255,steps=20,norm=2", overrides={"steps": 5})
    assert attack == PGD(eps=8 / 255, steps=5, norm="2")
    assert parse_attack_spec("fgsm", defaults={"eps": 0.3, "steps": 4}) == FGSM(eps=0.3)


def test_restarts_keep_every_success_of_the_first_start_and_add_more(digits, digits_classifier):
    x, y = digits.x_test[:150], digits.y_test[:150]
    one = PGD(eps=0.1, steps=1)(digits_classifier, x, y)
    five = PGD(eps=0.1, steps=1, restarts=10)(digits_classifier, x, y)
    assert np.all(five.success[one.success])
    assert five.success.sum() > one.success.sum()
    assert np.abs(five.x_adv - x).max() <= 0.1 + 1e-6
    np.testing.assert_array_equal(five.x_adv[one.success], one.x_adv[one.success])


def test_target_modes_random_and_least_likely(digits, digits_classifier):
    x, y = digits.x_test[:60], digits.y_test[:60]
    random = PGD(eps=0.3, steps=10)(digits_classifier, x, y, targets="random")
    again = PGD(eps=0.3, steps=10)(digits_classifier, x, y, targets="random")
    assert np.all(random.targets != y) and len(set(random.targets.tolist())) > 3
    np.testing.assert_array_equal(random.targets, again.targets)
    predicted = np.argmax(digits_classifier.predict(random.x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(random.success, predicted == random.targets)
    least = PGD(eps=0.3, steps=30)(digits_classifier, x, y, targets="least_likely")
    np.testing.assert_array_equal(least.targets, np.argmin(digits_classifier.predict(x, verbose=0), axis=1))
    assert least.success_rate >= 0.6
    with pytest.raises(ValueError, match="unknown target mode"):
        PGD(eps=0.3)(digits_classifier, x, y, targets="most_likely")


def test_momentum_zero_is_bim_and_momentum_changes_the_path(digits, digits_classifier):
    x, y = digits.x_test[:50], digits.y_test[:50]
    bim = BIM(eps=0.1, steps=6)(digits_classifier, x, y)
    np.testing.assert_allclose(MIFGSM(eps=0.1, steps=6, momentum=0.0)(digits_classifier, x, y).x_adv, bim.x_adv, atol=1e-6)
    mifgsm = MIFGSM(eps=0.1, steps=6)(digits_classifier, x, y)
    assert not np.allclose(mifgsm.x_adv, bim.x_adv)
    assert np.abs(mifgsm.x_adv - x).max() <= 0.1 + 1e-6


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PGD(eps=0.1, restarts=0), "restarts must be"),
        (lambda: BIM(eps=0.1, restarts=3), "BIM: restarts must be 1 without random_start"),
        (lambda: MIFGSM(eps=0.1, momentum=-1.0), "momentum must be"),
    ],
)
def test_bad_restart_and_momentum_parameters(build, message):
    with pytest.raises(ValueError, match=message):
        build()
