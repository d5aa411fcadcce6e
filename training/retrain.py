"""Retrain a fitted detector on a new attack without forgetting the old ones: the `input` family is
fine-tuned from its weights; every other family (the ensemble, joint, activations and the rest) is
fitted again, with its own members, rule, training epochs, target FPR and benign cap, on the new
datasets and replayed earlier ones (each family as `fit_detector` makes it: parameters set by hand
in Python, such as an activation detector's layers, are not carried over). Either way the held-out
TPR of every attack is measured before and after on the same held-out sources
(`training.detector.split_by_source`), which neither the old nor the new detector was fitted on.

The `input` family on 8x8 digits learns nothing from CW-L2 (held-out AUROC 0.65 after fine-tuning,
with or without benign augmentation), while the default ensemble, whose `margin` member sees minimal
attacks, already catches most of it: refitting the ensemble is what retraining means for it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from attacks.dataset import AdversarialDataset
from detector import Detector, EnsembleDetector, InputDetector, JointDetector
from training.detector import (
    calibrate_held_out,
    calibration_info,
    calibration_set,
    common_fingerprint,
    describe_datasets,
    detection_rates,
    fit_detector,
    split_by_source,
    with_benign_copies,
)

REFIT_EPOCHS = 10  # fit_detector's default, for families without an `epochs` parameter of their own
FINE_TUNE_LEARNING_RATE = 3e-4  # the `input` family's fine-tuning, a third of its training rate


def _check(detector: Detector, new: Sequence[AdversarialDataset], replay: Sequence[AdversarialDataset]) -> str:
    """The datasets' common classifier fingerprint, after checking the detector can be retrained on them."""
    if not new:
        raise ValueError("retraining needs at least one new adversarial dataset")
    if detector.calibration is None:
        raise ValueError("the detector to retrain is not calibrated")
    fingerprint = common_fingerprint([*new, *replay])
    if detector.classifier_fingerprint not in (None, fingerprint):
        raise ValueError("the new datasets were made for a different classifier than the detector's")
    return fingerprint


def _names(new: Sequence[AdversarialDataset], replay: Sequence[AdversarialDataset]) -> list[str]:
    return [f"{'new' if i < len(new) else 'replay'}:{d.attack}:{i}" for i, d in enumerate([*new, *replay])]


def _members(detector: Detector) -> list[Detector]:
    if isinstance(detector, EnsembleDetector):
        return list(detector.members)
    return [detector.member] if isinstance(detector, JointDetector) else [detector]


def _epochs(detector: Detector) -> int:
    """The training epochs the detector's members were fitted with (REFIT_EPOCHS where none has any)."""
    found = [m.get_params()["epochs"] for m in _members(detector) if "epochs" in m.get_params()]
    return max(found, default=REFIT_EPOCHS)


