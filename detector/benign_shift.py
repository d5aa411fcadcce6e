"""The ordinary corruptions of a real image pipeline, a detector's clean FPR under each, and the
augmentation that fits and calibrates detectors on them.

A guard calibrated at 5% on pristine test images may reject far more honest traffic once images
have been JPEG re-encoded, resized or shifted by a camera or an upload pipeline (issue 15 measured
20-54% on digits and MNIST). `shifted_fprs` reports the clean FPR at the detector's threshold on
each corruption of the clean test images, beside the nominal one; `augment_benign` gives
`training.detector` clean images with corrupted copies, so that the detector learns them as clean;
`benign_versions` gives the held-out calibration images under every corruption, so that the
threshold caps each corruption's FPR (`detector.calibration.capped_calibration`).

Images are float NHWC in [0, 1] (the project's contract); every corruption returns the same shape
and range. All use OpenCV, seeded per call, so a report is reproducible.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

from detector.base import Detector
from detector.metrics import flagged

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _as_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def jpeg(x: np.ndarray, rng: np.random.Generator, quality: int = 90) -> np.ndarray:
    """Each image JPEG-encoded at `quality` and decoded (colour as OpenCV's BGR, so chroma is right)."""
    out = np.empty_like(x)
    for i, image in enumerate(x):
        pixels = _as_uint8(image)
        if pixels.shape[-1] == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".jpg", pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels,
                                   [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("OpenCV could not JPEG-encode an image")
        decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
        if pixels.shape[-1] == 3:
            decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
        out[i] = decoded.reshape(image.shape).astype(x.dtype) / 255.0
    return out


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, sigma: float = 0.02) -> np.ndarray:
    return np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0).astype(x.dtype)


def shift(x: np.ndarray, rng: np.random.Generator, pixels: int = 1) -> np.ndarray:
    """Each image moved by `pixels` in a random direction (one of 8), borders replicated."""
    out = np.empty_like(x)
    height, width = x.shape[1:3]
    for i, image in enumerate(x):
        dx, dy = pixels * rng.choice([-1, 0, 1], size=2)
        if dx == 0 and dy == 0:
            dx = pixels
        matrix = np.float32([[1, 0, dx], [0, 1, dy]])
        moved = cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE)
        out[i] = moved.reshape(image.shape)
    return out


def resize_down_up(x: np.ndarray, rng: np.random.Generator, factor: float = 0.75) -> np.ndarray:
    """Each image shrunk to `factor` of its size (area averaging) and enlarged back (bilinear)."""
    height, width = x.shape[1:3]
    small = (max(1, round(width * factor)), max(1, round(height * factor)))
    out = np.empty_like(x)
    for i, image in enumerate(x):
        down = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
        out[i] = cv2.resize(down, (width, height), interpolation=cv2.INTER_LINEAR).reshape(image.shape)
    return np.clip(out, 0.0, 1.0)


BENIGN_SHIFTS: dict[str, Corruption] = {
    "jpeg90": jpeg,
    "noise0.02": gaussian_noise,
    "shift1": lambda x, rng: shift(x, rng, 1),
    "shift2": lambda x, rng: shift(x, rng, 2),
    "resize0.75": resize_down_up,
    "jpeg90+noise0.02": lambda x, rng: gaussian_noise(jpeg(x, rng), rng),
}


AUGMENTATIONS: tuple[str, ...] = tuple(BENIGN_SHIFTS)


def augment_benign(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`x` followed by one corrupted copy of each image, each copy's corruption drawn from
    `AUGMENTATIONS` by `rng` (so twice as many images, the originals first, in order)."""
    if x.ndim != 4 or x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"benign augmentation needs float NHWC images in [0, 1], got shape {x.shape}")
    x = np.asarray(x, np.float32)
    choice = rng.integers(len(AUGMENTATIONS), size=len(x))
    copies = np.empty_like(x)
    for index, name in enumerate(AUGMENTATIONS):
        if (chosen := choice == index).any():
            copies[chosen] = BENIGN_SHIFTS[name](x[chosen], rng)
    return np.concatenate([x, copies])


def benign_versions(x: np.ndarray, seed: int | Sequence[int] = 0) -> dict[str, np.ndarray]:
    """Every image of `x` under each corruption of `BENIGN_SHIFTS` (name -> corrupted copy of `x`),
    corruption i drawn from the generator seeded with `[*seed, i]`."""
    if x.ndim != 4 or x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"benign shifts need float NHWC images in [0, 1], got shape {x.shape}")
    entropy = [int(v) for v in np.atleast_1d(seed)]
    return {name: corrupt(np.asarray(x, np.float32), np.random.default_rng([*entropy, index]))
            for index, (name, corrupt) in enumerate(BENIGN_SHIFTS.items())}


def shifted_fprs(detector: Detector, x: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """The clean FPR at the detector's threshold on each benign corruption of `x`, and their maximum."""
    fprs = {name: float(flagged(np.asarray(detector.score(shifted), np.float64), detector.threshold).mean())
            for name, shifted in benign_versions(x, seed).items()}
    fprs["max"] = max(fprs.values())
    return fprs
