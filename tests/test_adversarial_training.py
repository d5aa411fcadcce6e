"""Adversarial training on digits: robustness gained over standard training, mix and eps warm-up,
TRADES, training on stored adversarial datasets, the robustness report, saving as a plain model the
guard accepts, the CLI, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from attacks import PGD
from attacks.dataset import load_adversarial_dataset
from foundation.models import load_model, save_model
from detector.squeeze import SqueezeDetector
from safetynet.cli import main
from serving import Guard
from training.adversarial import (
    AdversarialTraining,
    mixed_batches,
    format_robustness,
    robustness_report,
    training_attack,
)
from training.classifier import (
    accuracy,
    compile_classifier,
    train_adversarial,
    train_on_adversarial_data,
)
from training.augmented import augmentation
from training.collapse import CollapseCheck, TrainingCollapsed
from training.workflow import attack_stage

EPS = 0.1


def robust_accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    correct = np.argmax(model.predict(x, verbose=0), axis=-1) == y
    return float((correct & ~PGD(eps=EPS, steps=10, restarts=2)(model, x, y).success).mean())


def linear_model() -> keras.Model:
    """No dropout, so two copies train identically."""
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])


@pytest.fixture(scope="module")
def robust_model(digits) -> keras.Model:
    """The reference CNN trained 6 epochs with FGSM-RS at eps 0.1 (a few seconds)."""
    attack = training_attack(f"fgsm_rs:eps={EPS}", 0.3)
    return train_adversarial(digits.x_train, digits.y_train, digits.num_classes, attack, epochs=6, batch_size=64, verbose=0)


@pytest.fixture(scope="module")
def stored_pgd(digits, digits_classifier, tmp_path_factory) -> Path:
    """A PGD dataset of 256 training images, as written by `safetynet attack`."""
    root = tmp_path_factory.mktemp("stored")
    save_model(digits_classifier, root / "classifier.keras")
    attack_stage(root / "classifier.keras", digits, f"pgd:eps={EPS},steps=5", root / "pgd", n=256, shard_size=100, log=lambda _: None)
    return root / "pgd"


def test_adversarial_training_raises_robust_accuracy_by_a_clear_margin(digits, digits_classifier, robust_model):
    standard = robust_accuracy(digits_classifier, digits.x_test, digits.y_test)
    robust = robust_accuracy(robust_model, digits.x_test, digits.y_test)
    clean = float(np.mean(np.argmax(robust_model.predict(digits.x_test, verbose=0), -1) == digits.y_test))
    assert robust > standard + 0.15, (standard, robust)
    assert clean > 0.9


def test_fgsm_rs_is_one_step_of_one_and_a_quarter_eps_from_a_random_start():
    attack = training_attack("fgsm_rs:eps=0.2", 0.3)
    assert (attack.steps, attack.random_start, attack.step_size, attack.relative_step()) == (1, True, None, 1.25)
    assert attack._budget(np.arange(2), {})["step"] == pytest.approx([0.25, 0.25])
    assert training_attack("fgsm-rs", 0.3).eps == 0.3
    assert training_attack("fgsm_rs:step_size=0.1", 0.3).step_size == 0.1


def test_a_training_attack_with_eps_min_is_refused_not_ignored():
    with pytest.raises(ValueError, match="eps_min draws a radius per image for datasets"):
        training_attack("pgd:eps=0.3,eps_min=0.05", 0.3)


def test_mix_zero_is_standard_training_step(digits):
    x, y = digits.x_train[:32], digits.y_train[:32]
    plain, adversarial = linear_model(), linear_model()
    compile_classifier(plain).train_on_batch(x, y)
    trainer = compile_classifier(AdversarialTraining(adversarial, PGD(eps=EPS, steps=3), mix=0.0))
    trainer.train_on_batch(x, y)
    for a, b in zip(plain.get_weights(), adversarial.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_mix_replaces_that_fraction_of_each_batch(digits):
    x, y = digits.x_train[:10], digits.y_train[:10]
    trainer = AdversarialTraining(linear_model(), PGD(eps=EPS, steps=3), mix=0.5)
    x_train, y_train, _ = (keras.ops.convert_to_numpy(v) if v is not None else v for v in trainer.adversarial_batch(x, y))
    changed = np.abs(x_train - x).reshape(10, -1).max(axis=1)
    assert (changed[:5] > 0).all() and (changed[5:] == 0).all() and changed.max() <= EPS + 1e-6
    np.testing.assert_array_equal(y_train, y)


def test_eps_ramps_up_linearly_over_the_warmup_steps(digits):
    x, y = digits.x_train[:16], digits.y_train[:16]
    trainer = compile_classifier(AdversarialTraining(linear_model(), PGD(eps=EPS, steps=5), warmup_steps=10))
    for iterations, fraction in ((0, 0.1), (4, 0.5), (30, 1.0)):
        trainer.optimizer.iterations.assign(iterations)
        x_adv = keras.ops.convert_to_numpy(trainer.adversarial_batch(x, y)[0])
        size = np.abs(x_adv - x).max()
        assert fraction * EPS * 0.9 < size <= fraction * EPS + 1e-6, (iterations, size)


def zero_filled_shifts(image: np.ndarray, reach: int) -> list[np.ndarray]:
    """Every move of `image` by whole pixels within `reach` down and across, zeros filling in."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((reach, reach), (reach, reach), (0, 0)))
    return [padded[reach + down: reach + down + height, reach + across: reach + across + width]
            for down in range(-reach, reach + 1) for across in range(-reach, reach + 1)]


