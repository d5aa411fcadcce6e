"""The pipeline's stages as functions of files: each reads what the previous one wrote.

train_classifier_stage -> classifier.keras, in `training.classifier_stage`
attack_stage           -> adversarial dataset directory (one per attack)
dataset_info, dataset_verify, dataset_merge -> a dataset's summary, its check, its joined parts
train_detector_stage   -> detector directory
retrain_stage          -> the detector's next version beside it
evaluate_stage         -> report.json (+ the table as text), in `training.evaluate_stage`
quickstart             -> all of the above into one folder, with defaults that suit the data

Which attacks run, and at which eps, is `training.attack_specs`. The `safetynet` command maps its
arguments onto these functions and nothing else.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from attacks import Attack
from attacks.dataset import (
    ArraySource, describe, generate_dataset, load_adversarial_dataset, merge_datasets, verify_dataset,
)
from foundation.models import load_model
from foundation.storage import model_fingerprint
from detector import Detector, load_detector
from training.attack_specs import resolve_attack
from training.calibration_images import named_images
from training.data import ImageDataset, load_dataset
from training.detector import fit_detector
from training.retrain import next_version, retrain_detector, retrain_lines

Log = Callable[[str], None]
Data = str | ImageDataset


def fit_verbosity() -> int:
    """Keras's live progress bar on a terminal, one line per epoch in logs and CI."""
    return 1 if sys.stdout.isatty() else 2


def as_dataset(data: Data) -> ImageDataset:
    """Stages take a data spec or an already loaded dataset (quickstart loads it once)."""
    return data if isinstance(data, ImageDataset) else load_dataset(data)


