"""Fit a detector on stored adversarial datasets and calibrate it on held-out clean images
(`training.retrain` retrains one on a new attack without forgetting the old ones).

The source images of the datasets are split by their source index: a random `calibration_fraction`
of them is kept out of training entirely. Their clean versions set the threshold and their
adversarial versions measure detection before and after retraining, so no image the detector was
trained on, in any version, is used to judge it.

Adversarial-only datasets (`"adversarial_only": true` in the manifest: quarantine exports, see
`serving.quarantine_export`) have no clean versions. They join the adversarial side only, next to at least
one ordinary dataset that supplies the clean images; a random fraction of their records (by record
index) is held out the same way, to measure detection on them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import keras
import numpy as np

from attacks.dataset import AdversarialDataset
from detector import FAMILIES, Detector, EnsembleDetector, InputDetector, JointDetector
from detector.ensemble import RULES
from detector.benign_shift import augment_benign, benign_versions
from foundation.validation import check_image_shape, check_images


def adversarial_only(data: AdversarialDataset) -> bool:
    """Whether a dataset has no clean counterparts (its x_clean is meaningless)."""
    return bool(data.manifest.get("adversarial_only", False))


def common_fingerprint(datasets: Sequence[AdversarialDataset]) -> str:
    """The one classifier all datasets were made for; the source indices of those with clean images
    must also refer to the same images (same data and split), or pairing clean and adversarial
    images by index is wrong. Adversarial-only datasets need at least one such dataset beside them."""
    fingerprints = {d.manifest["classifier_fingerprint"] for d in datasets}
    if len(fingerprints) != 1:
        raise ValueError("the adversarial datasets were made for different classifiers; use one classifier's data")
    paired = [d for d in datasets if not adversarial_only(d)]
    if not paired:
        raise ValueError("adversarial-only datasets (quarantine exports) have no clean images: "
                         "add a dataset of the original source (e.g. the detector's replay data)")
    sources = {(d.manifest["source"].get("data"), d.manifest["source"].get("split")) for d in paired}
    if len(sources) != 1:
        raise ValueError(f"the adversarial datasets come from different source data or splits: {sorted(map(str, sources))}")
    shapes = {d.x_adv.shape[1:] for d in datasets}
    if len(shapes) != 1:
        raise ValueError(f"the adversarial datasets hold images of different shapes: {sorted(shapes)}")
    return fingerprints.pop()


@dataclasses.dataclass(frozen=True)
class SourceSplit:
    """Clean images for fitting and for calibration, and each dataset's adversarial images on both sides."""

    x_clean_fit: np.ndarray
    x_clean_held_out: np.ndarray
    adversarial_fit: list[np.ndarray]
    adversarial_held_out: list[np.ndarray]


def _hold_out(ids: np.ndarray, fraction: float, rng: np.random.Generator, what: str) -> np.ndarray:
    """A random `fraction` (at least one, never all) of `ids`."""
    n_held_out = max(1, round(fraction * len(ids)))
    if n_held_out >= len(ids):
        raise ValueError(f"{len(ids)} {what} are too few to hold out {fraction:.0%}")
    return rng.choice(ids, size=n_held_out, replace=False)


