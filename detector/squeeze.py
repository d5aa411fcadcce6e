"""The `squeeze` family (Xu et al. 2018, "Feature squeezing: detecting adversarial examples in deep
neural networks"). Training-free: an adversarial perturbation is fragile, so squeezing the input
(fewer colour bits, a median filter, non-local means) moves the classifier's prediction far more for
adversarial images than for clean ones. Score = the largest L1 distance between the softmax on the
input and the softmax on any of its squeezed versions (0..2).

Squeezers are written as strings: "bit_depth:B" (B bits per channel, 1..8), "median:K" (K x K median
filter: odd K >= 3 with OpenCV; K = 2 with scipy, as Xu et al.: the upper middle of each pixel and its
upper-left neighbours), "nl_means:S:P:H" (OpenCV non-local means with search window S, patch size P
and strength H on the 0..255 scale). Images are float in [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import cv2
import keras
import numpy as np
from keras import ops
from scipy.ndimage import median_filter

from detector.base import Detector
from detector.features import (
    image_shape,
    predict,
    prepare_classifier,
    require_classifier,
    softmax,
)
from foundation.storage import model_fingerprint
from foundation.validation import Interval, Satisfies, check_image_shape

DEFAULT_SQUEEZERS = {1: ["bit_depth:1", "median:3"], 3: ["bit_depth:5", "median:2", "nl_means:13:3:2"]}
FALLBACK_SQUEEZERS = ["bit_depth:5", "median:3"]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _per_channel(image: np.ndarray, filter_2d: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply an OpenCV filter to an (H, W, C) image: whole for 1, 3 or 4 channels, else per channel."""
    channels = image.shape[-1]
    if channels in (3, 4):
        return filter_2d(np.ascontiguousarray(image)).reshape(image.shape)
    return np.stack([filter_2d(np.ascontiguousarray(image[..., c])) for c in range(channels)], axis=-1)


def bit_depth(x: np.ndarray, bits: int) -> np.ndarray:
    levels = 2 ** bits - 1
    return (np.round(np.clip(x, 0.0, 1.0) * levels) / levels).astype(np.float32)


def median(x: np.ndarray, size: int) -> np.ndarray:
    """cv2.medianBlur per image: on float32 directly for 3 x 3 and 5 x 5 (the sizes OpenCV supports
    for floats), on 8-bit copies for larger windows; 2 x 2 (which OpenCV lacks) with scipy, as Xu et al."""
    if size == 2:
        return median_filter(np.asarray(x, np.float32), size=(1, 2, 2, 1), mode="nearest")
    if size <= 5:
        return np.stack([_per_channel(image, lambda c: cv2.medianBlur(c, size)) for image in x]).astype(np.float32)
    return np.stack([_per_channel(_to_uint8(image), lambda c: cv2.medianBlur(c, size)) for image in x]).astype(np.float32) / 255.0


def nl_means(x: np.ndarray, search: int, patch: int, strength: float) -> np.ndarray:
    """OpenCV fast non-local means on 8-bit copies (coloured variant for 3-channel images)."""
    def denoise(channels: np.ndarray) -> np.ndarray:
        if channels.ndim == 3 and channels.shape[-1] == 3:
            return cv2.fastNlMeansDenoisingColored(channels, None, strength, strength, patch, search)
        return cv2.fastNlMeansDenoising(channels, None, strength, patch, search)

    out = []
    for image in x:
        image8 = _to_uint8(image)
        out.append(denoise(image8) if image.shape[-1] == 3 else _per_channel(image8, denoise))
    return np.stack(out).astype(np.float32) / 255.0


def parse_squeezer(spec: str, image_size: tuple[int | None, ...] = (None, None)) -> Callable[[np.ndarray], np.ndarray]:
    """The squeezing function a spec string names (ValueError for anything malformed)."""
    name, *args = str(spec).split(":")
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"squeezer {spec!r} has non-numeric parameters") from None
    whole = all(v == int(v) for v in values)
    if name == "bit_depth" and len(values) == 1 and whole and 1 <= values[0] <= 8:
        return lambda x: bit_depth(x, int(values[0]))
    if name == "median" and len(values) == 1 and whole and (values[0] == 2 or values[0] >= 3 and values[0] % 2 == 1):
        size = int(values[0])
        if any(s is not None and size > s for s in image_size):
            raise ValueError(f"squeezer {spec!r}: a {size} x {size} window is larger than the {image_size} image")
        return lambda x: median(x, size)
    if name == "nl_means" and len(values) == 3 and all(v == int(v) and v >= 1 and v % 2 == 1 for v in values[:2]) and values[2] > 0:
        return lambda x: nl_means(x, int(values[0]), int(values[1]), values[2])
    raise ValueError(
        f"unknown or malformed squeezer {spec!r}: expected 'bit_depth:B' (1 <= B <= 8), 'median:K' "
        "(2, or odd K >= 3) or 'nl_means:S:P:H' (odd S, P >= 1, H > 0)"
    )


def _squeezer_specs(specs: Any) -> list[str]:
    if isinstance(specs, str) or not specs:
        raise ValueError(specs)
    for spec in specs:
        parse_squeezer(spec)
    return [str(spec) for spec in specs]


