"""The `mahalanobis` family (Lee et al. 2018, "A simple unified framework for detecting
out-of-distribution samples and adversarial attacks").

On clean data, each tapped layer's features (feature maps averaged over space) are modelled as
class-conditional Gaussians with one shared (tied) covariance. An input's per-layer score is its
Mahalanobis distance to the closest class mean: adversarial images sit off the clean class clusters
in hidden layers even when the logits say otherwise. A logistic regression, trained on clean vs
adversarial images, weighs the layers (it sees log-distances, standardised). Optionally, as in the
paper, each input is first nudged by `noise` in the direction that brings it closer to its nearest
class (clean images move more than adversarial ones). Everything is stored as arrays in an .npz.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import keras
import numpy as np
from keras import ops
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from sklearn.linear_model import LogisticRegression

from detector.base import Detector
from detector.features import (
    LAYER_CONSTRAINTS,
    extract,
    feature_extractor,
    image_shape,
    load_arrays,
    predict,
    prepare_classifier,
    require_classifier,
    resolve_layers,
    save_arrays,
)
from foundation.backend import value_and_grad
from foundation.storage import model_fingerprint
from foundation.validation import Interval, Options, check_image_shape

ARRAYS_FILE = "mahalanobis.npz"
COVARIANCES = {"ledoit_wolf": LedoitWolf, "empirical": EmpiricalCovariance}


def _pool(features: Any) -> Any:
    """(n, ..., C) -> (n, C): feature maps averaged over their spatial axes (works on numpy and tensors)."""
    if len(features.shape) == 2:
        return features
    axes = tuple(range(1, len(features.shape) - 1))
    return features.mean(axis=axes) if isinstance(features, np.ndarray) else ops.mean(features, axis=axes)


def min_distance(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row to the closest class mean, (n,)."""
    f = np.asarray(features, np.float64)
    fp = f @ precision
    distances = (np.einsum("ij,ij->i", fp, f)[:, None] - 2.0 * fp @ means.T
                 + np.einsum("ij,jk,ik->i", means, precision, means)[None, :])
    return np.maximum(distances.min(axis=1), 0.0)