def select(data: ImageDataset, split: str, n: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `n` images (all when None) of a split, with their labels and source indices."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    count = len(x) if n is None else min(n, len(x))
    return x[:count], y[:count], np.arange(count)


def attack_stage(
    model_path: str | os.PathLike,
    data: Data,
    attack: Attack | str,
    out: str | os.PathLike,
    *,
    params: dict[str, Any] | None = None,
    split: str = "train",
    n: int | None = None,
    targets: str | None = None,
    surrogate: str | os.PathLike | None = None,
    part: tuple[int, int] = (0, 1),
    shard_size: int = 10_000,
    batch_size: int = 256,
    log: Log = print,
) -> dict[str, Any]:
    """Attack a split of the data with a saved classifier and write the adversarial dataset.

    `attack` is an Attack or a spec like `pgd:steps=20`; `params` override the spec's parameters.
    `targets` ("random" or "least_likely") makes the attack targeted. With `surrogate`, examples
    are crafted on that model and their success is measured on the classifier (transfer attack).
    `part=(i, n)` attacks only the i-th of n contiguous parts (one host of many; see `merge`).
    Rerunning into the same `out` resumes an interrupted run.
    """
    model = load_model(model_path)
    crafting_model = model if surrogate is None else load_model(surrogate)
    data = as_dataset(data)
    attack = resolve_attack(attack, data, {k: v for k, v in (params or {}).items() if v is not None})
    x, y, index = select(data, split, n)
    manifest = generate_dataset(
        crafting_model, attack, ArraySource(x, y, index), out, targets=targets, batch_size=batch_size,
        transfer_to=None if surrogate is None else model, part=part, shard_size=shard_size,
        source_info={"data": data.name, "split": split, "n": int(len(x))},
    )
    if surrogate is not None:
        log(f"crafted on {surrogate}; success measured on {model_path}")
    return manifest


def dataset_info(directory: str | os.PathLike, *, log: Log = print) -> None:
    for line in describe(directory):
        log(line)


def dataset_verify(directory: str | os.PathLike, *, log: Log = print) -> bool:
    """Check every shard; report problems; True when the dataset is complete and intact."""
    report = verify_dataset(directory)
    for name, problem in report.problems.items():
        log(f"{name}: {problem}")
    if not report.complete:
        log(f"{directory}: incomplete (rerun its attack command to resume)")
    log(f"{directory}: {report.checked} shards checked, {'OK' if report.ok else 'PROBLEMS FOUND'}")
    return report.ok


def dataset_merge(parts: Sequence[str | os.PathLike], out: str | os.PathLike, *, log: Log = print) -> dict[str, Any]:
    manifest = merge_datasets(parts, out)
    log(f"merged {len(parts)} parts: {manifest['count']} examples in {len(manifest['shards'])} shards -> {out}")
    return manifest


def train_detector_stage(
    adversarial: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    family: str = "input",
    model_path: str | os.PathLike | None = None,
    members: Sequence[str] | None = None,
    target_fpr: float = 0.05,
    epochs: int = 10,
    seed: int = 0,
    benign_augmentation: bool = True,
    shifted_fpr: float = 0.10,
    calibrate_on: str | None = None,
    log: Log = print,
) -> float:
    """Fit a detector on adversarial datasets, calibrate it, save it; return its threshold.
    `benign_augmentation`: fit on corrupted copies of the clean images too, and cap the FPR of each
    corruption of the held-out images at `shifted_fpr` (`fit_detector`). `calibrate_on`
    (DATA:SPLIT:START:STOP, `training.calibration_images`): clean images like those the guard
    will serve, to set the threshold on instead of the held-out sources.

    Families that read the classifier (all but `input`) need `model_path`, the classifier the
    datasets were made for (checked against their fingerprint).
    """
    datasets = [load_adversarial_dataset(path) for path in adversarial]
    classifier = None if model_path is None else load_model(model_path)
    if classifier is not None and model_fingerprint(classifier) != datasets[0].manifest["classifier_fingerprint"]:
        raise ValueError(f"{model_path} is not the classifier the adversarial datasets were made for")
    named, x_calibration = named_images(calibrate_on)
    detector = fit_detector(
        datasets, family=family, classifier=classifier, members=members,
        paths=[str(Path(p).resolve()) for p in adversarial], target_fpr=target_fpr, epochs=epochs, seed=seed,
        benign_augmentation=benign_augmentation, shifted_fpr=shifted_fpr, calibration_images=x_calibration,
        verbose=fit_verbosity(),
    )
    if named:
        detector.info["calibration_images"] = named  # retrain loads them again
    detector.save(out)
    calibration = detector.calibration
    log(
        f"detector saved to {out}: threshold {calibration.threshold:.4g}, calibration FPR {calibration.fpr:.4f} on "
        + (f"images {named}" if named else f"{calibration.n_clean} held-out clean images")
        + (f" (set by {calibration.bound_by}: each benign corruption at most {calibration.shifted_fpr:g}"
           + (f" with {calibration.shifted_confidence:.0%} confidence" if calibration.shifted_confidence else "") + ")"
           if calibration.bound_by else "")
    )
    for line in calibration.warnings():
        log(line)
    return calibration.threshold


def retrain_stage(
    detector_dir: str | os.PathLike,
    adversarial: Sequence[str | os.PathLike],
    *,
    model_path: str | os.PathLike | None = None,
    replay: Sequence[str | os.PathLike] | None = None,
    out: str | os.PathLike | None = None,
    epochs: int | None = None,
    seed: int = 0,
    benign_augmentation: bool = True,
    shifted_fpr: float | None = None,
    calibrate_on: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Retrain a detector on new attacks with replay of earlier data (`training.retrain`: `input` is
    fine-tuned, every other family fitted again, which needs the classifier at `model_path`); write
    a new version next to the old one (never over it) and print detection on every attack before
    and after.

    `replay` defaults to the datasets the detector was trained on (as recorded in its manifest),
    `calibrate_on` to the images it was calibrated on. `adversarial` may hold quarantine exports
    (adversarial-only): their images join the adversarial side and the clean images come from the
    other datasets (see `training.detector`).
    """
    kind = Detector.read_manifest(detector_dir).get("kind")
    if model_path is None and kind != "input":
        raise ValueError(f"retraining the {kind!r} detector at {detector_dir} fits it again, and it reads "
                         "the classifier: give --model")
    classifier = None if model_path is None else load_model(model_path)
    detector = load_detector(detector_dir, classifier=classifier)
    version, default_out = next_version(detector_dir, int(detector.info.get("version", 1)))
    out = Path(out) if out else default_out
    if out.exists():
        raise FileExistsError(f"{out} already exists: retraining never overwrites a detector")
    if replay is None:
        replay = [entry["path"] for entry in detector.info.get("trained_on", []) if "path" in entry]
    new_sets = [load_adversarial_dataset(p) for p in adversarial]
    replay_sets = [load_adversarial_dataset(p) for p in replay]
    named, x_calibration = named_images(calibrate_on or detector.info.get("calibration_images"))
    retrained, report = retrain_detector(
        detector, new_sets, replay_sets, classifier=classifier, paths=[str(Path(p).resolve()) for p in [*adversarial, *replay]],
        epochs=epochs, seed=seed, benign_augmentation=benign_augmentation, shifted_fpr=shifted_fpr,
        calibration_images=x_calibration, verbose=fit_verbosity(), version=version,
    )
    if named:
        retrained.info["calibration_images"] = named
    retrained.save(out)
    for line in retrain_lines(report, f"version {version} saved to {out}"):
        log(line)
    return report | {"out": str(out)}