SQUEEZERS = Satisfies("a non-empty list of squeezer specs: 'bit_depth:B' (1 <= B <= 8), 'median:K' (2, or odd K >= 3) "
                      "or 'nl_means:S:P:H' (odd S, P >= 1, H > 0)", _squeezer_specs)


# the squeezers in keras.ops, for the scoring graph (non-local means has none)
def _straight_through(x: Any, squeezed: Any) -> Any:
    """`squeezed` in the forward pass, the identity in the backward pass."""
    return x + ops.stop_gradient(squeezed - x)


def _median(x: Any, size: int) -> Any:
    """`median` in keras.ops: replicated borders, the middle of the sorted size x size window (the
    upper middle for 2 x 2, whose window is the pixel and its upper-left neighbours, as scipy's), on
    8-bit levels for windows above 5, as OpenCV does for float images."""
    if size > 5:
        x = ops.round(ops.clip(x, 0.0, 1.0) * 255.0) / 255.0
    before, after = size // 2, (size - 1) // 2
    height, width = x.shape[1], x.shape[2]
    rows = ops.concatenate([ops.repeat(x[:, :1], before, axis=1), x, ops.repeat(x[:, -1:], after, axis=1)], axis=1)
    padded = ops.concatenate([ops.repeat(rows[:, :, :1], before, axis=2), rows, ops.repeat(rows[:, :, -1:], after, axis=2)], axis=2)
    windows = [padded[:, i:i + height, j:j + width] for i in range(size) for j in range(size)]
    return ops.sort(ops.stack(windows, axis=-1), axis=-1)[..., size * size // 2]


def graph_squeezer(spec: str) -> Callable[[Any], Any] | None:
    """The keras.ops version of a squeezer spec, or None when there is none (non-local means)."""
    name, *args = spec.split(":")
    if name == "bit_depth":
        levels = 2 ** int(args[0]) - 1
        return lambda x: ops.round(ops.clip(x, 0.0, 1.0) * levels) / levels
    if name == "median":
        return lambda x: _median(x, int(args[0]))
    return None


class SqueezeDetector(Detector):
    """Max L1 distance between the classifier's softmax on the input and on squeezed copies.

    squeezers: spec strings; None chooses by channel count (grayscale: 1-bit depth and a 3 x 3 median,
    as Xu et al. for MNIST but with a 3 x 3 median; colour: 5 bits, 2 x 2 median and non-local
    means 13-3-2, as Xu et al. for CIFAR-10).
    """

    kind = "squeeze"
    uses_classifier: ClassVar[bool] = True
    _parameter_constraints = {"squeezers": [None, SQUEEZERS], "batch_size": [Interval(int, 1)]}

    def __init__(self, classifier: keras.Model, *, squeezers: Sequence[str] | None = None, batch_size: int = 256) -> None:
        super().__init__()
        self._set_params(locals())
        self.classifier = prepare_classifier(classifier)
        shape = image_shape(self.classifier)
        if len(shape) != 3:
            raise ValueError(f"feature squeezing needs (H, W, C) image inputs, the classifier takes {shape}")
        if self.squeezers is None:
            self.squeezers = list(DEFAULT_SQUEEZERS.get(shape[-1], FALLBACK_SQUEEZERS))
        self._functions = [parse_squeezer(s, shape[:2]) for s in self.squeezers]
        self.classifier_fingerprint = model_fingerprint(self.classifier)

    def _fit(self, x_clean: np.ndarray, x_adversarial: np.ndarray, *, verbose: int | str = 0) -> None:
        """Nothing to learn (the squeezers were chosen at construction); `fit` checked the images."""

    def _softmax(self, x: np.ndarray) -> np.ndarray:
        return softmax(predict(self.classifier, x, self.batch_size)[0])

    def distances(self, x: np.ndarray) -> np.ndarray:
        """(n, squeezers): L1 distance of each squeezed prediction from the plain one."""
        x = check_image_shape(x, image_shape(self.classifier))
        plain = self._softmax(x)
        return np.stack([np.abs(plain - self._softmax(f(x))).sum(axis=1) for f in self._functions], axis=1)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return self.distances(x).max(axis=1)

    def score_graph(self, images: Any) -> Any | None:
        """The same distances in keras.ops; each squeezer is differentiated as the identity (BPDA,
        Athalye et al. 2018). None with non-local means (OpenCV only)."""
        functions = [graph_squeezer(spec) for spec in self.squeezers]
        if any(f is None for f in functions):
            return None
        plain = ops.softmax(self.classifier(images))
        distances = [ops.sum(ops.abs(plain - ops.softmax(self.classifier(_straight_through(images, f(images))))), axis=-1)
                     for f in functions]
        return ops.max(ops.stack(distances, axis=-1), axis=-1)

    def gradient(self) -> str:
        return "bpda"

    def _save_files(self, directory: Path) -> None:
        """No model files: the squeezers are hyper-parameters and the classifier comes at load time."""

    @classmethod
    def _load_files(cls, directory: Path, params: dict[str, Any],
                    classifier: keras.Model | None = None) -> "SqueezeDetector":
        return cls(require_classifier(directory, classifier, cls.kind), **params)
