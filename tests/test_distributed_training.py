"""Adversarial training on several devices (`train_adversarial(devices=...)`, through
`foundation.backend.training_devices`): each device trains on its part of every batch, the model
learns as on one device, and the caller's model and callbacks see the trained weights.

A backend's device list is fixed when it starts, so each backend runs in a subprocess that makes two
CPU devices: TensorFlow splits the CPU into two logical devices (MirroredStrategy over them, as over
two GPUs), JAX gets two host devices from XLA_FLAGS (DataParallel over them). A pass-through layer
records, each time the model runs, which replica ran how many rows (TensorFlow) or how the input is
sharded (JAX): a model that learns alone would also learn if the devices were ignored.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from foundation.backend import training_devices

# shared by both scripts: digits, a tiny CNN with the recording layer, FGSM-RS training for 2 epochs
# of 768 images in batches of 64, and a callback that measures the caller's model after each epoch
# (as harden's early stopping does) with a prediction and a PGD attack
COMMON = """
import numpy as np, keras
from attacks import PGD
from training.adversarial import training_attack
from training.classifier import accuracy, train_adversarial
from training.data import load_dataset
seen = []
class Probe(keras.callbacks.Callback):
    def __init__(self, model, x, y):
        super().__init__()
        self.classifier, self.x, self.y, self.log = model, x, y, []
    def on_epoch_end(self, epoch, logs=None):
        success = PGD(eps=0.1, steps=3)(self.classifier, self.x, self.y).success_rate
        self.log.append((accuracy(self.classifier, self.x, self.y), success))
data = load_dataset("digits")
def fit(devices):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), Spy(), keras.layers.Conv2D(16, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    probe = Probe(model, data.x_test[:100], data.y_test[:100])
    seen.clear()
    trained = train_adversarial(data.x_train[:768], data.y_train[:768], 10, training_attack("fgsm_rs:eps=0.1", 0.3),
                                model=model, epochs=2, batch_size=64, learning_rate=3e-3, verbose=0,
                                devices=devices, callbacks=[probe])
    assert trained is model
    clean = accuracy(model, data.x_test, data.y_test)
    assert clean > 0.75, clean  # 0.87 measured, on one device as on two
    assert len(probe.log) == 2 and probe.log[-1][0] == accuracy(model, data.x_test[:100], data.y_test[:100]), probe.log
    return clean, set(seen)
def uneven():
    # 101 images in batches of 64: the last batch of 37 loses one image so that it splits evenly
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    attack = training_attack("fgsm_rs:eps=0.1", 0.3)
    train_adversarial(data.x_train[:101], data.y_train[:101], 10, attack, model=model, epochs=1, batch_size=64, verbose=0, devices=2)
    try:
        train_adversarial(data.x_train[:101], data.y_train[:101], 10, attack, model=model, batch_size=63, verbose=0, devices=2)
        raise AssertionError("a batch of 63 accepted on 2 devices")
    except ValueError as error:
        assert "batch_size 63 must be a multiple of the 2 devices" in str(error), error
"""

TF_SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from foundation.backend import training_devices
class Spy(keras.layers.Layer):
    def call(self, x):
        context = tf.distribute.get_replica_context()  # None in the cross-replica context
        replica = -1 if context is None else int(tf.get_static_value(context.replica_id_in_sync_group))
        seen.append((tf.distribute.has_strategy(), replica, x.shape[0]))
        return x
""" + COMMON + """
with training_devices(2) as strategy:
    assert isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync == 2
    assert tf.distribute.get_strategy() is strategy
assert not tf.distribute.has_strategy()
try:
    with training_devices(3):
        pass
    raise AssertionError("3 of 2 devices accepted")
except ValueError as error:
    assert "3 devices asked for, but only 2 exist" in str(error), error
one, seen_one = fit(1)
assert {under for under, _, _ in seen_one} == {False}, seen_one
two, seen_two = fit(2)
steps = {(replica, rows) for under, replica, rows in seen_two if under and replica >= 0 and rows in (32, 64)}
assert steps == {(0, 32), (1, 32)}, seen_two  # each replica ran half of every batch of 64 (the probe: 50 of 100)
assert abs(one - two) < 0.05, (one, two)
uneven()
print(f"replicas share the batch: clean accuracy {one:.4f} on one device, {two:.4f} on two")
"""

JAX_SCRIPT = """
import jax, keras
from foundation.backend import training_devices
assert len(jax.devices()) == 2, jax.devices()
class Spy(keras.layers.Layer):
    def call(self, x):
        def record(sharding, shape=x.shape):
            seen.append((len(sharding.device_set), sharding.shard_shape(shape)[0], shape[0]))
        jax.debug.inspect_array_sharding(x, callback=record)
        return x
""" + COMMON + """
with training_devices("all") as distribution:
    assert isinstance(distribution, keras.distribution.DataParallel) and distribution.device_mesh.devices.size == 2
    assert keras.distribution.distribution() is distribution
assert keras.distribution.distribution() is None
try:
    with training_devices(3):
        pass
    raise AssertionError("3 of 2 devices accepted")
except ValueError as error:
    assert "3 devices asked for, but only 2 exist" in str(error), error
one, seen_one = fit(1)
assert {(devices, rows) for devices, _, rows in seen_one if rows == 64} == {(1, 64)}, seen_one
two, seen_two = fit(2)
assert (2, 32, 64) in seen_two and (1, 64, 64) not in seen_two, seen_two  # every batch of 64 split 32 + 32
assert keras.distribution.distribution() is None
assert one == two, (one, two)  # one SPMD program: the same numbers as on one device
uneven()
print(f"the batch is sharded: clean accuracy {one:.4f} on one device, {two:.4f} on two")
"""


def run_script(script: str, backend: str, **env: str) -> str:
    environment = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                       TF_CPP_MIN_LOG_LEVEL="3", **env)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
