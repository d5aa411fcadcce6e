"""The classifier stage: data -> a trained classifier file, with its robustness report when it was
trained adversarially. The long runs (adversarial training, the ResNet's standard training) keep
their state after each epoch in a folder beside the file (`training.resume`), so the same command
after an interruption continues from the last finished epoch; the folder goes once the file is saved.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from attacks import Attack
from foundation.backend import Devices
from foundation.models import save_model
from training.adversarial import format_robustness, robustness_report, training_attack, write_robustness
from training.attack_specs import default_eps
from training.augmented import train_augmented
from training.classifier import accuracy, build_classifier, train_adversarial, train_classifier, train_on_adversarial_data
from training.resnet import RESNET_WIDTH
from training.resume import EpochCheckpoint, progress_folder
from training.workflow import Data, Log, as_dataset, fit_verbosity, select


def train_classifier_stage(
    data: Data,
    out: str | os.PathLike,
    *,
    epochs: int = 10,
    seed: int = 0,
    adversarial: Attack | str | None = None,
    adversarial_data: Sequence[str | os.PathLike] = (),
    mix: float | None = None,
    eps_warmup: float = 0.0,
    trades_beta: float | None = None,
    batch_size: int = 128,
    robust_n: int | None = None,
    devices: Devices = 1,
    architecture: str = "reference",
    width: int = RESNET_WIDTH,
    augment: bool | None = None,
    log: Log = print,
) -> float:
    """Train a classifier on the data's train split, save it, return its test accuracy.

    `architecture`: "reference" (the small CNN, early-stopped on a validation split) or "resnet"
    (`training.resnet`, `width` channels first; standard training runs exactly `epochs` on a one-cycle
    schedule, on augmented batches unless `augment` is False: `training.augmented`). `adversarial`
    (an attack or spec such as `pgd:eps=0.3,steps=40` or `fgsm_rs`) trains adversarially (`mix`,
    default 1, of each batch; eps ramps up over `eps_warmup` epochs; `trades_beta` for TRADES; each
    batch shifted and flipped before its attack when `augment`);
    `adversarial_data` mixes in stored adversarial datasets (`mix` default 0.5). Robust accuracy on
    `robust_n` test images (default 1000 when either is given, else none) is printed and written
    beside the model (`training.adversarial.robustness_path`).
    `devices` (a count or "all") runs adversarial training data-parallel (`train_adversarial`).
    """
    data = as_dataset(data)
    if adversarial is not None and adversarial_data:
        raise ValueError("train against an attack (adversarial) or on stored datasets (adversarial_data), not both")
    attack = None if adversarial is None else training_attack(adversarial, default_eps(data.input_shape))
    if devices != 1 and attack is None:
        raise ValueError(f"devices={devices!r}: only adversarial training (adversarial=...) runs on several devices")
    if augment and (adversarial_data or architecture != "resnet" and attack is None):
        raise ValueError("augment is for the resnet architecture's standard training and for adversarial training: "
                         "not for the reference CNN's standard training or adversarial_data")
    given = (None if architecture == "reference"
             else build_classifier(architecture, data.input_shape, data.num_classes, width=width, seed=seed))
    log(f"training {architecture} classifier on {data.name}: {len(data.x_train)} images {data.input_shape}, {data.num_classes} classes")
    common = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "verbose": fit_verbosity()}
    # the long runs (adversarial, ResNet) keep their state after each epoch beside `out`: the same command resumes
    progress = Path(out).with_suffix(".progress")
    run = {"data": data.fingerprint(), "architecture": architecture, "width": width, "augment": augment, "mix": mix,
           "attack": None if attack is None else attack.get_params(), "eps_warmup": eps_warmup, "trades_beta": trades_beta,
           **{k: v for k, v in common.items() if k != "verbose"}}
    if attack is not None:
        log(f"adversarial training against {attack.get_params()}" + ("" if trades_beta is None else f", TRADES beta {trades_beta}")
            + f" (each epoch is kept in {progress}: the same command resumes)")
        model = train_adversarial(
            data.x_train, data.y_train, data.num_classes, attack, model=given, mix=1.0 if mix is None else mix,
            warmup_epochs=eps_warmup, trades_beta=trades_beta, augment=bool(augment), devices=devices,
            checkpoint=progress_folder(progress, run, log), log=log, **common,
        )
    elif adversarial_data:
        model = train_on_adversarial_data(
            data.x_train, data.y_train, data.num_classes, adversarial_data, model=given, mix=0.5 if mix is None else mix, **common
        )
    elif given is not None:
        log(f"each epoch is kept in {progress}: the same command resumes")
        resumable = EpochCheckpoint(progress_folder(progress, run, log), [], log=log)
        model = train_augmented(given, data.x_train, data.y_train, augment=augment is not False, callbacks=[resumable], **common)
    else:
        model = train_classifier(data.x_train, data.y_train, data.num_classes, **common)
    clean_accuracy = accuracy(model, data.x_test, data.y_test)
    save_model(model, out)
    shutil.rmtree(progress, ignore_errors=True)
    log(f"classifier saved to {out}: clean test accuracy {clean_accuracy:.4f}")
    robust_n = (1000 if attack is not None or adversarial_data else 0) if robust_n is None else robust_n
    if robust_n > 0:
        x, y, _ = select(data, "test", robust_n)
        eps, norm = (default_eps(data.input_shape), "inf") if attack is None else (attack.eps, attack.norm)
        report = robustness_report(model, x, y, eps=eps, norm=norm, batch_size=256, seed=seed)
        log(format_robustness(report))
        log(f"robustness report written to {write_robustness(report, out)}")
    return clean_accuracy
