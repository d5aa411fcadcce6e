"""Fit a detector on stored adversarial datasets and calibrate its threshold on held-out clean images.

The source images of the datasets are split by their source index: a random `calibration_fraction`
of them is kept out of training entirely, and only their clean versions set the threshold. So the
calibration images were never seen by the detector, and no adversarial image of the same source
leaks into its training.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from attacks.dataset import AdversarialDataset
from detector import InputDetector


def _common_fingerprint(datasets: Sequence[AdversarialDataset]) -> str:
    """The one classifier all datasets were made for; their source indices must also refer to the
    same images (same data and split), or pairing clean and adversarial images by index is wrong."""
    fingerprints = {d.manifest["classifier_fingerprint"] for d in datasets}
    if len(fingerprints) != 1:
        raise ValueError("the adversarial datasets were made for different classifiers; use one classifier's data")
    sources = {(d.manifest["source"].get("data"), d.manifest["source"].get("split")) for d in datasets}
    if len(sources) != 1:
        raise ValueError(f"the adversarial datasets come from different source data or splits: {sorted(map(str, sources))}")
    return fingerprints.pop()


def fit_input_detector(
    datasets: Sequence[AdversarialDataset],
    *,
    target_fpr: float = 0.05,
    calibration_fraction: float = 0.2,
    epochs: int = 10,
    seed: int = 0,
    verbose: int | str = 2,
) -> InputDetector:
    """Train the `input` detector on clean vs adversarial pairs and calibrate it on held-out clean images."""
    if not datasets:
        raise ValueError("fitting a detector needs at least one adversarial dataset")
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
    fingerprint = _common_fingerprint(datasets)
    shapes = {d.x_clean.shape[1:] for d in datasets}
    if len(shapes) != 1:
        raise ValueError(f"the adversarial datasets hold images of different shapes: {sorted(shapes)}")

    clean_by_index: dict[int, np.ndarray] = {}
    for data in datasets:
        for position, source in enumerate(data.index):
            clean_by_index.setdefault(int(source), data.x_clean[position])
    sources = np.array(sorted(clean_by_index))
    rng = np.random.default_rng(seed)
    n_calibration = max(1, int(round(calibration_fraction * len(sources))))
    if n_calibration >= len(sources):
        raise ValueError(f"{len(sources)} source images are too few to hold out {calibration_fraction:.0%} for calibration")
    held_out = set(rng.choice(sources, size=n_calibration, replace=False).tolist())

    x_clean = np.stack([clean_by_index[s] for s in sources if s not in held_out])
    x_calibration = np.stack([clean_by_index[s] for s in sources if s in held_out])
    x_adversarial = np.concatenate(
        [d.x_adv[~np.isin(d.index, list(held_out))] for d in datasets]
    )
    detector = InputDetector(epochs=epochs, seed=seed).fit(x_clean, x_adversarial, verbose=verbose)
    detector.calibrate(x_calibration, target_fpr)
    detector.classifier_fingerprint = fingerprint
    detector.info = {
        "trained_on": [
            {"attack": d.manifest["attack"], "count": int(len(d.index)), "source": d.manifest.get("source", {})}
            for d in datasets
        ],
        "n_fit_clean": int(len(x_clean)),
        "n_fit_adversarial": int(len(x_adversarial)),
        "n_calibration": int(len(x_calibration)),
    }
    return detector