class MahalanobisDetector(Detector):
    """Logistic regression on per-layer class-conditional Mahalanobis distances.

    layers: layers to read (None: the last `auto_layers` representation layers before the logits).
    noise: input pre-processing magnitude (Lee et al.'s epsilon); 0 turns it off (one forward pass).
    covariance: 'ledoit_wolf' (shrunk, stable with few images per dimension) or 'empirical'.
    """

    kind = "mahalanobis"
    learned = "arrays"
    uses_classifier: ClassVar[bool] = True
    _parameter_constraints = {
        **LAYER_CONSTRAINTS,
        "noise": [Interval(float, 0)],
        "covariance": [Options(*COVARIANCES)],
        "C": [Interval(float, 0, closed="neither")],
        "seed": [Interval(int, 0)],
    }

    def __init__(
        self,
        classifier: keras.Model,
        *,
        layers: Sequence[str] | None = None,
        auto_layers: int = 3,
        noise: float = 0.0,
        covariance: str = "ledoit_wolf",
        C: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._set_params(locals())
        self.classifier = prepare_classifier(classifier)
        self.layers = resolve_layers(self.classifier, self.layers, self.auto_layers)
        self.extractor = feature_extractor(self.classifier, self.layers)
        self.arrays: dict[str, np.ndarray] | None = None

    def _array_names(self) -> list[str]:
        per_layer = [f"{kind}_{i}" for i in range(len(self.layers)) for kind in ("means", "precision")]
        return per_layer + ["score_mean", "score_scale", "coef", "intercept"]

    def _pooled(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(_pool(f), np.float64) for f in extract(self.extractor, x)]

    def _noisy_distances(self, x: np.ndarray, layer: int, batch_size: int = 256) -> np.ndarray:
        """Lee et al.'s pre-processing: step `noise` along -sign(grad of the distance), then measure."""
        means = ops.convert_to_tensor(self.arrays[f"means_{layer}"], "float32")
        precision = ops.convert_to_tensor(self.arrays[f"precision_{layer}"], "float32")

        def distance(z: Any) -> tuple[Any, Any]:
            outputs = self.extractor(z, training=False)
            f = _pool(outputs[layer] if isinstance(outputs, (list, tuple)) else outputs)
            centred = f[:, None, :] - means[None, :, :]
            d = ops.sum(ops.matmul(centred, precision) * centred, axis=-1)
            return ops.min(d, axis=1), d

        moved = []
        for start in range(0, len(x), batch_size):
            batch = ops.convert_to_tensor(x[start:start + batch_size])
            _, _, grad = value_and_grad(distance, batch)
            moved.append(np.asarray(batch) - self.noise * np.sign(ops.convert_to_numpy(grad)))
        features = self._pooled(np.concatenate(moved).astype(np.float32))[layer]
        return min_distance(features, self.arrays[f"means_{layer}"], self.arrays[f"precision_{layer}"])

    def layer_scores(self, x: np.ndarray) -> np.ndarray:
        """(n, layers): each layer's squared Mahalanobis distance to the closest clean class."""
        self.check_fitted()
        x = check_image_shape(x, image_shape(self.classifier))
        if self.noise > 0:
            return np.stack([self._noisy_distances(x, i) for i in range(len(self.layers))], axis=1)
        pooled = self._pooled(x)
        return np.stack([min_distance(f, self.arrays[f"means_{i}"], self.arrays[f"precision_{i}"])
                         for i, f in enumerate(pooled)], axis=1)

    def _standardised(self, distances: np.ndarray) -> np.ndarray:
        return (np.log(distances + 1e-12) - self.arrays["score_mean"]) / self.arrays["score_scale"]

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *, y_clean: np.ndarray | None = None,
             verbose: int | str = 1) -> None:
        """Class Gaussians on clean images (labelled by `y_clean`, or by the classifier when None),
        then the logistic regression on clean vs adversarial per-layer distances."""
        logits_dim = int(self.classifier.output_shape[-1])
        if y_clean is None:
            y_clean = np.argmax(predict(self.classifier, x_clean)[0], axis=-1)
        y_clean = np.asarray(y_clean)
        if y_clean.shape != (len(x_clean),) or not np.issubdtype(y_clean.dtype, np.integer):
            raise ValueError(f"y_clean must be {len(x_clean)} integer class indices, got {y_clean.dtype} {y_clean.shape}")
        if y_clean.min() < 0 or y_clean.max() >= logits_dim:
            raise ValueError(f"y_clean must lie in [0, {logits_dim - 1}]")
        classes = np.unique(y_clean)
        arrays: dict[str, np.ndarray] = {}
        for index, features in enumerate(self._pooled(x_clean)):
            means = np.stack([features[y_clean == c].mean(axis=0) for c in classes])
            centred = features - means[np.searchsorted(classes, y_clean)]
            estimator = COVARIANCES[self.covariance](assume_centered=True).fit(centred)
            arrays[f"means_{index}"], arrays[f"precision_{index}"] = means, np.asarray(estimator.precision_, np.float64)
        self.arrays = arrays
        distances = np.concatenate([self.layer_scores(x_clean), self.layer_scores(x_adversarial)])
        logs = np.log(distances + 1e-12)
        arrays["score_mean"], arrays["score_scale"] = logs.mean(axis=0), np.maximum(logs.std(axis=0), 1e-12)
        labels = np.r_[np.zeros(len(x_clean)), np.ones(len(x_adversarial))]
        regression = LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000, random_state=self.seed)
        regression.fit(self._standardised(distances), labels)
        arrays["coef"], arrays["intercept"] = regression.coef_.astype(np.float64), regression.intercept_.astype(np.float64)
        if verbose:
            print(f"mahalanobis: layers {self.layers}, weights {np.round(arrays['coef'][0], 3).tolist()}")
        self.classifier_fingerprint = model_fingerprint(self.classifier)

    def _score(self, x: np.ndarray) -> np.ndarray:
        z = self._standardised(self.layer_scores(x))
        return z @ self.arrays["coef"][0] + self.arrays["intercept"][0]

    def distance_graph(self, images: Any) -> Any:
        """The score in keras.ops without Lee et al.'s noise step (exact when `noise` is 0)."""
        a, total = self.arrays, 0.0
        for index, features in enumerate(keras.tree.flatten(self.extractor(images))):
            centred = _pool(features)[:, None, :] - ops.convert_to_tensor(a[f"means_{index}"].astype(np.float32))[None]
            precision = ops.convert_to_tensor(a[f"precision_{index}"].astype(np.float32))
            distance = ops.maximum(ops.min(ops.sum(ops.matmul(centred, precision) * centred, axis=-1), axis=1), 0.0)
            standardised = (ops.log(distance + 1e-12) - float(a["score_mean"][index])) / float(a["score_scale"][index])
            total = total + float(a["coef"][0, index]) * standardised
        return total + float(a["intercept"][0])

    def score_graph(self, images: Any) -> Any | None:
        """None with the noise step (it needs an input gradient inside the score)."""
        return self.distance_graph(images) if self.noise == 0 else None

    def _save_files(self, directory: Path) -> None:
        save_arrays(directory / ARRAYS_FILE, **self.arrays)

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "MahalanobisDetector":
        classifier = require_classifier(directory, classifier, cls.kind)
        detector = cls(classifier, **params)
        arrays = load_arrays(directory / ARRAYS_FILE, detector._array_names())
        for index, output in enumerate(keras.tree.flatten(detector.extractor.outputs)):
            if arrays[f"means_{index}"].shape[1] != output.shape[-1]:
                raise ValueError(f"the saved class means of layer {detector.layers[index]} do not match "
                                 f"its {output.shape[-1]} channels in this classifier: wrong classifier?")
        detector.arrays = arrays
        return detector
