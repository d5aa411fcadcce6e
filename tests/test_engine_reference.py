"""The attack engine's outputs against outputs recorded before it was rewritten (one compiled engine
with runtime budgets and a loss hook): PGD, MI-FGSM, PGD-L2 with restarts, the adaptive attack,
TRADES and eps warm-up batches in adversarial training, and the demo's FGSM and PGD.

The recording is `tests/data/engine_reference.npz`, written by the code before the rewrite with
`python tests/test_engine_reference.py` (weights are stored with it, so it needs no training and
holds on every backend). Sign steps turn float-rounding differences in a gradient near zero into a
whole step, so images are compared pixel by pixel with a small allowance, success flags exactly.
"""
from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest

REFERENCE = Path(__file__).resolve().parent / "data" / "engine_reference.npz"
N = 48


def reference_models(weights: dict[str, np.ndarray] | None = None) -> tuple[keras.Model, keras.Model]:
    """A small digits CNN and a score model (images -> one score), from stored or seeded weights."""
    keras.utils.set_random_seed(3)
    classifier = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(10),
    ], name="reference_cnn")
    scorer = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="tanh"), keras.layers.Flatten(),
        keras.layers.Dense(1),
    ], name="reference_scorer")
    if weights is not None:
        for name, model in (("classifier", classifier), ("scorer", scorer)):
            model.set_weights([weights[f"{name}_w{i}"] for i in range(len(model.weights))])
    return classifier, scorer


def reference_outputs(classifier: keras.Model, scorer: keras.Model) -> dict[str, np.ndarray]:
    """Every engine user's output on the first N digits test images."""
    from attacks import MIFGSM, PGD
    from attacks.adaptive import AdaptivePGD, joint_model
    from serving.demo_engine import DemoEngine
    from training.adversarial import AdversarialTraining, training_attack
    from training.data import load_dataset

    digits = load_dataset("digits")
    x, y = digits.x_test[:N], digits.y_test[:N]
    out: dict[str, np.ndarray] = {}
    pgd = PGD(eps=0.1, steps=7, seed=5)(classifier, x, y)
    out["pgd_x"], out["pgd_success"] = pgd.x_adv, pgd.success
    mi = MIFGSM(eps=0.1, steps=5)(classifier, x, y, batch_size=20)
    out["mifgsm_x"] = mi.x_adv
    l2 = PGD(eps=1.0, norm="2", steps=5, restarts=3)(classifier, x, y, targets="random")
    out["pgd_l2_x"], out["pgd_l2_success"] = l2.x_adv, l2.success
    threshold = float(np.median(keras.ops.convert_to_numpy(scorer(x))))
    adaptive = AdaptivePGD(eps=0.15, threshold=threshold, steps=10, lambdas=(0.5, 5.0))(joint_model(classifier, scorer), x, y)
    out["adaptive_x"], out["adaptive_success"] = adaptive.x_adv, adaptive.success

    for name, attack, kwargs in (
        ("trades", training_attack("pgd:eps=0.2,steps=3", 0.3), {"trades_beta": 6.0}),
        ("warmup", training_attack("pgd:eps=0.2,steps=3", 0.3), {"warmup_steps": 4}),
    ):
        trainer = AdversarialTraining(classifier, attack, seed=1, **kwargs)
        trainer.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trainer.optimizer.build(trainer.trainable_variables)
        out[f"{name}_x"] = keras.ops.convert_to_numpy(trainer.adversarial_batch(x[:16], y[:16])[0])

    engine = DemoEngine(classifier)
    for attack in ("FGSM", "PGD"):
        out[f"demo_{attack.lower()}_x"] = np.stack([engine.update(image, attack, 0.15).adversarial for image in x[:6]])
    out["demo_targeted_x"] = engine.update(x[0], "PGD", 0.15, target=3).adversarial[None]
    return out


def compare(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, name
    if got.dtype == bool:
        np.testing.assert_array_equal(got, expected, err_msg=name)
        return
    off = np.abs(got - expected) > 1e-4
    assert off.mean() <= 0.01, f"{name}: {off.mean():.2%} of the pixels moved (max {np.abs(got - expected).max():.3g})"


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as stored:
        return dict(stored)


@pytest.fixture(scope="module")
def current(recorded) -> dict[str, np.ndarray]:
    return reference_outputs(*reference_models(recorded))


KEYS = ("pgd_x", "pgd_success", "mifgsm_x", "pgd_l2_x", "pgd_l2_success", "adaptive_x", "adaptive_success",
        "trades_x", "demo_fgsm_x", "demo_pgd_x", "demo_targeted_x")


# adversarial training draws its random starts from Keras's generator, whose stream differs per backend
TENSORFLOW_STREAM = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                       reason="recorded with TensorFlow's random stream")


@pytest.mark.parametrize("key", [pytest.param(k, marks=TENSORFLOW_STREAM) if k == "trades_x" else k for k in KEYS])
def test_engine_output_matches_the_recording(key, recorded, current):
    compare(key, current[key], recorded[key])


@TENSORFLOW_STREAM
def test_eps_warmup_matches_the_recording_away_from_the_bounds_and_is_exact_at_them(recorded, current):
    """The recording ran warm-up in rescaled coordinates whose clip to [0, 1] kept pixels within eps
    of a bound short of it; the engine's warm-up is a smaller eps, exact everywhere. So: equal where
    the clip cannot act (pixels at least eps from both bounds), and within the warm-up eps everywhere."""
    from training.data import load_dataset

    x = load_dataset("digits").x_test[:16]
    interior = (x >= 0.2) & (x <= 0.8)
    compare("warmup_x (interior)", current["warmup_x"][interior], recorded["warmup_x"][interior])
    assert np.abs(current["warmup_x"] - x).max() <= 0.2 / 4 + 1e-6  # step 1 of 4: eps 0.2 / 4


def test_the_recording_is_not_trivial(recorded):
    """The recorded attacks moved the images and fooled a fair share of the model, so equality means something."""
    for key in ("pgd_success", "pgd_l2_success", "adaptive_success"):
        assert 0.1 < recorded[key].mean() < 0.95, key
    for key in ("mifgsm_x", "trades_x", "warmup_x", "demo_pgd_x"):
        assert not np.allclose(recorded[key][:6], recorded["demo_fgsm_x"][:6] if key != "demo_pgd_x" else recorded["mifgsm_x"][:6]), key


if __name__ == "__main__":
    from training.data import load_dataset

    classifier, scorer = reference_models()
    digits = load_dataset("digits")
    classifier.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(digits.x_train, digits.y_train, epochs=10, batch_size=64, verbose=0)
    arrays = {f"classifier_w{i}": w for i, w in enumerate(classifier.get_weights())}
    arrays |= {f"scorer_w{i}": w for i, w in enumerate(scorer.get_weights())}
    arrays |= reference_outputs(classifier, scorer)
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, **arrays)
    print(f"wrote {REFERENCE}", {k: v.shape for k, v in arrays.items()}, file=sys.stderr)