def test_augment_shifts_each_image_before_its_attack(digits):
    """The attack perturbs the shifted image the step trains on: each adversarial row lies within eps
    of a one-pixel shift of its clean image, and some lie farther than eps from the unshifted one."""
    x, y = digits.x_train[:64], digits.y_train[:64]
    shifts = augmentation(digits.input_shape, shift=1, seed=0)
    trainer = AdversarialTraining(linear_model(), PGD(eps=EPS, steps=3), augment=shifts)
    x_adv = keras.ops.convert_to_numpy(trainer.adversarial_batch(x, y)[0])
    nearest = [min(np.abs(row - moved).max() for moved in zero_filled_shifts(image, 1)) for row, image in zip(x_adv, x)]
    assert max(nearest) <= EPS + 1e-6
    assert (np.abs(x_adv - x).reshape(64, -1).max(axis=1) > EPS + 1e-3).mean() > 0.3  # 8 of 9 draws move the image
    plain = AdversarialTraining(linear_model(), PGD(eps=EPS, steps=3), augment=shifts, mix=0.0)
    moved = keras.ops.convert_to_numpy(plain.adversarial_batch(x, y)[0])
    assert all(any(np.array_equal(row, m) for m in zero_filled_shifts(image, 1)) for row, image in zip(moved, x))


def test_train_adversarial_with_shifts_and_sgd(digits):
    model = train_adversarial(digits.x_train[:256], digits.y_train[:256], 10, PGD(eps=EPS, steps=2), model=linear_model(),
                              epochs=1, batch_size=64, learning_rate=0.05, augment=True, optimizer="sgd", verbose=0)
    assert np.isfinite(model.predict(digits.x_test[:8], verbose=0)).all()
    optimizer = compile_classifier(linear_model(), 0.05, "sgd").optimizer
    assert isinstance(optimizer, keras.optimizers.SGD) and optimizer.nesterov and optimizer.weight_decay == 5e-4
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop': expected one of adam, sgd"):
        compile_classifier(linear_model(), 1e-3, "rmsprop")


def test_ema_gives_the_model_the_moving_average_of_the_trained_weights(digits):
    model, seen = linear_model(), []

    class Watch(keras.callbacks.Callback):  # one step an epoch: the weights trained, and those the model holds
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seen.append((self.model.classifier.get_weights(), model.get_weights()))

    returned = train_adversarial(digits.x_train[:64], digits.y_train[:64], 10, PGD(eps=EPS, steps=2), model=model, epochs=4,
                                 batch_size=64, learning_rate=0.05, ema=0.5, callbacks=[Watch()], verbose=0)
    average = None
    for trained, held in seen:  # Keras's EMA: the first step's weights, then 0.5 old + 0.5 new
        average = trained if average is None else [0.5 * a + 0.5 * t for a, t in zip(average, trained, strict=True)]
        for a, h in zip(average, held, strict=True):
            np.testing.assert_allclose(h, a, rtol=1e-5, atol=1e-6)
    assert not np.allclose(seen[-1][0][0], seen[-1][1][0])  # the average, not the last weights
    assert returned is model and all(np.allclose(a, r) for a, r in zip(average, model.get_weights(), strict=True))
    with pytest.raises(ValueError, match=r"ema must be a momentum in \(0, 1\)"):
        train_adversarial(digits.x_train[:64], digits.y_train[:64], 10, PGD(eps=EPS), model=linear_model(), ema=1.0, verbose=0)