def test_adversarial_training_under_mirrored_strategy_splits_each_batch():
    assert "replicas share the batch" in run_script(TF_SCRIPT, "tensorflow")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_adversarial_training_under_data_parallel_shards_each_batch():
    out = run_script(JAX_SCRIPT, "jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert "the batch is sharded" in out


def test_one_device_sets_nothing_and_bad_counts_are_refused():
    with training_devices(1) as distributed:
        assert distributed is None
    available = len(keras.distribution.list_devices())
    with pytest.raises(ValueError, match=f"{available + 1} devices asked for, but only {available} exist"):
        with training_devices(available + 1):
            pass
    for bad in (0, -2, "two", True, [], ["nowhere:7"]):
        with pytest.raises(ValueError, match="devices"):
            with training_devices(bad):
                pass


class Stop(Exception):
    """Raised by the stand-in for adversarial training, once it has seen its arguments."""


@pytest.mark.parametrize("command, module, given, expected", [
    ("train-classifier", "training.classifier_stage", ["--devices", "2"], 2),
    ("harden", "training.harden", ["--devices", "all"], "all"),
    ("harden", "training.harden", [], 1),
])
def test_cli_hands_devices_to_adversarial_training(command, module, given, expected, digits_classifier, tmp_path, monkeypatch):
    seen = {}

    def stand_in(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(f"{module}.train_adversarial", stand_in)
    from foundation.models import save_model
    from safetynet.cli import main

    model = save_model(digits_classifier, tmp_path / "c.keras")
    argv = (["train-classifier", "--adversarial", "fgsm_rs", "--out", str(tmp_path / "m.keras")] if command == "train-classifier"
            else ["harden", "--model", str(model), "--out", str(tmp_path / "guard")])
    with pytest.raises(Stop):
        main([*argv, *given])
    assert seen["devices"] == expected


@pytest.mark.parametrize("argv, message", [
    (["--devices", "0"], "expected a number of devices >= 1 or all, got '0'"),
    (["--devices", "two"], "expected a number of devices >= 1 or all, got 'two'"),
    (["--devices", "2"], "only adversarial training (adversarial=...) runs on several devices"),
])
def test_cli_refuses_bad_device_counts_in_one_line(argv, message, tmp_path, capsys):
    from safetynet.cli import main

    try:
        code = main(["train-classifier", "--out", str(tmp_path / "m.keras"), "--epochs", "1", *argv])
    except SystemExit as exit_:  # refused while parsing
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "m.keras").exists()
