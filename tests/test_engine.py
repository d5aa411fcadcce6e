"""The attack engine's contract: runtime budgets (a new eps compiles nothing; one value per input;
overrides at call), the loss hook, device-resident inputs, and bad budgets refused at call."""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from attacks import BIM, FGSM, MIFGSM, PGD
from attacks.base import _compiled
from attacks.engine import Plan, ascend
from attacks.objectives import CrossEntropy, Margin, Objective


@pytest.fixture(scope="module")
def model(linear_model_factory) -> keras.Model:
    return linear_model_factory(11)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.uniform(0.3, 0.7, (12, 6, 6, 1)).astype("float32"), rng.integers(0, 4, 12)


def batch_functions(model: keras.Model) -> list[tuple]:
    return [key for key in _compiled.get(model, {}) if key[1] == "batch"]


def test_eight_eps_values_share_one_compiled_loop(linear_model_factory, batch):
    model = linear_model_factory(12)
    x, y = batch
    for eps in np.linspace(0.01, 0.2, 8):
        result = PGD(eps=float(eps), steps=3)(model, x, y)
        assert np.abs(result.x_adv - x).max() <= eps + 1e-6
    for eps in (0.05, 0.1):  # as a call-time override of one attack object
        PGD(eps=0.3, steps=3)(model, x, y, eps=eps)
    assert len(batch_functions(model)) == 1
    PGD(eps=0.1, steps=4)(model, x, y)  # another structure: another function
    assert len(batch_functions(model)) == 2


def test_a_call_time_eps_equals_an_attack_built_with_it(model, batch):
    x, y = batch
    built = PGD(eps=0.07, steps=4, seed=1)(model, x, y)
    overridden = PGD(eps=0.2, steps=4, seed=1)(model, x, y, eps=0.07)
    np.testing.assert_allclose(overridden.x_adv, built.x_adv, atol=1e-6)


def test_per_sample_eps_bounds_each_input_by_its_own_radius(model, batch):
    x, y = batch
    eps = np.linspace(0.0, 0.22, len(x))
    result = BIM(eps=0.1, steps=5)(model, x, y, eps=eps, batch_size=5)
    assert np.all(result.linf <= eps + 1e-6)
    np.testing.assert_allclose(result.linf[eps > 0.05], eps[eps > 0.05], atol=1e-6)  # the step reaches the radius
    for i in (3, 11):  # each row as if attacked alone at its own eps
        alone = BIM(eps=float(eps[i]), steps=5)(model, x[i : i + 1], y[i : i + 1])
        np.testing.assert_allclose(result.x_adv[i], alone.x_adv[0], atol=1e-6)


def test_relative_steps_follow_eps_and_absolute_steps_do_not(model, batch):
    x, y = batch
    relative = PGD(eps=0.2, steps=1, rel_stepsize=0.5)
    assert relative._budget(np.arange(2), {"eps": 0.1})["step"] == pytest.approx([0.05, 0.05])
    absolute = PGD(eps=0.2, steps=1, step_size=0.03)
    assert absolute._budget(np.arange(2), {"eps": 0.1})["step"] == pytest.approx([0.03, 0.03])
    assert absolute._budget(np.arange(2), {"rel_stepsize": 1.0})["step"] == pytest.approx([0.2, 0.2])
    assert PGD(eps=0.2, steps=8)._budget(np.arange(1), {})["step"] == pytest.approx([2.5 * 0.2 / 8])
    one_step = BIM(eps=0.1, steps=1, rel_stepsize=1.0)(model, x, y, eps=0.04)
    np.testing.assert_allclose(one_step.linf, 0.04, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": -0.1}, "eps must be finite and >= 0"),
        ({"eps": float("nan")}, "eps must be finite and >= 0"),
        ({"eps": 1.5}, r"eps must lie in \[0, 1.0\]"),
        ({"eps": np.full(5, 0.1)}, r"eps must be a number or one value per input \(12\)"),
        ({"step_size": -1.0}, "step_size must be finite"),
        ({"momentum": float("inf")}, "momentum must be finite"),
        ({"step_size": 0.1, "rel_stepsize": 0.5}, "not both"),
        ({"steps": 3}, r"takes no call-time budget \['steps'\]"),
    ],
)
def test_bad_budgets_are_refused_at_call(model, batch, kwargs, message):
    x, y = batch
    with pytest.raises(ValueError, match=message):
        PGD(eps=0.1, steps=2)(model, x, y, **kwargs)


