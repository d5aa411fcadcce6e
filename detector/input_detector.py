"""The `input` family: a binary CNN on the images themselves (Gong et al. 2017, "Adversarial and
clean data are not twins"). It learns the statistics of the perturbation, so it is near perfect on the
attacks it was trained on."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

from detector.base import Detector
from foundation.models import logits_model
from foundation.validation import BOOLEAN, Interval

MODEL_FILE = "detector.keras"


# Fixed residual filters (Fridrich & Kodovsky's SRM family): they cancel smooth image content and
# keep what a perturbation adds, so the network learns noise statistics rather than digits or cats.
HIGHPASS_KERNELS = np.stack(
    [
        np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32) / 4,  # Laplacian
        np.array([[0, 0, 0], [1, -2, 1], [0, 0, 0]], np.float32) / 2,  # second order, horizontal
        np.array([[0, 1, 0], [0, -2, 0], [0, 1, 0]], np.float32) / 2,  # second order, vertical
    ],
    axis=-1,
)


def build_input_cnn(input_shape: tuple[int, ...], *, highpass: bool = True) -> keras.Model:
    """Optional fixed high-pass front end, three conv layers (pooling while the image is large
    enough), features averaged over the whole image, then one logit (adversarial vs clean)."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if highpass:
        channels = input_shape[-1]
        kernel = np.repeat(HIGHPASS_KERNELS[:, :, None, :], channels, axis=2)
        x = keras.layers.DepthwiseConv2D(
            3, depth_multiplier=HIGHPASS_KERNELS.shape[-1], padding="same", use_bias=False, trainable=False,
            depthwise_initializer=keras.initializers.Constant(kernel), name="highpass",
        )(x)
    for filters in (32, 64, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        if min(x.shape[1], x.shape[2]) >= 8:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(1, name="adversarial_logit")(x)
    return keras.Model(inputs, outputs, name="input_detector")


class InputDetector(Detector):
    """Binary CNN detector on input images.

    `score` is the network's logit (log-odds of 'adversarial'): unlike a sigmoid probability it
    never saturates to ties at 1.0, so thresholds and AUROC stay well defined.
    """

    kind = "input"
    learned = "model"
    _parameter_constraints = {
        "epochs": [Interval(int, 1)],
        "batch_size": [Interval(int, 1)],
        "learning_rate": [Interval(float, 0, closed="neither")],
        "validation_fraction": [Interval(float, 0, 0.5, closed="neither")],
        "highpass": [BOOLEAN],
        "seed": [Interval(int, 0)],
    }

    def __init__(
        self,
        *,
        epochs: int = 10,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        validation_fraction: float = 0.1,
        highpass: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._set_params(locals())
        self.model: keras.Model | None = None

    def image_shape(self) -> tuple[int | None, ...] | None:
        """The trained CNN's input shape (None before training: any shape)."""
        return None if self.model is None else tuple(self.model.input_shape[1:])

    def _fit(
        self,
        x_clean: np.ndarray,
        x_adversarial: np.ndarray,
        *,
        warm_start: bool = False,
        learning_rate: float | None = None,
        verbose: int | str = 2,
    ) -> None:
        """Train on clean (label 0) vs adversarial (label 1) images, balanced by class weights,
        early-stopped on a stratified validation split. `warm_start` continues from the current
        weights (fine-tuning on a new attack), at `learning_rate` when given."""
        keras.utils.set_random_seed(self.seed)
        x = np.concatenate([x_clean, x_adversarial]).astype(np.float32)
        labels = np.concatenate([np.zeros(len(x_clean)), np.ones(len(x_adversarial))]).astype(np.float32)
        x_fit, x_val, y_fit, y_val = train_test_split(
            x, labels, test_size=self.validation_fraction, stratify=labels, random_state=self.seed
        )
        weights = compute_class_weight("balanced", classes=np.array([0.0, 1.0]), y=y_fit)
        if not (warm_start and self.model is not None):
            self.model = build_input_cnn(x.shape[1:], highpass=self.highpass)
        self.model.compile(
            optimizer=keras.optimizers.Adam(learning_rate or self.learning_rate),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
        )
        self.model.fit(
            x_fit,
            y_fit,
            epochs=self.epochs,
            batch_size=self.batch_size,
            validation_data=(x_val, y_val),
            class_weight={0: float(weights[0]), 1: float(weights[1])},
            callbacks=[keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)],
            verbose=verbose,
        )

    def _score(self, x: np.ndarray) -> np.ndarray:
        expected = tuple(self.model.input_shape[1:])
        if tuple(np.shape(x)[1:]) != expected:
            raise ValueError(f"images of shape {np.shape(x)[1:]} do not fit the detector's input {expected}")
        logits = self.model.predict(np.asarray(x, np.float32), batch_size=256, verbose=0)
        return logits[:, 0].astype(np.float64)

    def scoring_model(self, classifier: keras.Model | None) -> keras.Model:
        """The classifier and the detector CNN side by side on the same input (they share nothing
        but the image, so this saves the second call, not the second network)."""
        self.check_fitted()
        shape = tuple(self.model.input_shape[1:])
        inputs = keras.Input(shape, name="images")
        outputs = {"score": self.model(inputs)[:, 0]}
        if classifier is not None:
            classifier = logits_model(classifier)
            expected = tuple(classifier.input_shape[1:])
            if len(expected) != len(shape) or any(e is not None and e != s for e, s in zip(expected, shape)):
                raise ValueError(f"the classifier takes images of shape {expected}, the detector {shape}")
            outputs = {"logits": classifier(inputs)} | outputs
        return keras.Model(inputs, outputs, name="input_scoring")

    def _save_files(self, directory: Path) -> None:
        self.model.save(directory / MODEL_FILE)

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any], **context: Any) -> "InputDetector":
        detector = cls(**params)
        path = directory / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"detector model file missing: {path}")
        try:
            detector.model = keras.models.load_model(path, compile=False, safe_mode=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"detector model {path} is corrupt: {error}") from None
        return detector
