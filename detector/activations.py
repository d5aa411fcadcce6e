"""The `activations` family: a small network on the classifier's intermediate activations (Metzen et
al. 2017, "On detecting adversarial perturbations"). Adversarial perturbations that barely change the
pixels move the hidden representations a lot, so a detector reading them needs far less capacity
than one reading the images. Only the detector network is stored; the classifier is supplied again
at load time."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import keras
import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

from detector.base import Detector
from detector.features import (
    LAYER_CONSTRAINTS,
    extract,
    feature_extractor,
    image_shape,
    prepare_classifier,
    require_classifier,
    resolve_layers,
)
from foundation.storage import model_fingerprint
from foundation.validation import Interval, check_image_shape

MODEL_FILE = "activations.keras"


def build_activation_detector(shapes: Sequence[tuple[int, ...]], names: Sequence[str], width: int = 64) -> keras.Model:
    """One branch per tapped layer, concatenated, then one logit (adversarial vs clean).

    Each branch first standardises its activations per channel (a `Normalization` layer adapted on
    the training features, stored in the model). Feature maps get a conv layer and global average
    pooling (Metzen et al.'s detector sub-network, shrunk); vectors get a dense layer."""
    inputs, branches = [], []
    for index, (shape, name) in enumerate(zip(shapes, names)):
        x = keras.Input(shape, name=f"features_{index}")
        inputs.append(x)
        h = keras.layers.Normalization(axis=-1, name=f"normalize_{index}")(x)
        if len(shape) == 3:
            h = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(h)
            if min(shape[0], shape[1]) >= 8:
                h = keras.layers.MaxPooling2D()(h)
            h = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
        else:
            if len(shape) != 1:
                h = keras.layers.Flatten()(h)
            h = keras.layers.Dense(width, activation="relu")(h)
        branches.append(h)
    x = branches[0] if len(branches) == 1 else keras.layers.Concatenate()(branches)
    x = keras.layers.Dense(width, activation="relu")(x)
    outputs = keras.layers.Dense(1, name="adversarial_logit")(x)
    return keras.Model(inputs, outputs, name="activation_detector")


def trunk_model(classifier: keras.Model, names: Sequence[str]) -> keras.Model:
    """Classifier input -> [logits, activations of the named layers]: outputs of one graph, so each
    classifier layer runs once however many of them are read."""
    if isinstance(classifier, keras.Sequential):
        every = [layer.name for layer in classifier.layers]
        chain = feature_extractor(classifier, every)  # the layers re-applied on a fresh input
        by_name = dict(zip(every, keras.tree.flatten(chain.outputs)))
        outputs = [by_name[every[-1]], *(by_name[n] for n in names)]
        return keras.Model(chain.inputs, outputs, name=f"{classifier.name}_trunk")
    outputs = [classifier.outputs[0], *(classifier.get_layer(n).output for n in names)]
    return keras.Model(classifier.inputs, outputs, name=f"{classifier.name}_trunk")


class ActivationDetector(Detector):
    """Binary network on the activations of chosen classifier layers; `score` is its logit.

    layers: layer names to read; None picks the last `auto_layers` conv / pooling / dense /
    activation layers before the logits.
    """

    kind = "activations"
    learned = "model"
    uses_classifier: ClassVar[bool] = True
    _parameter_constraints = {
        **LAYER_CONSTRAINTS,
        "width": [Interval(int, 1)],
        "epochs": [Interval(int, 1)],
        "batch_size": [Interval(int, 1)],
        "learning_rate": [Interval(float, 0, closed="neither")],
        "validation_fraction": [Interval(float, 0, 0.5, closed="neither")],
        "patience": [Interval(int, 1)],
        "seed": [Interval(int, 0)],
    }

    def __init__(
        self,
        classifier: keras.Model,
        *,
        layers: Sequence[str] | None = None,
        auto_layers: int = 2,
        width: int = 64,
        epochs: int = 20,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        validation_fraction: float = 0.1,
        patience: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._set_params(locals())
        self.classifier = prepare_classifier(classifier)
        self.layers = resolve_layers(self.classifier, self.layers, self.auto_layers)
        self.extractor = feature_extractor(self.classifier, self.layers)
        self.model: keras.Model | None = None

    def features(self, x: np.ndarray) -> list[np.ndarray]:
        return extract(self.extractor, check_image_shape(x, image_shape(self.classifier)))

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *, verbose: int | str = 2) -> None:
        """Train on the activations of clean (label 0) vs adversarial (label 1) images, balanced by
        class weights, early-stopped on a stratified validation split."""
        keras.utils.set_random_seed(self.seed)
        features = [np.concatenate(pair) for pair in zip(self.features(x_clean), self.features(x_adversarial))]
        labels = np.r_[np.zeros(len(x_clean)), np.ones(len(x_adversarial))].astype(np.float32)
        fit_rows, val_rows = train_test_split(
            np.arange(len(labels)), test_size=self.validation_fraction, stratify=labels, random_state=self.seed
        )
        weights = compute_class_weight("balanced", classes=np.array([0.0, 1.0]), y=labels[fit_rows])
        model = build_activation_detector([f.shape[1:] for f in features], self.layers, self.width)
        for index, f in enumerate(features):
            model.get_layer(f"normalize_{index}").adapt(f[fit_rows])
        model.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
        )
        model.fit(
            [f[fit_rows] for f in features], labels[fit_rows],
            epochs=self.epochs, batch_size=self.batch_size,
            validation_data=([f[val_rows] for f in features], labels[val_rows]),
            class_weight={0: float(weights[0]), 1: float(weights[1])},
            callbacks=[keras.callbacks.EarlyStopping(patience=self.patience, restore_best_weights=True)],
            verbose=verbose,
        )
        self.model = model
        self.classifier_fingerprint = model_fingerprint(self.classifier)

    def _score(self, x: np.ndarray) -> np.ndarray:
        features = self.features(x)
        logits = np.concatenate([self.model.predict_on_batch([f[i:i + 256] for f in features])
                                 for i in range(0, len(features[0]), 256)])
        return logits[:, 0].astype(np.float64)

    def scoring_model(self, classifier: keras.Model | None) -> keras.Model:
        """ONE pass through the classifier: its logits and the tapped activations the detector head
        reads come out of the same graph, so guarding costs only the head on top of classifying.

        A `classifier` with other weights than the one this detector reads (a guard built with
        `check_fingerprint=False`) runs beside that one instead, exactly as `score()` would."""
        self.check_fitted()
        inputs = keras.Input(image_shape(self.classifier), name="images")
        outputs = {}
        if classifier is None:
            features = self.extractor(inputs)
        else:
            classifier = prepare_classifier(classifier)
            if classifier is self.classifier or model_fingerprint(classifier) == model_fingerprint(self.classifier):
                outputs["logits"], *features = trunk_model(self.classifier, self.layers)(inputs)
            else:
                outputs["logits"], features = classifier(inputs), self.extractor(inputs)
        outputs["score"] = self.model(features)[:, 0]
        return keras.Model(inputs, outputs, name="activations_scoring")

    def _save_files(self, directory: Path) -> None:
        self.model.save(directory / MODEL_FILE)

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "ActivationDetector":
        classifier = require_classifier(directory, classifier, cls.kind)
        detector = cls(classifier, **params)
        path = directory / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"detector model file missing: {path}")
        try:
            model = keras.models.load_model(path, compile=False, safe_mode=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"detector model {path} is corrupt: {error}") from None
        expected = [tuple(o.shape[1:]) for o in keras.tree.flatten(detector.extractor.outputs)]
        found = [tuple(i.shape[1:]) for i in keras.tree.flatten(model.inputs)]
        if expected != found:
            raise ValueError(f"the saved detector reads activations of shapes {found}, but layers "
                             f"{detector.layers} of this classifier give {expected}: wrong classifier?")
        detector.model = model
        return detector