def test_fgsm_takes_only_eps_at_call(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"fgsm takes no call-time budget \['step_size'\]; it takes \['eps'\]"):
        FGSM(eps=0.1)(model, x, y, step_size=0.2)


def test_call_time_momentum_zero_is_bim(model, batch):
    x, y = batch
    bim = BIM(eps=0.1, steps=4)(model, x, y)
    np.testing.assert_allclose(MIFGSM(eps=0.1, steps=4)(model, x, y, momentum=0.0).x_adv, bim.x_adv, atol=1e-6)


def test_the_margin_loss_is_a_hook_and_success_is_judged_by_it(digits, digits_classifier):
    x, y = digits.x_test[:60], digits.y_test[:60]
    ce = PGD(eps=0.08, steps=10)(digits_classifier, x, y)
    margin = PGD(eps=0.08, steps=10, loss="margin")(digits_classifier, x, y)
    predicted = np.argmax(digits_classifier.predict(margin.x_adv, verbose=0), axis=-1)
    np.testing.assert_array_equal(margin.success, predicted != y)
    assert margin.success.mean() >= ce.success.mean() - 0.05
    assert PGD(eps=0.1, loss=Margin(confidence=2.0)).get_params()["loss"] == "Margin(confidence=2.0)"
    with pytest.raises(ValueError, match="loss must be one of"):
        PGD(eps=0.1, loss="hinge")


@dataclasses.dataclass(frozen=True)
class TowardsZero(Objective):
    """A hook of a user's own: push logit 0 up, whatever the label."""

    def evaluate(self, outputs, goal, targeted, context, weight):
        value = outputs[:, 0]
        return value, keras.ops.zeros_like(value, dtype="int32"), -value


def test_a_custom_objective_drives_the_steps(model, batch):
    x, y = batch
    result = BIM(eps=0.1, steps=3, loss=TowardsZero())(model, x, y)
    before = keras.ops.convert_to_numpy(model(x))[:, 0]
    after = keras.ops.convert_to_numpy(model(result.x_adv))[:, 0]
    assert np.all(after > before)


def test_backend_arrays_stay_on_the_device_and_match_numpy(model, batch):
    x, y = batch
    numpy_result = PGD(eps=0.1, steps=3)(model, x, y, batch_size=5)
    device_result = PGD(eps=0.1, steps=3)(model, keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y), batch_size=5)
    assert keras.ops.is_tensor(device_result.x_adv) and not isinstance(device_result.x_adv, np.ndarray)
    assert keras.ops.is_tensor(device_result.success)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(device_result.x_adv), numpy_result.x_adv, atol=1e-6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(device_result.success), numpy_result.success)
    assert device_result.success_rate == numpy_result.success_rate
    with pytest.raises(ValueError, match="NaN or infinite"):
        PGD(eps=0.1)(model, keras.ops.convert_to_tensor(np.full_like(x, np.nan)), y)
    with pytest.raises(ValueError, match="must lie in"):
        PGD(eps=0.1)(model, keras.ops.convert_to_tensor(x + 1.0), y)


def test_ascend_keeps_the_best_iterate_when_asked(model, batch):
    """keep_best returns an iterate at least as good as the last one, by the objective's rank."""
    x, y = keras.ops.convert_to_tensor(batch[0]), batch[1]
    plan = Plan(CrossEntropy(), steps=6, keep_best=True)
    forward = lambda z: model(z)  # noqa: E731
    n = len(x)
    eps, step, momentum = np.full(n, 0.05, "float32"), np.full(n, 0.2, "float32"), np.zeros(n, "float32")
    best, success = ascend(forward, plan, x, y.astype("int32"), None, eps, step, momentum, None, False)
    last, _ = ascend(forward, dataclasses.replace(plan, keep_best=False), x, y.astype("int32"), None, eps, step, momentum, None, False)
    fooled_best = np.argmax(keras.ops.convert_to_numpy(model(best)), -1) != y
    fooled_last = np.argmax(keras.ops.convert_to_numpy(model(last)), -1) != y
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(success), fooled_best)
    assert np.all(fooled_best >= fooled_last)