def split_by_source(datasets: Sequence[AdversarialDataset], calibration_fraction: float, seed: int) -> SourceSplit:
    """Hold out a random `calibration_fraction` of the source images (all their versions), and the
    same fraction of each adversarial-only dataset's records (by record index). Records the attack
    left unchanged are dropped (`_changed`)."""
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
    changed = [_changed(data) for data in datasets]
    clean_by_index: dict[int, np.ndarray] = {}
    for data in datasets:
        if not adversarial_only(data):
            for position, source in enumerate(data.index):
                clean_by_index.setdefault(int(source), data.x_clean[position])
    sources = np.array(sorted(clean_by_index))
    rng = np.random.default_rng(seed)
    held_out = _hold_out(sources, calibration_fraction, rng, "source images")
    is_held = np.isin(sources, held_out)
    held = []
    for data in datasets:
        if adversarial_only(data):
            what = f"records of {data.manifest['source'].get('data')}"
            held.append(np.isin(data.index, _hold_out(np.unique(data.index), calibration_fraction, rng, what)))
        else:
            held.append(np.isin(data.index, held_out))
    return SourceSplit(
        x_clean_fit=np.stack([clean_by_index[s] for s in sources[~is_held]]),
        x_clean_held_out=np.stack([clean_by_index[s] for s in sources[is_held]]),
        adversarial_fit=[d.x_adv[~h & c] for d, h, c in zip(datasets, held, changed, strict=True)],
        adversarial_held_out=[d.x_adv[h & c & d.success] for d, h, c in zip(datasets, held, changed, strict=True)],
    )


def _changed(data: AdversarialDataset) -> np.ndarray:
    """The records an attack perturbed. A minimal attack (CW, DeepFool) returns an image it could not
    fool, or one the classifier already got wrong, unchanged: a clean image, which as a positive
    would teach the detector to flag clean images and count as a miss in the held-out TPR. Records
    of an adversarial-only dataset (no clean counterpart) all count."""
    changed = np.ones(len(data.index), bool) if adversarial_only(data) else data.l2 > 0
    if not changed.any():
        raise ValueError(f"the {data.attack} dataset holds no perturbed image: every record equals its clean source")
    return changed


def describe_datasets(datasets: Sequence[AdversarialDataset], paths: Sequence[str] | None) -> list[dict[str, Any]]:
    return [
        {"attack": d.manifest["attack"], "count": int(len(d.index)), "source": d.manifest.get("source", {}),
         **({"adversarial_only": True} if adversarial_only(d) else {}), **({"path": str(paths[i])} if paths else {})}
        for i, d in enumerate(datasets)
    ]


# the ensemble's members by image kind (docs/benchmarks.md, "Detection quality"): `margin` sees minimal attacks,
# `shift_margin` those that stop just past the boundary (ART's CW-L2: MNIST 92.2% -> 96.4% with it, CIFAR-10 18.9%
# -> 68.9%), `odds` confident L2 ones (CIFAR-10 L2 PGD 0.5: 0.988 / 91% with it, 0.898 / 33% without); on colour
# images `shift_drop` replaces `activations` (CIFAR-10: seen PGD 97.6% -> 100%, L2 PGD 86.0% -> 100%, ART's CW-L2
# 64.0% -> 69.8%); not on grey ones (MNIST: as a sixth member ART's CW-L2 94.3% -> 90.1%); on CIFAR-10
# with the ResNet `squeeze` (seen AUROC 0.61-0.67) and `mahalanobis` (FGSM 0.54) are left out
DEFAULT_MEMBERS = ("input", "safetynet", "squeeze", "margin", "shift_margin")
COLOUR_MEMBERS = ("input", "margin", "shift_margin", "odds", "shift_drop")


def default_members(image_shape: Sequence[int | None]) -> tuple[str, ...]:
    """The ensemble's members for images of this (H, W, C) shape: COLOUR_MEMBERS for 3 channels."""
    return COLOUR_MEMBERS if image_shape[-1] == 3 else DEFAULT_MEMBERS


def make_detector(family: str, classifier: keras.Model | None, *, epochs: int, seed: int) -> Detector:
    """An unfitted detector of `family` (not `ensemble` or `joint`, which wrap fitted ones) with the
    pipeline's training settings."""
    if family not in FAMILIES or family in ("ensemble", "joint"):
        raise ValueError(f"unknown detector family {family!r}: expected one of {sorted(FAMILIES)}")
    cls = FAMILIES[family]
    if cls.uses_classifier and classifier is None:
        raise ValueError(f"the {family!r} detector reads the classifier: give the classifier model")
    if family == "input":
        return InputDetector(epochs=epochs, seed=seed)
    if family == "activations":
        return cls(classifier, epochs=epochs, seed=seed)
    if family in ("squeeze", "margin", "shift_margin", "shift_drop"):
        return cls(classifier)
    return cls(classifier, seed=seed)


