"""The `safetynet` family (Lu et al. 2017, "SafetyNet: detecting and rejecting adversarial examples
robustly"): late ReLU activations are quantised into discrete codes and an RBF-SVM separates the
codes of clean and adversarial images. Quantising makes the detector hard to steer with gradients:
the codes are piecewise constant in the input.

Codes: for each unit, the number of thresholds its activation exceeds, with thresholds 0 and the
unit's clean-data quantiles (`quantiles`) of its positive activations, so (0.5,) gives ternary codes
{0: off, 1: weakly on, 2: strongly on}. The SVM is fitted with scikit-learn and stored as plain arrays
(support vectors, dual coefficients, intercept, gamma); `score` evaluates the RBF decision function
in numpy from those arrays, before and after a save alike.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, ClassVar, Sequence

import keras
import numpy as np
from keras import ops
from sklearn.svm import SVC

from detector.base import Detector
from detector.features import (
    LAYER_CONSTRAINTS,
    extract,
    feature_extractor,
    image_shape,
    is_relu_layer,
    load_arrays,
    prepare_classifier,
    require_classifier,
    resolve_layers,
    save_arrays,
)
from foundation.storage import model_fingerprint
from foundation.validation import Interval, Options, Satisfies, check_image_shape

ARRAYS_FILE = "safetynet.npz"
_ARRAYS = ("thresholds", "support_vectors", "dual_coef", "intercept", "gamma")


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, through one matrix product (BLAS)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def rbf_decision_function(x: np.ndarray, support_vectors: np.ndarray, dual_coef: np.ndarray,
                          intercept: np.ndarray, gamma: float, batch_size: int = 1024) -> np.ndarray:
    """A binary RBF-SVC's decision function from its fitted arrays (sklearn's public `dual_coef_`
    and `intercept_`): sum_i a_i exp(-gamma |x - s_i|^2) + b, positive for `classes_[1]`."""
    out = np.empty(len(x))
    for start in range(0, len(x), batch_size):
        kernel = np.exp(-gamma * squared_distances(x[start:start + batch_size], support_vectors))
        out[start:start + batch_size] = kernel @ np.asarray(dual_coef, np.float64)[0] + float(intercept[0])
    return out


def _quantiles(values: Any) -> list[float]:
    quantiles = [Interval(float, 0, 1, closed="neither").convert(q) for q in values]
    if not quantiles or quantiles != sorted(set(quantiles)):
        raise ValueError(values)
    return quantiles


class SafetyNetDetector(Detector):
    """RBF-SVM on quantised late-ReLU codes; `score` is the SVM decision function.

    layers: ReLU layers to read (None: the last `auto_layers` ReLU layers before the logits).
    quantiles: per-unit clean-data quantiles of the positive activations used as extra thresholds.
    max_train: at most this many training images (half clean, half adversarial when possible) reach
    the SVM, which bounds fit time and memory (the kernel matrix is max_train^2 float64 values: 128 MB
    at 4000; SVM training is quadratic or worse in the sample count).
    """

    kind = "safetynet"
    learned = "arrays"
    uses_classifier: ClassVar[bool] = True
    _parameter_constraints = {
        **LAYER_CONSTRAINTS,
        "quantiles": [Satisfies("increasing values strictly between 0 and 1", _quantiles)],
        "C": [Interval(float, 0, closed="neither")],
        "gamma": [Options("scale", "auto"), Interval(float, 0, closed="neither")],
        "max_train": [Interval(int, 4)],
        "seed": [Interval(int, 0)],
    }

    def __init__(
        self,
        classifier: keras.Model,
        *,
        layers: Sequence[str] | None = None,
        auto_layers: int = 2,
        quantiles: Sequence[float] = (0.5,),
        C: float = 1.0,
        gamma: str | float = "scale",
        max_train: int = 4000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._set_params(locals())
        self.classifier = prepare_classifier(classifier)
        self.layers = resolve_layers(self.classifier, self.layers, self.auto_layers, accept=is_relu_layer)
        self.extractor = feature_extractor(self.classifier, self.layers)
        self.arrays: dict[str, np.ndarray] | None = None

    def activations(self, x: np.ndarray) -> np.ndarray:
        """The tapped layers' activations, flattened and concatenated: (n, units)."""
        x = check_image_shape(x, image_shape(self.classifier))
        return np.concatenate([f.reshape(len(x), -1) for f in extract(self.extractor, x)], axis=1)

    def codes(self, x: np.ndarray) -> np.ndarray:
        self.check_fitted()
        return self._quantise(self.activations(x), self.arrays["thresholds"])

    @staticmethod
    def _quantise(activations: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        """Per unit, the number of thresholds (rows of `thresholds`) the activation exceeds."""
        return (activations[:, None, :] > thresholds[None, :, :]).sum(axis=1).astype(np.float64)

    def _gamma_value(self, codes: np.ndarray) -> float:
        """sklearn's SVC gamma: 'scale' = 1 / (units * var(codes)), 'auto' = 1 / units."""
        if self.gamma == "auto":
            return 1.0 / codes.shape[1]
        if self.gamma == "scale":
            variance = float(codes.var())
            return 1.0 / (codes.shape[1] * variance) if variance > 0 else 1.0
        return float(self.gamma)

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *, verbose: int | str = 1) -> None:
        """Thresholds from the clean activations, then the SVM on a bounded, balanced subsample."""
        rng = np.random.default_rng(self.seed)
        n_clean = min(len(x_clean), max(self.max_train // 2, self.max_train - len(x_adversarial)))
        n_adversarial = min(len(x_adversarial), self.max_train - n_clean)
        x_clean = x_clean[np.sort(rng.choice(len(x_clean), n_clean, replace=False))]
        x_adversarial = x_adversarial[np.sort(rng.choice(len(x_adversarial), n_adversarial, replace=False))]
        clean, adversarial = self.activations(x_clean), self.activations(x_adversarial)
        positive = np.where(clean > 0, clean, np.nan)
        with warnings.catch_warnings():  # units never on in clean data give all-NaN columns
            warnings.simplefilter("ignore", RuntimeWarning)
            levels = np.nanquantile(positive, self.quantiles, axis=0) if len(self.quantiles) else np.empty((0, clean.shape[1]))
        levels = np.nan_to_num(levels, nan=np.inf)  # units never on in clean data: a single 'on' code
        thresholds = np.concatenate([np.zeros((1, clean.shape[1])), levels]).astype(np.float32)
        codes = np.concatenate([self._quantise(clean, thresholds), self._quantise(adversarial, thresholds)])
        labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        started = time.perf_counter()
        gamma = self._gamma_value(codes)
        # the RBF kernel (exactly sklearn's, gamma resolved the same way) computed with BLAS: libsvm's
        # own kernel loop is single-threaded and about 10x slower on wide codes
        svm = SVC(kernel="precomputed", C=self.C, class_weight="balanced", random_state=self.seed)
        svm.fit(np.exp(-gamma * squared_distances(codes, codes)), labels)
        if verbose:
            print(f"safetynet: RBF-SVM on {len(codes)} codes of {codes.shape[1]} units, "
                  f"{len(svm.support_)} support vectors, {time.perf_counter() - started:.1f} s")
        self.arrays = {
            "thresholds": thresholds, "support_vectors": codes[svm.support_],
            "dual_coef": svm.dual_coef_.astype(np.float64), "intercept": svm.intercept_.astype(np.float64),
            "gamma": np.asarray(gamma),
        }
        self.classifier_fingerprint = model_fingerprint(self.classifier)

    def _score(self, x: np.ndarray) -> np.ndarray:
        codes = self.codes(x)
        a = self.arrays
        return rbf_decision_function(codes, a["support_vectors"], a["dual_coef"], a["intercept"], float(a["gamma"]))

    def score_graph(self, images: Any) -> Any:
        """The score in keras.ops. The code quantiser is a step function: its forward pass is exact
        and its gradient that of a sum of sigmoids (BPDA), each a quarter of the unit's top level wide."""
        a = self.arrays
        activations = ops.concatenate([ops.reshape(f, (-1, int(np.prod(f.shape[1:]))))
                                       for f in keras.tree.flatten(self.extractor(images))], axis=1)
        thresholds = np.asarray(a["thresholds"], np.float64)
        finite = np.where(np.isfinite(thresholds), thresholds, 0.0)
        temperature = ops.convert_to_tensor((np.maximum(finite.max(axis=0), 1e-3) / 4.0).astype(np.float32))
        hard = soft = 0.0
        for level in np.minimum(thresholds, 1e30).astype(np.float32):  # never-on units: a level no activation reaches
            level = ops.convert_to_tensor(level)
            hard = hard + ops.cast(activations > level, "float32")
            soft = soft + ops.sigmoid((activations - level) / temperature)
        codes = soft + ops.stop_gradient(hard - soft)
        support = np.asarray(a["support_vectors"], np.float32)
        distances = (ops.sum(ops.square(codes), axis=1, keepdims=True) + ops.convert_to_tensor((support ** 2).sum(axis=1))[None]
                     - 2.0 * ops.matmul(codes, ops.convert_to_tensor(support.T)))
        kernel = ops.exp(-float(a["gamma"]) * ops.maximum(distances, 0.0))
        return ops.matmul(kernel, ops.convert_to_tensor(a["dual_coef"][0].astype(np.float32))) + float(a["intercept"][0])

    def gradient(self) -> str:
        return "bpda"

    def _save_files(self, directory: Path) -> None:
        save_arrays(directory / ARRAYS_FILE, **self.arrays)

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "SafetyNetDetector":
        classifier = require_classifier(directory, classifier, cls.kind)
        detector = cls(classifier, **params)
        arrays = load_arrays(directory / ARRAYS_FILE, _ARRAYS)
        units = sum(int(np.prod(o.shape[1:])) for o in keras.tree.flatten(detector.extractor.outputs))
        if arrays["thresholds"].shape != (len(detector.quantiles) + 1, units) or arrays["support_vectors"].shape[1:] != (units,):
            raise ValueError(f"the saved SVM reads {arrays['thresholds'].shape[-1]} units, but layers "
                             f"{detector.layers} of this classifier have {units}: wrong classifier?")
        detector.arrays = arrays
        return detector