def retrain_detector(
    detector: Detector,
    new: Sequence[AdversarialDataset],
    replay: Sequence[AdversarialDataset],
    *,
    classifier: keras.Model | None = None,
    paths: Sequence[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    benign_augmentation: bool = True,
    shifted_fpr: float | None = None,
    calibration_images: np.ndarray | None = None,
    verbose: int | str = 2,
    version: int | None = None,
) -> tuple[Detector, dict[str, Any]]:
    """The retrained detector (the given one is unchanged) and the before/after report.

    `epochs`: fine-tuning epochs for `input` (None: 5), training epochs of a refit (None: those its
    members were fitted with). `classifier`: needed by every family but `input`. `shifted_fpr`
    defaults to the detector's own cap (0.10 if it had none); `version` to one higher.
    `calibration_images` as in `fit_detector`: a detector calibrated on given images needs them again."""
    fingerprint = _check(detector, new, replay)
    if calibration_images is None and detector.info.get("calibrated_on") == "given images":
        raise ValueError("the detector was calibrated on given clean images, not on its held-out sources: "
                         "give the same calibration images again")
    refits = not isinstance(detector, InputDetector)
    if refits and classifier is None:
        raise ValueError(f"retraining a {detector.kind!r} detector fits it again, and it reads the classifier: "
                         "give the classifier model")
    if shifted_fpr is None:
        shifted_fpr = detector.calibration.shifted_fpr or 0.10
    datasets, fraction = [*new, *replay], detector.info.get("calibration_fraction", 0.2)
    split, names = split_by_source(datasets, fraction, seed), _names(new, replay)
    x_calibration = calibration_set(split, calibration_images)  # checked before anything is fitted
    before = detection_rates(detector, split, names)
    if refits:
        family = detector.kind
        retrained = fit_detector(
            datasets, family=family, classifier=classifier, paths=paths,
            members=[m.kind for m in _members(detector)] if family in ("ensemble", "joint") else None,
            ensemble_rule=detector.rule if isinstance(detector, EnsembleDetector) else "max",
            target_fpr=detector.calibration.target_fpr, shifted_fpr=shifted_fpr, calibration_fraction=fraction,
            epochs=_epochs(detector) if epochs is None else epochs, seed=seed,
            benign_augmentation=benign_augmentation, calibration_images=calibration_images, verbose=verbose)
    else:
        retrained = _fine_tune(detector, split, 5 if epochs is None else epochs, seed, benign_augmentation, verbose)
        calibrate_held_out(retrained, x_calibration, detector.calibration.target_fpr,
                           shifted_fpr if benign_augmentation else None, seed)
        retrained.info = calibration_info(x_calibration, calibration_images is not None)
        retrained.classifier_fingerprint = fingerprint
    return retrained, _report(detector, retrained, split, names, before, new, replay, paths, benign_augmentation, version)


def _report(old: Detector, retrained: Detector, split: Any, names: list[str], before: dict[str, float],
            new: Sequence[AdversarialDataset], replay: Sequence[AdversarialDataset], paths: Sequence[str] | None,
            benign_augmentation: bool, version: int | None) -> dict[str, Any]:
    """Record the lineage in the retrained detector's info, and the before/after report."""
    retrained.info = {
        # the spec of the old calibration images goes: retrain_stage records the one it used
        **{k: v for k, v in old.info.items() if k != "calibration_images"},
        **{k: v for k, v in retrained.info.items() if k.startswith("n_") or k == "calibrated_on"},
        "trained_on": old.info.get("trained_on", []) + describe_datasets(new, paths[: len(new)] if paths else None),
        "version": int(old.info.get("version", 1)) + 1 if version is None else version,
        "benign_augmentation": benign_augmentation,
        "retrained_with_replay": describe_datasets(replay, paths[len(new):] if paths else None),
    }
    after = detection_rates(retrained, split, names)
    return {"before": before, "after": after, "threshold_before": old.threshold,
            "threshold_after": retrained.threshold, "calibration_fpr_after": retrained.calibration.fpr,
            "bound_by_after": retrained.calibration.bound_by, "calibration_warnings": retrained.calibration.warnings()}


def retrain_lines(report: dict[str, Any], saved: str) -> list[str]:
    """The before/after table, the threshold and `saved`, then a warning per attack whose held-out TPR
    fell by more than a point: retraining can lose, most often where a benign corruption's cap lifted
    the threshold (a new attack that looks like noise teaches the detector to flag noisy images)."""
    cause = report["bound_by_after"]
    lines = [f"{'held-out TPR':<32}{'before':>10}{'after':>10}"]
    lines += [f"{name:<32}{before:>10.4f}{report['after'][name]:>10.4f}" for name, before in report["before"].items()]
    lines.append(f"threshold {report['threshold_before']:.4g} -> {report['threshold_after']:.4g} "
                 f"(set by {'the target FPR' if cause in (None, 'nominal') else f'the cap on {cause}'}); {saved}")
    why = ("" if cause in (None, "nominal") else f"; the cap on {cause} set the threshold: keep the old version, or "
           "retry with a higher --shifted-fpr or --no-benign-augmentation")
    lost = [f"warning: retraining lowered the held-out TPR of {name} from {before:.4f} to {report['after'][name]:.4f}{why}"
            for name, before in report["before"].items() if report["after"][name] < before - 0.01]
    return lines + report.get("calibration_warnings", []) + lost


def _fine_tune(detector: InputDetector, split: Any, epochs: int, seed: int, benign_augmentation: bool,
               verbose: int | str) -> InputDetector:
    """A copy of an `input` detector fine-tuned on the split's fitting side (new attacks and replay),
    not yet calibrated."""
    retrained = InputDetector(**(detector.get_params() | {"epochs": epochs, "seed": seed}))
    retrained.model = _clone(detector)
    retrained.fit(with_benign_copies(split.x_clean_fit, benign_augmentation, seed, 1), np.concatenate(split.adversarial_fit),
                  warm_start=True, learning_rate=FINE_TUNE_LEARNING_RATE, verbose=verbose)
    return retrained


def _clone(detector: InputDetector) -> keras.Model:
    model = keras.models.clone_model(detector.model)
    model.set_weights(detector.model.get_weights())
    return model


def next_version(detector_dir: str | os.PathLike, version: int) -> tuple[int, Path]:
    """The retrained detector's version number and default folder, DETECTOR.vN beside the others:
    N is one past both `version` (the detector's own) and every sibling version already written, so
    retraining detector.v2 writes detector.v3 (not detector.v2.v3), and retraining detector again
    after detector.v2 exists writes detector.v3 instead of failing."""
    path = Path(detector_dir).resolve()
    base = re.sub(r"\.v\d+$", "", path.name)
    pattern = re.compile(rf"{re.escape(base)}\.v(\d+)")
    taken = [int(match.group(1)) for sibling in path.parent.iterdir() if (match := pattern.fullmatch(sibling.name))]
    number = max([version, *taken]) + 1
    return number, Path(detector_dir).parent / f"{base}.v{number}"
