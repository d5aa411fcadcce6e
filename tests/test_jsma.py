"""JSMA: validation, the pair saliency map against a brute-force one, targets, budget, strength on MNIST.

Runs under every Keras backend (KERAS_BACKEND=jax too); under JAX the MNIST strength test uses 300
images instead of 1000 to keep its time down.
"""
from __future__ import annotations

import time

import keras
import numpy as np
import pytest

import attacks.jsma
from attacks.jsma import JSMA


@pytest.fixture(scope="module")
def linear_model(linear_model_factory) -> keras.Model:
    return linear_model_factory(21)


def predicted(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.argmax(model.predict(x, verbose=0), axis=1)


def changed(x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
    """Per sample, which features moved (|delta| > 1e-6), flattened."""
    return (np.abs(x_adv - x) > 1e-6).reshape(len(x), -1)


def brute_force_pair(model: keras.Model, x: np.ndarray, target: np.ndarray, *, logits: bool, increase: bool,
                     use_domain: bool = True) -> list[set[int]]:
    """The paper's saliency map over all pairs, in float64 numpy, for a linear model."""
    w, b = (v.astype(np.float64) for v in model.layers[-1].get_weights())
    flat = x.reshape(len(x), -1).astype(np.float64)
    pairs = []
    for row, t in zip(flat, target, strict=True):
        if logits:
            jacobian = w.T  # (classes, features)
        else:
            z = row @ w + b
            p = np.exp(z - z.max())
            p /= p.sum()
            jacobian = p[:, None] * (w.T - p @ w.T)  # dp_j/dx = p_j (w_j - sum_i p_i w_i)
        grad_t = jacobian[t]
        grad_o = jacobian.sum(0) - grad_t
        alpha = grad_t[:, None] + grad_t[None, :]
        beta = grad_o[:, None] + grad_o[None, :]
        ok = (alpha > 0) & (beta < 0) if increase else (alpha < 0) & (beta > 0)
        ok &= ~np.eye(len(row), dtype=bool)
        if use_domain:
            domain = row < 1.0 if increase else row > 0.0
            ok &= domain[:, None] & domain[None, :]
        scores = np.where(ok, -alpha * beta, 0.0)
        p_best, q_best = np.unravel_index(np.argmax(scores), scores.shape)
        pairs.append({int(p_best), int(q_best)})
    return pairs


@pytest.mark.parametrize("logits", [False, True], ids=["softmax", "logits"])
@pytest.mark.parametrize("theta", [0.25, -0.25], ids=["increasing", "decreasing"])
def test_first_pair_is_the_argmax_of_the_pair_saliency_map(linear_model, logits, theta):
    rng = np.random.default_rng(22)
    x = rng.uniform(0.3, 0.7, (30, 6, 6, 1)).astype("float32")
    # saturate a third of the features: they are outside the search domain of this mode
    x[rng.uniform(size=x.shape) < 1 / 3] = 1.0 if theta > 0 else 0.0
    target = (predicted(linear_model, x) + rng.integers(1, 4, len(x))) % 4
    attack = JSMA(theta=theta, gamma=2 / 36, logits=logits)  # exactly one pair
    assert attack.max_pairs(36) == 1
    result = attack(linear_model, x, np.zeros(len(x), int), targets=target)
    expected = brute_force_pair(linear_model, x, target, logits=logits, increase=theta > 0)
    moved = changed(x, result.x_adv)
    assert [set(np.flatnonzero(row).tolist()) for row in moved] == expected
    np.testing.assert_allclose((result.x_adv - x).reshape(len(x), -1)[moved], theta, atol=1e-6)
    # without the search domain the map would pick saturated features for some inputs
    unconstrained = brute_force_pair(linear_model, x, target, logits=logits, increase=theta > 0, use_domain=False)
    assert unconstrained != expected


def test_without_targets_each_input_gets_a_seeded_random_other_class(linear_model):
    rng = np.random.default_rng(23)
    x = rng.uniform(0.0, 1.0, (40, 6, 6, 1)).astype("float32")
    y = predicted(linear_model, x)
    attack = JSMA(gamma=0.5, seed=5)
    targets = attack.random_targets(y, 4)
    assert (targets != y).all() and len(set(targets.tolist())) > 1
    np.testing.assert_array_equal(targets, JSMA(seed=5).random_targets(y, 4))
    assert not np.array_equal(targets, JSMA(seed=6).random_targets(y, 4))
    # a target depends on the input's index, not its position in the call
    np.testing.assert_array_equal(attack.random_targets(y[10:], 4, index=np.arange(10, 40)), targets[10:])
    result = attack(linear_model, x, y)
    np.testing.assert_array_equal(result.targets, targets)
    np.testing.assert_array_equal(result.success, predicted(linear_model, result.x_adv) == targets)
    np.testing.assert_array_equal(attack(linear_model, x, y, targets="random").x_adv, result.x_adv)
    assert result.success.mean() > 0.5
    shard = attack(linear_model, x[10:], y[10:], index=np.arange(10, 40))
    np.testing.assert_array_equal(shard.x_adv, result.x_adv[10:])


def test_success_flag_is_relative_to_the_given_targets(digits, digits_classifier):
    x, y = digits.x_test[:100], digits.y_test[:100]
    targets = (y + 3) % 10
    result = JSMA(gamma=0.4)(digits_classifier, x, y, targets=targets)
    np.testing.assert_array_equal(result.targets, targets)
    np.testing.assert_array_equal(result.success, predicted(digits_classifier, result.x_adv) == targets)
    assert result.success.mean() >= 0.8


def test_budget_and_theta_bound_every_change(digits, digits_classifier):
    x, y = digits.x_test[:100], digits.y_test[:100]
    attack = JSMA(theta=0.5, gamma=0.2)
    budget = 2 * attack.max_pairs(64)
    assert budget == 12
    result = attack(digits_classifier, x, y)
    moved = changed(x, result.x_adv)
    assert moved.sum(1).max() <= budget
    assert moved.sum(1).max() == budget  # some input used its whole budget
    delta = (result.x_adv - x).reshape(len(x), -1)
    flat = x.reshape(len(x), -1)
    np.testing.assert_allclose(delta[moved], np.minimum(0.5, 1.0 - flat[moved]), atol=1e-6)
    assert (delta[~moved] == 0).all()
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0


def test_early_stop_freezes_samples_at_their_first_success(digits, digits_classifier):
    x, y = digits.x_test[:64], digits.y_test[:64]
    targets = (y + 1) % 10
    full = JSMA(gamma=0.5)(digits_classifier, x, y, targets=targets)
    frozen_any = False
    for pairs in (2, 4, 6):
        at_k = JSMA(gamma=2 * pairs / 64)(digits_classifier, x, y, targets=targets)
        done = at_k.success
        frozen_any |= bool(done.any()) and not done.all()
        np.testing.assert_array_equal(full.x_adv[done], at_k.x_adv[done])
        assert changed(x, at_k.x_adv).sum(1).max() <= 2 * pairs
    assert frozen_any


def test_inputs_already_at_their_target_are_unchanged(linear_model):
    x = np.random.default_rng(24).uniform(0.0, 1.0, (20, 6, 6, 1)).astype("float32")
    y = predicted(linear_model, x)
    result = JSMA()(linear_model, x, y, targets=y)
    np.testing.assert_array_equal(result.x_adv, x)
    assert result.success.all()


@pytest.mark.parametrize("logits", [False, True], ids=["softmax", "logits"])
def test_an_input_without_an_admissible_pair_stops_unchanged(logits):
    """Class 0's weights are negative and below every other class's: raising any pixel lowers both
    its logit and its probability, so the increasing map has no admissible pair for target 0."""
    rng = np.random.default_rng(27)
    w = rng.normal(size=(36, 3))
    w[:, 0] = -np.abs(w[:, 1:]).max(1) - 1.0
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    model.layers[-1].set_weights([w.astype("float32"), np.array([1.0, 0.0, 0.0], "float32")])
    x = rng.uniform(0.0, 0.9, (10, 6, 6, 1)).astype("float32")
    result = JSMA(logits=logits)(model, x, predicted(model, x), targets=np.zeros(10, int))
    np.testing.assert_array_equal(result.x_adv, x)
    assert not result.success.any()
    # lowering pixels (theta < 0) is admissible here: every input moves
    lowered = JSMA(theta=-1.0, gamma=1.0, logits=logits)(model, x, predicted(model, x), targets=np.zeros(10, int))
    assert changed(x, lowered.x_adv).any(1).all()
    if not logits:
        assert lowered.success.all()


@pytest.mark.parametrize("clip", [(0.0, 1.0), (-1.0, 1.0)])
def test_results_stay_in_the_clip_range(linear_model, clip):
    x = np.random.default_rng(25).uniform(*clip, (30, 6, 6, 1)).astype("float32")
    y = predicted(linear_model, x)
    for theta in (1.0, -1.0):
        result = JSMA(theta=theta, gamma=0.5, clip=clip)(linear_model, x, y)
        assert result.x_adv.min() >= clip[0] and result.x_adv.max() <= clip[1]
        np.testing.assert_allclose(result.l2, np.linalg.norm((result.x_adv - x).reshape(30, -1), axis=1), rtol=1e-5)


def test_caller_arrays_are_not_modified(linear_model):
    x = np.random.default_rng(26).uniform(0.0, 1.0, (20, 6, 6, 1)).astype("float32")
    y = predicted(linear_model, x)
    targets = (y + 1) % 4
    copies = x.copy(), y.copy(), targets.copy()
    JSMA()(linear_model, x, y, targets=targets)
    JSMA()(linear_model, x, y)
    for array, copy in zip((x, y, targets), copies, strict=True):
        np.testing.assert_array_equal(array, copy)


def test_batching_and_the_logits_batch_cap_give_the_same_result(digits, digits_classifier, monkeypatch):
    x, y = digits.x_test[:23], digits.y_test[:23]
    for attack in (JSMA(gamma=0.3), JSMA(gamma=0.3, logits=True)):
        whole = attack(digits_classifier, x, y, batch_size=64)
        pieces = attack(digits_classifier, x, y, batch_size=5)
        np.testing.assert_array_equal(whole.x_adv, pieces.x_adv)
        np.testing.assert_array_equal(whole.success, pieces.success)
    monkeypatch.setattr(attacks.jsma, "PAIR_SCORES_PER_BATCH", 7 * 64 * 64)  # 7 inputs per batch
    capped = JSMA(gamma=0.3, logits=True)(digits_classifier, x, y, batch_size=64)
    np.testing.assert_array_equal(capped.x_adv, whole.x_adv)


def test_params_rebuild_the_same_attack():
    attack = JSMA(theta=-0.5, gamma=0.2, logits=True, seed=3)
    params = attack.get_params()
    assert params == {"attack": "jsma", "clip": [0.0, 1.0], "seed": 3, "theta": -0.5, "gamma": 0.2, "logits": True}
    assert JSMA(**{k: v for k, v in params.items() if k != "attack"}) == attack


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"theta": 0.0}, "theta must be"),
        ({"theta": 1.5}, "theta must be"),
        ({"theta": float("nan")}, "theta must be"),
        ({"theta": "1"}, "theta must be"),
        ({"gamma": 0.0}, r"gamma must be a number in \(0, 1\]"),
        ({"gamma": 1.2}, r"gamma must be a number in \(0, 1\]"),
        ({"gamma": float("inf")}, "gamma must be"),
        ({"logits": "yes"}, "logits must be"),
        ({"clip": (0.0, 0.0)}, "clip must be"),
    ],
)
def test_bad_parameters_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JSMA(**kwargs)


