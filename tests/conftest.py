"""Shared fixtures: real data beside the checkout, quiet TensorFlow, deterministic seeds."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder beside the checkout (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits, as an ImageDataset (no network, loads in milliseconds)."""
    from training.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_classifier(digits) -> keras.Model:
    """The reference CNN trained briefly on digits (about 95% test accuracy, a few seconds)."""
    from training.classifier import train_classifier

    return train_classifier(digits.x_train, digits.y_train, digits.num_classes, epochs=8, verbose=0)


@pytest.fixture(scope="session")
def digits_detector(digits, digits_classifier):
    """An InputDetector(epochs=4) fitted on the first 1,100 digits training images and their FGSM and
    PGD (eps 0.3) versions, calibrated at 5% FPR on the other training images, carrying the
    classifier's fingerprint. Shared by the guard, evaluation and HTTP tests: copy it before
    changing it."""
    from attacks import FGSM, PGD
    from detector import InputDetector
    from foundation.storage import model_fingerprint

    x, y = digits.x_train[:1100], digits.y_train[:1100]
    adversarial = np.concatenate([attack(digits_classifier, x, y).x_adv for attack in (FGSM(eps=0.3), PGD(eps=0.3))])
    detector = InputDetector(epochs=4).fit(x, adversarial, verbose=0)
    detector.calibrate(digits.x_train[1100:], 0.05)
    detector.classifier_fingerprint = model_fingerprint(digits_classifier)
    return detector


@pytest.fixture(scope="session")
def mnist(shared_data):
    """MNIST from ../shared/data as an ImageDataset."""
    from training.data import load_dataset

    return load_dataset(str(shared_data / "mnist" / "mnist_keras_arrays.npz"))


@pytest.fixture(scope="session")
def mnist_classifier(mnist) -> keras.Model:
    """The reference CNN trained on 20,000 MNIST images for 3 epochs (about 98.5%, ~15 s)."""
    from training.classifier import train_classifier

    return train_classifier(mnist.x_train[:20_000], mnist.y_train[:20_000], 10, epochs=3, verbose=0)


@pytest.fixture(scope="session")
def linear_model_factory():
    """`factory(seed)`: logits = W x + b on 6x6x1 images (36 features, 4 classes), known weights."""

    def build(seed: int) -> keras.Model:
        rng = np.random.default_rng(seed)
        model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(4)])
        model.layers[-1].set_weights([rng.normal(size=(36, 4)).astype("float32"), rng.normal(size=4).astype("float32")])
        return model

    return build


@pytest.fixture(scope="session")
def quickstart_dir(tmp_path_factory) -> Path:
    """`safetynet quickstart --no-robust` on digits (classifier, FGSM/PGD datasets, detector, report;
    about a minute), shared by the CLI and README tests; the adaptive suite on the first 120 test images."""
    from safetynet.cli import main

    out = tmp_path_factory.mktemp("quickstart") / "run"
    assert main(["quickstart", "--no-robust", "--out", str(out), "--classifier-epochs", "8", "--detector-epochs", "5",
                 "--adaptive-n", "120"]) == 0
    return out
