"""Data-parallel attacks over several devices split each batch across the replicas and give the same
results as one device.

TensorFlow's device list is fixed at start-up, so the check runs in a subprocess that splits the CPU
into two logical devices and uses MirroredStrategy over them, as it would over two GPUs. A pass-through
layer in the model records, each time the model is traced, whether a strategy runs it, which replica
and how many rows: equal results alone would also hold if the strategy were ignored.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

SCRIPT = """
import sys, numpy as np, tensorflow as tf, keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from attacks import PGD
from attacks.dataset import ArraySource, generate_dataset, load_adversarial_dataset
seen = []
class Spy(keras.layers.Layer):
    def call(self, x):
        replica = tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group)
        seen.append((tf.distribute.has_strategy(), int(replica), x.shape[0]))
        return x
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((8, 8, 1)), Spy(), keras.layers.Conv2D(4, 3), keras.layers.Flatten(), keras.layers.Dense(5)])
x = np.random.default_rng(0).uniform(0, 1, (37, 8, 8, 1)).astype("float32")
y = np.arange(37) % 5
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
attack = PGD(eps=0.1, steps=5, restarts=2)
seen.clear()
one = attack(model, x, y, batch_size=16)
assert set(seen) == {(False, 0, 16)}, seen
seen.clear()
two = attack(model, x, y, batch_size=15, strategy=strategy)  # 15 rounds up to 16: 8 rows a replica
assert set(seen) == {(True, 0, 8), (True, 1, 8)}, seen
assert np.abs(one.x_adv - two.x_adv).max() < 1e-6 and (one.success == two.success).all()
generate_dataset(model, attack, ArraySource(x, y), sys.argv[1] + "/one", shard_size=10, strategy=None, progress=False)
seen.clear()
generate_dataset(model, attack, ArraySource(x, y), sys.argv[1] + "/two", shard_size=10, strategy=strategy, progress=False)
assert {(under, replica) for under, replica, _ in seen} == {(True, 0), (True, 1)}, seen
a, b = load_adversarial_dataset(sys.argv[1] + "/one"), load_adversarial_dataset(sys.argv[1] + "/two")
assert np.abs(a.x_adv - b.x_adv).max() < 1e-6
print("replicas agree")
"""


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute needs the TensorFlow backend")
def test_mirrored_strategy_over_two_devices_matches_one_device(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas agree" in result.stdout