@pytest.mark.parametrize(
    "y, kwargs, message",
    [
        ([0, 4], {}, "labels must lie"),
        ([0, 1], {"targets": [0, 7]}, "targets must lie"),
        ([0, 1], {"index": [0]}, "index must hold"),
    ],
)
def test_bad_inputs_are_refused_at_call(linear_model, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        JSMA()(linear_model, np.zeros((2, 6, 6, 1), "float32"), np.asarray(y), **kwargs)


@pytest.mark.slow  # MNIST: pytest -m slow
def test_jsma_reaches_random_targets_changing_few_pixels_on_mnist(mnist, mnist_classifier):
    n = 1000 if keras.backend.backend() == "tensorflow" else 300
    x, y = mnist.x_test[:n], mnist.y_test[:n]
    attack = JSMA()
    start = time.perf_counter()
    result = attack(mnist_classifier, x, y)
    seconds = time.perf_counter() - start
    targets = attack.random_targets(y, 10)
    np.testing.assert_array_equal(result.targets, targets)
    fraction = changed(x, result.x_adv).mean(1)
    print(
        f"\nJSMA on {n} MNIST images (random targets): success {result.success_rate:.3f}, pixels changed "
        f"mean {fraction.mean():.4f} (successful {fraction[result.success].mean():.4f}), "
        f"max {fraction.max():.4f}, {seconds:.1f} s"
    )
    np.testing.assert_array_equal(result.success, predicted(mnist_classifier, result.x_adv) == targets)
    assert result.success_rate >= 0.9
    assert fraction.max() <= 0.15
    assert fraction[result.success].mean() <= 0.08