def with_benign_copies(x: np.ndarray, augment: bool, seed: int, stream: int) -> np.ndarray:
    """`x`, with a benignly corrupted copy of each image appended when `augment` (seeded per stream)."""
    return augment_benign(x, np.random.default_rng([seed, stream])) if augment else x


def calibration_set(split: SourceSplit, calibration_images: np.ndarray | None) -> np.ndarray:
    """The clean images to set the threshold on: the given ones (checked before anything is fitted:
    their shape, range, and that the detector does not fit on them), else the held-out sources'
    clean versions."""
    if calibration_images is None:
        return split.x_clean_held_out
    x = check_image_shape(check_images(calibration_images, (0.0, 1.0)), split.x_clean_held_out.shape[1:],
                          "the adversarial datasets' images")
    fitted = {image.tobytes() for image in split.x_clean_fit}
    if overlap := sum(image.tobytes() in fitted for image in x):
        raise ValueError(f"{overlap} of the {len(x)} calibration images are source images the detector is fitted on: "
                         "calibrate on images neither the classifier nor the detector trained on")
    return x


def calibration_info(x_calibration: np.ndarray, given: bool) -> dict[str, Any]:
    return {"n_calibration": int(len(x_calibration)), "calibrated_on": "given images" if given else "held-out sources"}


def calibrate_held_out(detector: Detector, x_held_out: np.ndarray, target_fpr: float, shifted_fpr: float | None,
               seed: int) -> Detector:
    """Calibrate on the held-out clean images at `target_fpr`; with `shifted_fpr`, also cap the FPR
    of each benign corruption (`benign_versions` of every held-out image) at `shifted_fpr`, with
    95% confidence (`detector.calibration.capped_calibration`)."""
    if shifted_fpr is None:
        return detector.calibrate(x_held_out, target_fpr)
    shifted = benign_versions(x_held_out, [seed, 3])
    return detector.calibrate(x_held_out, target_fpr, shifted=shifted, shifted_fpr=shifted_fpr)


