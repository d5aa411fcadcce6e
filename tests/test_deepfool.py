"""DeepFool: validation, the paper's closed-form step on linear models, early stop, strength on MNIST.

Runs under every Keras backend (KERAS_BACKEND=jax too); under JAX the MNIST strength test uses 300
images instead of 1000 to keep its time down.
"""
from __future__ import annotations

import time

import keras
import numpy as np
import pytest

from attacks import PGD
from attacks.deepfool import DeepFool


def linear(num_classes: int, seed: int) -> keras.Model:
    """logits = W x + b on 6x6x1 images, with known weights."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(num_classes)])
    model.layers[-1].set_weights(
        [rng.normal(size=(36, num_classes)).astype("float32"), rng.normal(size=num_classes).astype("float32")]
    )
    return model


@pytest.fixture(scope="module")
def binary_model() -> keras.Model:
    return linear(2, seed=11)


@pytest.fixture(scope="module")
def four_class_model() -> keras.Model:
    return linear(4, seed=12)


@pytest.fixture(scope="module")
def interior() -> np.ndarray:
    """Images in [0.3, 0.7]: one minimal step on the linear models never reaches 0 or 1."""
    return np.random.default_rng(13).uniform(0.3, 0.7, (40, 6, 6, 1)).astype("float32")


def logits_and_weights(model: keras.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, b = model.layers[-1].get_weights()
    return x.reshape(len(x), -1).astype(np.float64) @ w + b, w.astype(np.float64)


def predicted(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.argmax(model.predict(x, verbose=0), axis=1)


def assert_interior(x_adv: np.ndarray) -> None:
    """The closed forms below hold only while the clip range stays inactive."""
    assert 0.0 < x_adv.min() and x_adv.max() < 1.0


def test_binary_linear_one_step_is_the_minimal_l2_perturbation(binary_model, interior):
    x = interior
    logits, w = logits_and_weights(binary_model, x)
    y = logits.argmax(1)
    other = 1 - y
    direction = (w[:, other] - w[:, y]).T  # gradient of f = logit_other - logit_y, per sample
    f = logits[np.arange(len(x)), other] - logits[np.arange(len(x)), y]  # < 0
    length = np.abs(f) / np.linalg.norm(direction, axis=1)
    result = DeepFool(steps=1, overshoot=0.0)(binary_model, x, y)
    assert_interior(result.x_adv)
    delta = (result.x_adv - x).reshape(len(x), -1)
    np.testing.assert_allclose(np.linalg.norm(delta, axis=1), length, atol=1e-4)
    expected = direction * (np.abs(f) / np.linalg.norm(direction, axis=1) ** 2)[:, None]
    np.testing.assert_allclose(delta, expected, atol=1e-5)
    np.testing.assert_allclose(result.l2, length, atol=1e-4)
    # the step lands on the decision boundary: both logits equal
    adv_logits, _ = logits_and_weights(binary_model, result.x_adv)
    np.testing.assert_allclose(adv_logits[:, 0], adv_logits[:, 1], atol=1e-4)


def test_binary_linear_linf_step_is_the_minimal_linf_perturbation(binary_model, interior):
    x = interior
    logits, w = logits_and_weights(binary_model, x)
    y = logits.argmax(1)
    direction = (w[:, 1 - y] - w[:, y]).T
    f = np.abs(logits[:, 0] - logits[:, 1])
    length = f / np.abs(direction).sum(1)  # the dual norm of L-inf is L1
    result = DeepFool(steps=1, overshoot=0.0, norm="inf")(binary_model, x, y)
    assert_interior(result.x_adv)
    delta = (result.x_adv - x).reshape(len(x), -1)
    np.testing.assert_allclose(delta, np.sign(direction) * length[:, None], atol=1e-5)
    np.testing.assert_allclose(result.linf, length, atol=1e-5)


def test_multiclass_linear_step_goes_to_the_nearest_candidate_boundary(four_class_model, interior):
    x = interior
    logits, w = logits_and_weights(four_class_model, x)
    y = logits.argmax(1)
    rows = np.arange(len(x))
    distance = np.full((len(x), 4), np.inf)
    for k in range(4):
        grad = (w[:, k][None] - w[:, y].T)
        f = np.abs(logits[:, k] - logits[rows, y])
        distance[:, k] = np.where(k == y, np.inf, f / np.maximum(np.linalg.norm(grad, axis=1), 1e-12))
    nearest = distance.min(1)
    result = DeepFool(steps=1, overshoot=0.0)(four_class_model, x, y)
    assert_interior(result.x_adv)
    np.testing.assert_allclose(result.l2, nearest, atol=1e-4)

    # candidates=2 only looks at the other class with the highest clean logit
    runner_up = np.where(np.arange(4)[None] == y[:, None], -np.inf, logits).argmax(1)
    top_only = DeepFool(steps=1, overshoot=0.0, candidates=2)(four_class_model, x, y)
    np.testing.assert_allclose(top_only.l2, distance[rows, runner_up], atol=1e-4)
    assert (distance[rows, runner_up] > nearest + 1e-3).any()  # so the test tells the two apart


def test_overshoot_scales_the_total_perturbation(four_class_model, interior):
    x = interior
    y = predicted(four_class_model, x)
    exact = DeepFool(steps=1, overshoot=0.0)(four_class_model, x, y)
    over = DeepFool(steps=1, overshoot=0.5)(four_class_model, x, y)
    assert_interior(over.x_adv)
    np.testing.assert_allclose(over.x_adv - x, 1.5 * (exact.x_adv - x), atol=1e-5)


def test_default_attack_fools_a_linear_model_and_flags_match_predictions(four_class_model, interior):
    x = interior
    y = predicted(four_class_model, x)
    result = DeepFool()(four_class_model, x, y)
    assert result.success.all()
    np.testing.assert_array_equal(result.success, predicted(four_class_model, result.x_adv) != y)


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_success_flag_matches_the_model_on_a_trained_cnn(digits, digits_classifier, norm):
    x, y = digits.x_test[:120], digits.y_test[:120]
    result = DeepFool(norm=norm)(digits_classifier, x, y)
    np.testing.assert_array_equal(result.success, predicted(digits_classifier, result.x_adv) != y)
    assert result.success.mean() >= 0.95
    delta = (result.x_adv - x).reshape(len(x), -1)
    np.testing.assert_allclose(result.linf, np.abs(delta).max(1), atol=1e-6)
    np.testing.assert_allclose(result.l2, np.linalg.norm(delta, axis=1), rtol=1e-5, atol=1e-6)


def test_misclassified_inputs_are_returned_unchanged(four_class_model, interior):
    x = interior
    y = (predicted(four_class_model, x) + 1) % 4  # every input is already misclassified
    result = DeepFool()(four_class_model, x, y)
    np.testing.assert_array_equal(result.x_adv, x)
    assert result.success.all()
    np.testing.assert_array_equal(result.l2, 0.0)


def test_early_stop_freezes_samples_at_their_first_success(digits, digits_classifier):
    x, y = digits.x_test[:64], digits.y_test[:64]
    full = DeepFool(steps=20)(digits_classifier, x, y)
    frozen_any = False
    for k in (1, 2, 3):
        at_k = DeepFool(steps=k)(digits_classifier, x, y)
        done = at_k.success
        frozen_any |= bool(done.any()) and not done.all()
        np.testing.assert_array_equal(full.x_adv[done], at_k.x_adv[done])
    assert frozen_any
    assert full.success.all()


@pytest.mark.parametrize("clip", [(0.0, 1.0), (0.25, 0.75)])
def test_results_stay_in_the_clip_range(four_class_model, clip):
    rng = np.random.default_rng(14)
    x = rng.uniform(*clip, (50, 6, 6, 1)).astype("float32")
    y = predicted(four_class_model, x)
    for norm in ("2", "inf"):
        result = DeepFool(norm=norm, clip=clip)(four_class_model, x, y)
        assert result.x_adv.min() >= clip[0] and result.x_adv.max() <= clip[1]
        np.testing.assert_array_equal(result.success, predicted(four_class_model, result.x_adv) != y)
    assert result.success.mean() > 0.5


def test_caller_arrays_are_not_modified(four_class_model, interior):
    x = interior.copy()
    y = predicted(four_class_model, x)
    x_copy, y_copy = x.copy(), y.copy()
    DeepFool()(four_class_model, x, y)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(y, y_copy)


def test_batching_and_padding_give_the_same_result_as_one_batch(digits, digits_classifier):
    x, y = digits.x_test[:23], digits.y_test[:23]
    whole = DeepFool()(digits_classifier, x, y, batch_size=64)
    pieces = DeepFool()(digits_classifier, x, y, batch_size=5)
    np.testing.assert_allclose(whole.x_adv, pieces.x_adv, atol=1e-5)
    np.testing.assert_array_equal(whole.success, pieces.success)


def test_params_rebuild_the_same_attack():
    attack = DeepFool(norm="Linf", steps=7, overshoot=0.1, candidates=3, clip=(0, 1), seed=2)
    params = attack.get_params()
    assert params == {"attack": "deepfool", "clip": [0.0, 1.0], "seed": 2, "norm": "inf", "steps": 7,
                      "overshoot": 0.1, "candidates": 3}
    assert DeepFool(**{k: v for k, v in params.items() if k != "attack"}) == attack


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be"),
        ({"steps": 2.5}, "steps must be"),
        ({"steps": True}, "steps must be"),
        ({"overshoot": -0.1}, "overshoot must be"),
        ({"overshoot": float("nan")}, "overshoot must be"),
        ({"overshoot": "0.02"}, "overshoot must be"),
        ({"candidates": 1}, "candidates must be"),
        ({"candidates": 3.0}, "candidates must be"),
        ({"norm": "1"}, "norm must be"),
        ({"clip": (1.0, 0.0)}, "clip must be"),
    ],
)
def test_bad_parameters_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepFool(**kwargs)


def test_targets_are_refused(four_class_model, interior):
    y = predicted(four_class_model, interior)
    for targets in ((y + 1) % 4, "random"):
        with pytest.raises(ValueError, match="untargeted"):
            DeepFool()(four_class_model, interior, y, targets=targets)
    assert DeepFool()(four_class_model, interior, y).targets is None


def test_bad_inputs_are_refused_at_call(four_class_model):
    with pytest.raises(ValueError, match="labels must lie"):
        DeepFool()(four_class_model, np.zeros((2, 6, 6, 1), "float32"), np.array([0, 4]))


@pytest.mark.slow  # MNIST: pytest -m slow
def test_deepfool_beats_pgd_l2_on_mnist(mnist, mnist_classifier):
    n = 1000 if keras.backend.backend() == "tensorflow" else 300
    x, y = mnist.x_test[:n], mnist.y_test[:n]
    start = time.perf_counter()
    deepfool = DeepFool()(mnist_classifier, x, y)
    seconds = time.perf_counter() - start
    pgd = PGD(eps=3.0, norm="2", steps=40)(mnist_classifier, x, y)
    both = deepfool.success & pgd.success
    median_deepfool, median_pgd = np.median(deepfool.l2[both]), np.median(pgd.l2[both])
    print(
        f"\nDeepFool on {n} MNIST images: success {deepfool.success_rate:.3f}, median L2 "
        f"{median_deepfool:.3f} vs PGD-L2 {median_pgd:.3f} (PGD success {pgd.success_rate:.3f}), "
        f"{seconds:.1f} s"
    )
    np.testing.assert_array_equal(deepfool.success, predicted(mnist_classifier, deepfool.x_adv) != y)
    assert deepfool.success_rate >= 0.99
    assert both.sum() >= 0.9 * n
    assert median_deepfool < median_pgd
