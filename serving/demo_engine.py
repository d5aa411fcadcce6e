"""The epsilon demo's engine, without any UI: load a classifier (and guard), prepare an image,
attack it at any eps, and say what the classifier and the detector make of both images.

Moving the slider must not recompile anything, and with the library's engine it does not: eps is a
runtime value of the compiled attack loop, so PGD is one `PGD` object called with each new eps
(`attacks.engine`). FGSM's gradient is taken at the clean image, so it is cached per (image, goal)
and FGSM is the engine's own step from it (`attacks.engine.steepest_step`): an FGSM update is then
one forward pass.
`serving.demo` puts the Gradio page on top; this module needs no Gradio.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import keras
import numpy as np

from attacks import PGD
from attacks.engine import steepest_step
from attacks.norms import perturbation_norms
from detector import load_detector
from foundation.backend import compile_with_model, value_and_grad
from foundation.images import read_image
from foundation.models import load_model, logits_model
from foundation.validation import check_images
from serving.demo_model import IMAGENET_INDEX, imagenet_class_names, imagenet_mobilenet, keras_models_dir
from serving.guard import Guard

ATTACKS = ("FGSM", "PGD")
PGD_STEPS = 10
TAYLOR_POINTS = 21
_CACHE_SIZE = 16


def fit_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """An RGB uint8 image center-cropped to the aspect ratio of `shape` (H, W, C), resized to it
    (area interpolation when shrinking) and scaled to float32 [0, 1]; C=1 converts to gray."""
    height, width, channels = shape
    rows, cols = image.shape[:2]
    scale = min(rows / height, cols / width)
    crop_rows, crop_cols = round(height * scale), round(width * scale)
    top, left = (rows - crop_rows) // 2, (cols - crop_cols) // 2
    image = image[top : top + crop_rows, left : left + crop_cols]
    shrink = crop_rows > height or crop_cols > width
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return (image.reshape(height, width, channels) / np.float32(255)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What the classifier and the guard say about one image: the top-5 (name, probability), the
    detector's score (None without a detector) and the verdict: "accepted", "rejected", "flagged"
    (over the threshold under the guard's "flag" policy) or "no detector"."""

    top5: list[tuple[str, float]]
    score: float | None
    verdict: str


@dataclasses.dataclass(frozen=True)
class TaylorCurve:
    """The attack objective J (cross-entropy of the label; minus that of the target when targeted)
    at x + eps * sign(grad J) and its first-order approximation J(x) + eps * ||grad J||_1, over a
    grid of eps. Not clipped to the image range (as `detector.metrics.fgsm_taylor`), so the two part
    only where the model is not linear."""

    eps: np.ndarray
    loss: np.ndarray
    first_order: np.ndarray
    targeted: bool


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """One demo update: images as float (H, W, C) in [0, 1]; `perturbation` is x_adv - x scaled by
    `amplification` around mid-gray so that it is visible."""

    original: np.ndarray
    perturbation: np.ndarray
    adversarial: np.ndarray
    amplification: float
    linf: float
    l2: float
    before: Prediction
    after: Prediction