def test_adaptive_lambdas_are_runtime_and_per_input(digits, digits_classifier):
    """One lambda per input and restart: each row as if attacked alone with its own lambdas."""
    from attacks.adaptive import AdaptivePGD, joint_model

    scorer = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    joint = joint_model(digits_classifier, scorer)
    x, y = digits.x_test[:6], digits.y_test[:6]
    attack = AdaptivePGD(eps=0.2, threshold=0.0, steps=5, lambdas=(1.0, 1.0))
    lambdas = np.array([[0.0, 0.0], [50.0, 50.0]] * 3)
    together = attack(joint, x, y, lambdas=lambdas)
    for i in (0, 1):
        alone = attack(joint, x[i : i + 1], y[i : i + 1], lambdas=lambdas[i])
        np.testing.assert_allclose(together.x_adv[i], alone.x_adv[0], atol=1e-6)
    scores = keras.ops.convert_to_numpy(scorer(together.x_adv)).reshape(-1)
    assert scores[1::2].mean() < scores[0::2].mean()  # the weight pushes the score down
    assert len([k for k in _compiled[joint] if k[1] == "batch"]) == 1
    with pytest.raises(ValueError, match="lambdas must hold 2 finite weights"):
        attack(joint, x, y, lambdas=[1.0, -1.0])


def test_dlr_is_the_scale_invariant_margin():
    """DLR (Croce & Hein 2020) on known logits, untargeted and targeted; scaling the logits changes nothing."""
    from attacks.objectives import dlr

    logits = np.array([[4.0, 1.0, 3.0, 0.0, -1.0]], "float32")
    goal = np.array([0], "int32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dlr(logits, goal, False)), [(3.0 - 4.0) / (4.0 - 1.0)])
    target = np.array([2], "int32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dlr(logits, target, True)), [(3.0 - 4.0) / (4.0 - 0.5)])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dlr(10 * logits, goal, False)), [-1 / 3], rtol=1e-6)


def test_pgd_on_dlr_fools_a_trained_cnn(digits, digits_classifier):
    x, y = digits.x_test[:60], digits.y_test[:60]
    result = PGD(eps=0.2, steps=10, loss="dlr")(digits_classifier, x, y)
    assert result.success.mean() > 0.8


def test_eps_min_draws_each_inputs_radius_from_its_own_generator(model, batch):
    """eps_min: one log-uniform radius per input in [eps_min, eps], fixed by (seed, index), so a
    dataset split into shards gets the same radii; a call's eps replaces the draw."""
    x, y = batch
    attack = BIM(eps=0.2, eps_min=0.02, steps=4, rel_stepsize=0.5)
    result = attack(model, x, y, batch_size=5)
    radii = attack._eps(np.arange(len(x)))
    assert np.all((radii >= 0.02) & (radii <= 0.2)) and np.ptp(radii) > 0.05
    assert np.all(result.linf <= radii + 1e-6)
    np.testing.assert_allclose(result.linf, radii, atol=1e-6)  # 4 steps of half the radius reach it
    shard = attack(model, x[7:], y[7:], index=np.arange(7, len(x)))
    np.testing.assert_allclose(shard.x_adv, result.x_adv[7:], atol=1e-6)
    np.testing.assert_allclose(attack(model, x, y, eps=0.05).linf, 0.05, atol=1e-6)
    assert BIM(eps=0.2, eps_min=0.02, steps=4, seed=1)._eps(np.arange(3)).tolist() != radii[:3].tolist()


@pytest.mark.parametrize("eps_min, message", [(0.3, r"eps_min must be at most eps \(0.2\)"), (0.0, "eps_min")])
def test_an_eps_min_outside_zero_to_eps_is_refused(eps_min, message):
    with pytest.raises(ValueError, match=message):
        PGD(eps=0.2, eps_min=eps_min)