def test_trades_trains_on_clean_and_adversarial_rows(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    trainer = compile_classifier(AdversarialTraining(linear_model(), PGD(eps=EPS, steps=3), trades_beta=6.0))
    x_train, y_train, _ = trainer.adversarial_batch(x[:8], y[:8])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(x_train)[:8], x[:8])
    assert keras.ops.convert_to_numpy(y_train).tolist() == [*y[:8], *y[:8]]
    history = trainer.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    assert np.isfinite(history["loss"]).all() and history["loss"][1] < history["loss"][0]


def test_saved_robust_model_is_a_plain_keras_model_the_guard_accepts(digits, robust_model, tmp_path):
    path = save_model(robust_model, tmp_path / "robust.keras")
    loaded = load_model(path)
    assert isinstance(loaded, keras.Model) and not isinstance(loaded, AdversarialTraining)
    np.testing.assert_allclose(loaded.predict(digits.x_test[:8], verbose=0), robust_model.predict(digits.x_test[:8], verbose=0), atol=1e-5)
    guard = Guard(loaded, SqueezeDetector(loaded).calibrate(digits.x_train[:200], 0.05))
    result = guard.predict(digits.x_test[:8])
    assert result.labels.shape == (8,) and result.rejected.shape == (8,)


def test_robustness_report_has_pgd_and_cw(digits, robust_model):
    report = robustness_report(robust_model, digits.x_test[:60], digits.y_test[:60], eps=EPS, steps=10, restarts=2, cw_n=10)
    assert report["n"] == 60 and report["pgd"]["attack"]["restarts"] == 2 and report["cw"]["n"] == 10
    assert 0 <= report["pgd"]["robust_accuracy"] <= report["clean_accuracy"] <= 1
    suite = ("pgd", "apgd_ce", "apgd_dlr", "apgd_dlr_targeted")
    assert report["robust_accuracy"] <= min(report[name]["robust_accuracy"] for name in suite)  # the worst case per input
    assert report["robust_accuracy"] < report["clean_accuracy"] and report["strongest"] in suite
    assert "worst case over the suite" in format_robustness(report)
    assert report["cw"]["robust_accuracy"] <= 1 and json.dumps(report)
    assert report["apgd_dlr_targeted"]["target_classes"] == 9 and "targeted-10 at 9 classes" in format_robustness(report)


def test_robustness_report_targets_each_likely_class_in_turn(digits, robust_model):
    """Targeted APGD-DLR at more of the likely other classes breaks at least as many inputs as at
    the most likely one alone, and strictly more on this model (as the adaptive suite's targeting)."""
    x, y = digits.x_test[:120], digits.y_test[:120]
    one, three = (robustness_report(robust_model, x, y, eps=EPS, steps=10, restarts=1, target_classes=k, cw_n=0)
                  for k in (1, 3))
    assert three["apgd_dlr_targeted"]["robust_accuracy"] < one["apgd_dlr_targeted"]["robust_accuracy"]
    with pytest.raises(ValueError, match="target_classes must be an integer >= 1, got 0"):
        robustness_report(robust_model, x, y, eps=EPS, target_classes=0)