def fit_detector(
    datasets: Sequence[AdversarialDataset],
    *,
    family: str = "input",
    classifier: keras.Model | None = None,
    members: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    target_fpr: float = 0.05,
    shifted_fpr: float = 0.10,
    calibration_fraction: float = 0.2,
    epochs: int = 10,
    seed: int = 0,
    benign_augmentation: bool = True,
    ensemble_rule: str = "max",
    calibration_images: np.ndarray | None = None,
    verbose: int | str = 2,
) -> Detector:
    """Train a detector of `family` on clean vs adversarial pairs and calibrate it on held-out clean
    images. An `ensemble` fits its `members` on 75% of the training sources and its stacker on the
    other 25%, so the stacker learns how members behave on images they have not seen (`members`
    None: `default_members` for the images); `joint` does
    the same with one member (`members[0]`) and the classifier's logit gap (`detector.joint`).
    `ensemble_rule` combines an ensemble's members (`detector.ensemble`): "max" (default) flags what
    any member flags at a common clean quantile, which keeps the squeezer's view of minimal attacks
    that a "logistic" stacker fitted on FGSM and PGD weighs down (MNIST, ART's CW-L2: AUROC 0.95
    against 0.885; docs/benchmarks.md).

    `benign_augmentation` appends to the clean fitting images (each part's, for `ensemble` and
    `joint`) a copy of each with an ordinary corruption (`detector.benign_shift.augment_benign`:
    JPEG, noise, shifts, resizing), so that images from a real pipeline are not learnt as
    adversarial, and sets the one threshold as the smallest that flags at most `target_fpr` of the
    held-out clean images and keeps each corruption's FPR at most `shifted_fpr` with 95% confidence
    (its exact upper bound on all held-out images under it); `detector.calibration` records each
    corruption's own threshold, rate and bound, and which cap bound. An ensemble's max rule then
    anchors each member on its worst corruption of the stacker's images, so that a member which
    flags one corruption does not lift the threshold for all. Without it, the threshold flags
    `target_fpr` of the held-out images.

    `calibration_images`: clean images like those the guard will serve, none of them a source the
    detector fits on, to set the threshold on instead of the held-out sources' clean versions
    (`training.calibration_images` says why); the held-out sources then only measure detection,
    and are still never trained on.

    `paths` (the datasets' directories) are recorded so that retraining can replay them later.
    """
    if not datasets:
        raise ValueError("fitting a detector needs at least one adversarial dataset")
    if ensemble_rule not in RULES:  # before any member is trained
        raise ValueError(f"ensemble_rule must be one of {list(RULES)}, got {ensemble_rule!r}")
    fingerprint = common_fingerprint(datasets)
    split = split_by_source(datasets, calibration_fraction, seed)
    x_adversarial = np.concatenate(split.adversarial_fit)
    x_calibration = calibration_set(split, calibration_images)
    members = tuple(members) if members else default_members(x_adversarial.shape[1:])
    if family in ("ensemble", "joint"):
        if family == "joint" and classifier is None:
            raise ValueError("the 'joint' detector reads the classifier: give the classifier model")
        rng = np.random.default_rng(seed)
        clean_part = rng.random(len(split.x_clean_fit)) < 0.75
        adversarial_part = rng.random(len(x_adversarial)) < 0.75
        members_clean = with_benign_copies(split.x_clean_fit[clean_part], benign_augmentation, seed, 1)
        stacker_clean = with_benign_copies(split.x_clean_fit[~clean_part], benign_augmentation, seed, 2)
        fitted = [
            make_detector(m, classifier, epochs=epochs, seed=seed).fit(members_clean, x_adversarial[adversarial_part], verbose=verbose)
            for m in (members if family == "ensemble" else members[:1])
        ]
        for member in fitted:
            member.classifier_fingerprint = fingerprint
        stacker = (EnsembleDetector(fitted, rule=ensemble_rule, seed=seed) if family == "ensemble"
                   else JointDetector(fitted[0], classifier, seed=seed))
        anchors = ({"shifted": benign_versions(split.x_clean_fit[~clean_part], [seed, 2])}
                   if benign_augmentation and family == "ensemble" and ensemble_rule == "max" else {})
        detector = stacker.fit(stacker_clean, x_adversarial[~adversarial_part], verbose=verbose, **anchors)
        n_fit_clean = len(members_clean) + len(stacker_clean)
    else:
        x_clean = with_benign_copies(split.x_clean_fit, benign_augmentation, seed, 1)
        detector = make_detector(family, classifier, epochs=epochs, seed=seed).fit(x_clean, x_adversarial, verbose=verbose)
        n_fit_clean = len(x_clean)
    calibrate_held_out(detector, x_calibration, target_fpr, shifted_fpr if benign_augmentation else None, seed)
    detector.classifier_fingerprint = fingerprint
    detector.info = {
        "trained_on": describe_datasets(datasets, paths),
        "calibration_fraction": calibration_fraction,
        "benign_augmentation": benign_augmentation,
        "n_fit_clean": int(n_fit_clean),
        "n_fit_adversarial": int(len(x_adversarial)),
        **calibration_info(x_calibration, calibration_images is not None),
        "version": 1,
    }
    return detector


def detection_rates(detector: Detector, split: SourceSplit, names: Sequence[str]) -> dict[str, float]:
    """TPR at the calibrated threshold on each dataset's held-out successful adversarial images."""
    return {
        name: float(detector.predict(x).mean()) if len(x) else float("nan")
        for name, x in zip(names, split.adversarial_held_out, strict=True)
    }