class DemoEngine:
    """A classifier taking images in [0, 1], optionally behind a guard, with one compiled input
    gradient shared by every attack and eps. Thread-safe (one update at a time)."""

    def __init__(self, classifier: keras.Model, *, guard: Guard | None = None,
                 class_names: Sequence[str] | None = None, eps_max: float | None = None) -> None:
        self.classifier = logits_model(classifier)
        shape = tuple(self.classifier.input_shape[1:])
        if len(shape) != 3 or None in shape:
            raise ValueError(f"the demo needs a classifier with a fixed (H, W, C) input, got {shape}")
        self.input_shape: tuple[int, int, int] = shape
        self.guard = guard
        classes = int(self.classifier.output_shape[-1])
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
        if len(self.class_names) != classes:
            raise ValueError(f"{len(self.class_names)} class names for a classifier with {classes} outputs")
        # ImageNet-scale colour images: eps up to 0.1 (25/255); grayscale (MNIST-like): up to 0.5
        self.eps_max = eps_max if eps_max is not None else (0.1 if shape[-1] == 3 else 0.5)
        self._gradient = compile_with_model(self.classifier, _objective_and_gradient)
        self._pgd = PGD(eps=self.eps_max, steps=PGD_STEPS)  # called with each eps: compiled once
        self._cache: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, *, guard: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                     detector: str | os.PathLike | None = None) -> DemoEngine:
        """The engine for `safetynet demo`: a guard directory, or a classifier file, or (neither) the
        ImageNet MobileNet; `detector` puts a detector directory in front of the latter two."""
        if guard is not None and (model is not None or detector is not None):
            raise ValueError("give either a guard directory or a model (and detector), not both")
        if guard is not None:
            loaded = Guard.load(guard)
            if loaded.classifier is None:
                raise ValueError(f"guard {guard} has no classifier of its own; the demo needs one")
            classifier, names = loaded.classifier, None
        else:
            classifier, names = (load_model(model), None) if model is not None else imagenet_mobilenet()
            loaded = None if detector is None else Guard(classifier, load_detector(detector, classifier=classifier))
        if names is None and int(classifier.output_shape[-1]) == 1000 and (keras_models_dir() / IMAGENET_INDEX).is_file():
            names = imagenet_class_names(keras_models_dir() / IMAGENET_INDEX)
        return cls(classifier, guard=loaded, class_names=names)

    def prepare(self, path: str | os.PathLike) -> np.ndarray:
        """An image file as the classifier's input: decoded, center-cropped, resized, in [0, 1]."""
        return fit_image(read_image(path, 3), self.input_shape)

    def warm_up(self) -> None:
        """Compile the gradient and the forward passes now rather than on the first user request."""
        image = np.full(self.input_shape, 0.5, np.float32)
        self.update(image, "FGSM", self.eps_max / 10)
        self.taylor(image)

    def update(self, image: np.ndarray, attack: str, eps: float, target: int | None = None) -> DemoResult:
        """Attack one image (H, W, C) in [0, 1] with "FGSM" or "PGD" at `eps` (L-inf), untargeted
        (away from the classifier's own prediction) or towards class `target`."""
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of {list(ATTACKS)}")
        eps = float(eps)
        if not 0.0 <= eps <= self.eps_max:
            raise ValueError(f"eps must lie in [0, {self.eps_max}], got {eps}")
        x = self._checked(image, target)
        with self._lock:
            (_, before), goal, (_, gradient) = self._clean(x, target)
            if attack == "FGSM":
                x_adv = keras.ops.convert_to_numpy(steepest_step(x, x, gradient, eps, eps, "inf", (0.0, 1.0)))
            else:
                x_adv = self._pgd(self.classifier, x, goal, targets=None if target is None else goal, eps=eps).x_adv
            _, after = self._predict(x_adv)[0]
        linf, l2 = (float(keras.ops.convert_to_numpy(n)[0]) for n in perturbation_norms(x, x_adv))
        amplification = 0.5 / linf if linf > 0 else 1.0
        return DemoResult(
            original=x[0], adversarial=x_adv[0], perturbation=np.clip(0.5 + amplification * (x_adv[0] - x[0]), 0, 1),
            amplification=amplification, linf=linf, l2=l2, before=before, after=after,
        )

    def taylor(self, image: np.ndarray, target: int | None = None) -> TaylorCurve:
        """The Taylor picture's data for one image and goal (as in `update`), over eps in
        [0, eps_max]; one batched forward pass, cached per (image, goal)."""
        x = self._checked(image, target)
        with self._lock:
            _, goal, (objective, gradient) = self._clean(x, target)
            key = ("taylor", hashlib.sha1(x.tobytes()).hexdigest(), int(goal[0]), target is not None)
            return self._memo(key, lambda: self._taylor(x, goal, target is not None, objective, gradient))

    def _checked(self, image: np.ndarray, target: int | None) -> np.ndarray:
        """One image as a batch of one, after checking its range, shape and the target class."""
        x = check_images(np.asarray(image)[None], (0.0, 1.0))
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"image of shape {x.shape[1:]} does not fit the classifier's input {self.input_shape}")
        if target is not None and not 0 <= target < len(self.class_names):
            raise ValueError(f"target must be a class index in [0, {len(self.class_names) - 1}], got {target}")
        return x

    def _clean(self, x: np.ndarray, target: int | None
               ) -> tuple[tuple[int, Prediction], np.ndarray, tuple[float, np.ndarray]]:
        """The clean image's (top-1 class, prediction), the attack's goal class (target, else the
        top-1) and (J(x), grad J) there; all cached per image and goal."""
        key = hashlib.sha1(x.tobytes()).hexdigest()
        clean = self._memo(("clean", key), lambda: self._predict(x)[0])
        goal = np.array([clean[0] if target is None else target], np.int32)
        targeted = target is not None
        gradient = self._memo(("gradient", key, int(goal[0]), targeted), lambda: self._objective(x, goal, targeted))
        return clean, goal, gradient

    def _objective(self, x: np.ndarray, goal: np.ndarray, targeted: bool) -> tuple[float, np.ndarray]:
        """(J(x), grad J) for one image: J is the label's cross-entropy, negated when targeted."""
        sign = np.float32(-1.0 if targeted else 1.0)
        values, gradient = self._gradient(x, goal, sign)
        return float(keras.ops.convert_to_numpy(values)[0]), keras.ops.convert_to_numpy(gradient)

    def _taylor(self, x: np.ndarray, goal: np.ndarray, targeted: bool, objective: float,
                gradient: np.ndarray) -> TaylorCurve:
        # quadratic spacing: dense where the first-order approximation still holds, sparse beyond
        eps = (self.eps_max * np.linspace(0.0, 1.0, TAYLOR_POINTS) ** 2).astype(np.float32)
        batch = x + eps[:, None, None, None] * np.sign(gradient)
        logits = self.classifier.predict_on_batch(batch)
        log_probabilities = keras.ops.convert_to_numpy(keras.ops.log_softmax(logits, axis=-1))
        loss = -log_probabilities[:, int(goal[0])]
        return TaylorCurve(eps=eps, loss=-loss if targeted else loss,
                           first_order=objective + eps * float(np.abs(gradient).sum()), targeted=targeted)

    def _predict(self, x: np.ndarray) -> list[tuple[int, Prediction]]:
        """(top-1 class, prediction) per image (through the guard when there is one)."""
        if self.guard is None:
            logits = self.classifier.predict_on_batch(x)
            probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
            scores = flagged = rejected = [None] * len(x)
        else:
            result = self.guard.predict(x)
            probabilities, scores, flagged, rejected = result.probabilities, result.scores, result.flagged, result.rejected
        out = []
        for p, score, flag, reject in zip(probabilities, scores, flagged, rejected, strict=True):
            top = np.argsort(p)[::-1][:5]
            verdict = "no detector" if score is None else "rejected" if reject else "flagged" if flag else "accepted"
            prediction = Prediction([(self.class_names[i], float(p[i])) for i in top],
                                    None if score is None else float(score), verdict)
            out.append((int(top[0]), prediction))
        return out

    def _memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """`compute()` cached under `key` (the oldest of `_CACHE_SIZE` entries dropped first)."""
        if key not in self._cache:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = compute()
        return self._cache[key]


def _objective_and_gradient(forward: Callable[[Any], Any], x: Any, goal: Any, sign: Any) -> tuple[Any, Any]:
    """sign * cross-entropy(goal) per image and its input gradient (compiled once per classifier)."""
    def objective(z: Any) -> tuple[Any, Any]:
        loss = keras.losses.sparse_categorical_crossentropy(goal, forward(z), from_logits=True)
        return sign * loss, loss

    values, _, gradient = value_and_grad(objective, x)
    return values, gradient