def test_training_on_a_stored_adversarial_dataset(digits, stored_pgd):
    stored = load_adversarial_dataset(stored_pgd)
    batch_x, batch_y = next(iter(mixed_batches(digits.x_train, digits.y_train, [stored_pgd], mix=0.25, batch_size=8)))
    batch_x, batch_y = batch_x.numpy(), batch_y.numpy()
    assert batch_x.shape == (8, 8, 8, 1)
    for image, label in zip(batch_x[6:], batch_y[6:], strict=True):  # the last quarter: stored examples, true labels
        match = np.flatnonzero(np.abs(stored.x_adv - image).reshape(len(stored.x_adv), -1).max(axis=1) < 1e-6)
        assert len(match) and stored.y[match[0]] == label
    model = train_on_adversarial_data(digits.x_train, digits.y_train, digits.num_classes, [stored_pgd, stored_pgd], epochs=3, batch_size=32, verbose=0)
    before = np.mean(~stored.success)  # the attacked classifier's accuracy on them
    assert np.mean(np.argmax(model.predict(stored.x_adv, verbose=0), -1) == stored.y) > before + 0.15


def test_cli_trains_adversarially_and_on_stored_data(stored_pgd, tmp_path, capsys):
    out = tmp_path / "at.keras"
    assert main(["train-classifier", "--adversarial", f"fgsm_rs:eps={EPS}", "--eps-warmup", "0.5", "--epochs", "1", "--batch-size", "256", "--robust-n", "20", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "at.robustness.json").read_text())
    assert report["n"] == 20 and report["eps"] == pytest.approx(EPS) and {"pgd", "cw"} <= set(report)
    assert "robust accuracy" in capsys.readouterr().out
    out = tmp_path / "mixed.keras"
    assert main(["train-classifier", "--adversarial-data", str(stored_pgd), "--mix", "0.5", "--epochs", "1", "--batch-size", "256", "--robust-n", "0", "--out", str(out)]) == 0
    assert load_model(out).output_shape == (None, 10) and not (tmp_path / "mixed.robustness.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--adversarial", "pgd:eps=1.5"], "eps must lie in [0, 1.0]"),
    (["--adversarial", "pgd:eps"], "cannot parse attack spec"),
    (["--adversarial", "cw"], "gradient-sign attack"),
    (["--adversarial", "pgd", "--mix", "1.5"], "mix must lie in [0, 1]"),
    (["--adversarial", "pgd", "--adversarial-data", "somewhere"], "not both"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main(["train-classifier", "--out", str(tmp_path / "m.keras"), "--epochs", "1", *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "m.keras").exists()


def test_bad_python_input_is_a_value_error(stored_pgd):
    frozen = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()])
    with pytest.raises(ValueError, match="no trainable weights"):
        AdversarialTraining(frozen, PGD(eps=EPS))
    with pytest.raises(ValueError, match="TRADES"):
        AdversarialTraining(linear_model(), PGD(eps=EPS), mix=0.5, trades_beta=1.0)
    with pytest.raises(ValueError, match="no adversarial datasets"):
        train_on_adversarial_data(np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, int), 10, [], verbose=0)
    with pytest.raises(ValueError, match="holds images of shape"):
        train_on_adversarial_data(np.zeros((4, 6, 6, 1), "float32"), np.zeros(4, int), 10, [stored_pgd], verbose=0)


JAX_SCRIPT = """
import numpy as np, keras
from attacks import PGD
from training.adversarial import AdversarialTraining
from training.classifier import compile_classifier
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(), keras.layers.Dense(3)])
trainer = compile_classifier(AdversarialTraining(model, PGD(eps=0.1, steps=2), warmup_steps=4, mix=0.5))
x = np.random.default_rng(0).uniform(0, 1, (64, 8, 8, 1)).astype("float32")
seed = keras.ops.convert_to_numpy(trainer.noise_seed.state).copy()
history = trainer.fit(x, np.arange(64) % 3, epochs=1, batch_size=16, verbose=0).history
assert np.isfinite(history["loss"]).all() and int(trainer.optimizer.iterations.numpy()) == 4
assert (keras.ops.convert_to_numpy(trainer.noise_seed.state) != seed).any()
import warnings
from training.augmented import augmentation
shifts = augmentation((8, 8, 1), shift=1, seed=0)
moving = compile_classifier(AdversarialTraining(model, PGD(eps=0.1, steps=2), augment=shifts), 0.05, "sgd")
start = keras.ops.convert_to_numpy(shifts.generator.state).copy()
with warnings.catch_warnings():
    warnings.simplefilter("error")  # Keras warns of unbuilt state if the shift layer is left unbuilt
    moving.fit(x, np.arange(64) % 3, epochs=1, batch_size=16, verbose=0)
assert (keras.ops.convert_to_numpy(shifts.generator.state) != start).any()  # new shifts every step
print("jax trains")
"""


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="the in-process tests already run on JAX")
def test_train_step_runs_on_jax():
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(Path(__file__).resolve().parents[1]), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jax trains" in result.stdout


def test_collapsed_adversarial_training_stops_and_says_what_to_change(digits):
    """A learning rate far too high drives clean accuracy to chance: training stops after two such
    epochs instead of handing a useless model to the next stage."""
    attack = training_attack("pgd:eps=0.3,steps=2", 0.3)
    with pytest.raises(TrainingCollapsed, match=r"collapsed: clean accuracy .* after epoch 2 \(chance 10%\); .*--eps-warmup 5.*"
                                                 r"lower the learning rate \(2 -> 0.67\); or a smaller eps"):
        train_adversarial(digits.x_train, digits.y_train, 10, attack, epochs=4, batch_size=16, learning_rate=2.0, verbose=0)


@pytest.mark.slow
def test_pgd_training_without_warmup_collapses_and_stops(mnist):
    """The setting that collapsed on a GPU (MNIST, PGD at eps 0.3 from the first step, no eps
    warm-up), on 4,000 images: clean accuracy sits at chance, and training stops at the first two
    judged epochs with advice; the same run with the advised warm-up learns instead."""
    x, y = mnist.x_train[:4000], mnist.y_train[:4000]
    attack = training_attack("pgd:eps=0.3,steps=10", 0.3)
    with pytest.raises(TrainingCollapsed, match=r"clean accuracy 1\d\.\d% after epoch 3 \(chance 10%\); ramp eps up .*--eps-warmup 5"):
        train_adversarial(x, y, 10, attack, epochs=6, batch_size=128, verbose=0)
    model = train_adversarial(x, y, 10, attack, epochs=3, batch_size=128, warmup_epochs=5.0, verbose=0)
    assert accuracy(model, mnist.x_test[:1000], mnist.y_test[:1000]) > 0.8


class ScriptedCheck(CollapseCheck):
    """The collapse rule on a scripted sequence of clean accuracies."""

    def __init__(self, accuracies, **kwargs):
        super().__init__(None, np.zeros((1, 8, 8, 1)), [0], 10, min_steps=0, **kwargs)
        self.accuracies = iter(accuracies)

    def clean_accuracy(self):
        return next(self.accuracies)


@pytest.mark.parametrize("accuracies, start, raised_at", [
    ([0.15, 0.6, 0.15, 0.9], None, None),  # one bad epoch at a time is not a collapse
    ([0.5, 0.19, 0.11], None, 3),  # near chance twice running
    ([0.97, 0.5, 0.45], 0.98, 3),  # a pretrained model fell 40+ points, twice running
    ([0.97, 0.8, 0.75], 0.98, None),  # adversarial training costs clean accuracy; not a collapse
])
def test_collapse_rule(accuracies, start, raised_at):
    """Near chance, or a pretrained model's large drop, two epochs running stops training."""
    check = ScriptedCheck(accuracies, start_accuracy=start)
    for epoch in range(len(accuracies)):
        if raised_at == epoch + 1:
            with pytest.raises(TrainingCollapsed, match=f"after epoch {epoch + 1}"):
                check.on_epoch_end(epoch)
            return
        check.on_epoch_end(epoch)
    assert raised_at is None


def test_epochs_before_min_steps_are_not_judged():
    """A new model that has taken only a few optimizer steps is at chance because it has barely
    trained: only epochs after `min_steps` steps count towards a collapse."""
    check = ScriptedCheck([0.1] * 5)
    check.min_steps = 25
    for epoch in range(3):  # 10 steps an epoch: epochs 1 and 2 are not judged, epoch 3 is the first
        for batch in range(10):
            check.on_train_batch_end(batch)
        check.on_epoch_end(epoch)
    assert check.history == [0.1]
    for batch in range(10):
        check.on_train_batch_end(batch)
    with pytest.raises(TrainingCollapsed, match="after epoch 4"):
        check.on_epoch_end(3)
