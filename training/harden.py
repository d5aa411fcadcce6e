"""`harden`: from a user's classifier and data to a robust guard.

A detector in front of a non-robust classifier keeps little under an attacker who knows it (Tramer et
al. 2020; Bryniarski et al. 2022), and a detector robust at eps is as hard to build as a classifier
robust at eps/2 (Tramer 2022). So the guard is built around a robust classifier:

1. adversarial fine-tuning of the classifier (PGD-AT, or TRADES with `trades_beta`), eps ramped up
   over the first epochs, early-stopped on PGD robust accuracy on held-out training images (the best
   epoch's weights are kept), stopped with a clear error if it collapses (`training.collapse`);
2. FGSM and PGD datasets against the hardened classifier, and a `joint` detector on them: the member
   family's score and the classifier's own logit gap in one rule (`detector.joint`);
3. one threshold for that rule, calibrated on held-out clean images at the target false-positive rate;
4. the guard directory (`detector.guard_directory`), and the evaluation report with the adaptive,
   detector-aware attacks (unless `evaluate=False`).

Every stage can be cut off and resumed by running the same command again: the fine-tuning keeps
its state after each epoch (`training.resume`), the datasets and the evaluation's adaptive attacks
resume where they stopped, and finished stages are not run again (harden.json records the run).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np

from attacks import PGD
from foundation.backend import Devices
from foundation.validation import BOOLEAN, Interval, Options, Parameterized
from foundation.models import load_model, save_model
from foundation.storage import atomic_write, model_fingerprint
from detector import load_detector
from detector.adaptive_evaluation import DEFAULT_ADAPTIVE, AdaptiveSettings
from detector.guard_directory import save_guard_directory
from training.adversarial import training_attack
from training.attack_specs import default_attacks, default_eps
from training.classifier import OPTIMIZERS, LearningRate, accuracy, train_adversarial
from training.evaluate_stage import evaluate_stage
from training.data import ImageDataset
from training.run_record import differences, mark, new_record, read_record, run_identity
from training.workflow import Data, Log, as_dataset, attack_stage, train_detector_stage

# in the output folder: the run's record (what it is, what it has done), and the training state kept after each epoch
RECORD, TRAINING = "harden.json", "training-progress"
# in TRAINING: the best epoch's classifier weights (`RobustEarlyStopping`)
BEST_WEIGHTS = "best-weights-{}.npz"  # the best epoch's weights, by epoch


@dataclasses.dataclass(frozen=True)
class HardenSettings(Parameterized):
    """attack: the training attack spec (`pgd:steps=10`; `pgd:steps=4` on a CPU; `fgsm_rs`, faster and weaker); eps: its
    budget and the guard's (default: 0.3 for grey images, 8/255 for colour). epochs: at most this
    many; training stops earlier once robust validation accuracy has not improved for `patience`
    epochs after the warm-up. schedule: "cosine" decays the learning rate to 2% over `epochs`.
    optimizer: "adam" or "sgd" (`training.classifier.compile_classifier`). augment: random shifts
    and flips before each batch's attack (default: for colour images, where adversarial training
    without them overfits). validation_n: training images held out for that check
    (`validation_steps`-step PGD). family: the detector family inside the joint rule.
    benign_augmentation: fit the joint rule on corrupted clean copies too, and cap the FPR of each
    corruption of the held-out clean images at shifted_fpr (`fit_detector`). ema: keep the moving
    average of the weights with this momentum per step and validate, keep and return it
    (`train_adversarial`); None trains without."""

    attack: str = "pgd:steps=10"
    eps: float | None = None
    epochs: int = 20
    warmup_epochs: float = 3.0
    trades_beta: float | None = None
    learning_rate: float = 5e-4
    schedule: str = "cosine"
    optimizer: str = "adam"
    augment: bool | None = None
    batch_size: int = 128
    validation_n: int = 500
    validation_steps: int = 10
    patience: int = 4
    family: str = "input"
    n_attack: int = 10_000
    detector_epochs: int = 10
    target_fpr: float = 0.05
    benign_augmentation: bool = True
    shifted_fpr: float = 0.10
    ema: float | None = None
    seed: int = 0

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **{name: [Interval(int, 1)] for name in ("epochs", "batch_size", "validation_n", "validation_steps", "patience",
                                                 "n_attack", "detector_epochs")},
        "warmup_epochs": [Interval(float, 0)],
        "learning_rate": [Interval(float, 0, closed="neither")],
        "target_fpr": [Interval(float, 0, 0.5, closed="neither")],
        "schedule": [Options("cosine", "constant")],
        "optimizer": [Options(*OPTIMIZERS)],
        "augment": [BOOLEAN, None],
        "benign_augmentation": [BOOLEAN],
        "shifted_fpr": [Interval(float, 0, 1, closed="neither")],
        "ema": [Interval(float, 0, 1, closed="neither"), None],
    }

    def __post_init__(self) -> None:
        self._set_params({name: getattr(self, name) for name in self._parameter_constraints})
        if self.family in ("joint", "ensemble"):
            raise ValueError(f"family is the detector inside the joint rule; {self.family!r} cannot be one")


class RobustEarlyStopping(keras.callbacks.Callback):
    """After each epoch: PGD robust accuracy of `classifier` on held-out (x, y). Keeps the best
    epoch's weights (restored at the end) and stops after `patience` epochs without improvement,
    counting only epochs after `warmup_epochs` (during the warm-up robust accuracy rises with eps)."""

    def __init__(self, classifier: keras.Model, x: np.ndarray, y: np.ndarray, attack: PGD, *,
                 patience: int, warmup_epochs: float, log: Log = print) -> None:
        super().__init__()
        self.classifier, self.x, self.y, self.attack = classifier, x, y, attack
        self.patience, self.warmup_epochs, self.log = patience, warmup_epochs, log
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int, list[np.ndarray]] | None = None
        self._saved_best: int | None = None

    def measure(self) -> tuple[float, float]:
        """(clean, PGD robust) accuracy of the classifier on the held-out images."""
        return accuracy(self.classifier, self.x, self.y), 1.0 - self.attack(self.classifier, self.x, self.y).success_rate

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        clean, robust = self.measure()
        self.history.append({"epoch": epoch + 1, "clean_accuracy": clean, "robust_accuracy": robust})
        self.log(f"epoch {epoch + 1}: validation clean {clean:.4f}, PGD-{self.attack.steps} robust {robust:.4f}")
        if self.best is None or robust > self.best[0]:
            self.best = (robust, epoch + 1, self.classifier.get_weights())
        elif epoch + 1 - max(self.best[1], math.ceil(self.warmup_epochs)) >= self.patience:
            self.log(f"robust validation accuracy has not improved for {self.patience} epochs: stopping")
            self.model.stop_training = True

    def state(self, directory: Path) -> dict[str, Any]:
        """History and best epoch (its weights in best-weights-<epoch>.npz): `training.resume.Resumable`.
        The file of the best epoch before stays until the next state, since the state on disk may
        still name it if the process dies before the new state is written."""
        if self.best is not None and self.best[1] != self._saved_best:
            atomic_write(directory / BEST_WEIGHTS.format(self.best[1]), lambda temp: np.savez(temp, *self.best[2]))
            keep = {BEST_WEIGHTS.format(epoch) for epoch in (self.best[1], self._saved_best)}
            for old in directory.glob(BEST_WEIGHTS.format("*")):
                if old.name not in keep:
                    old.unlink()
            self._saved_best = self.best[1]
        return {"history": self.history, "best": None if self.best is None else list(self.best[:2])}

    def restore(self, state: dict[str, Any], directory: Path) -> None:
        self.history = list(state["history"])
        if state["best"] is not None:
            with np.load(directory / BEST_WEIGHTS.format(int(state["best"][1])), allow_pickle=False) as stored:
                weights = [stored[f"arr_{i}"] for i in range(len(stored.files))]
            self.best = (float(state["best"][0]), int(state["best"][1]), weights)
            self._saved_best = self.best[1]

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.best is not None:
            self.classifier.set_weights(self.best[2])
            self.log(f"kept epoch {self.best[1]}: validation PGD-{self.attack.steps} robust accuracy {self.best[0]:.4f}")


def begin_record(out: Path, settings: HardenSettings, classifier: keras.Model, data: ImageDataset) -> dict[str, Any]:
    """harden.json in `out` (`training.run_record`): what the run is (settings, starting classifier,
    data), then what it has done. A new or empty `out` gets a new record; one left by an interrupted
    run of the same command is returned, to resume from; anything else in `out` is refused, naming
    what differs."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: --out names the folder harden writes")
    identity = run_identity(dataclasses.asdict(settings), data, classifier=model_fingerprint(classifier))
    if out.is_dir() and any(out.iterdir()):
        record = read_record(out / RECORD)
        if record is None:
            raise FileExistsError(f"{out} already exists and is not empty: choose another --out or delete it")
        if record.get("finished"):
            raise FileExistsError(f"{out} holds a finished harden: choose another --out or delete it")
        if record.get("identity") != identity:
            raise FileExistsError(f"{out} holds an interrupted harden with another {differences(record, identity)}: run that "
                                  "command again to resume it, or choose another --out")
        return record
    return new_record(out / RECORD, identity)


@dataclasses.dataclass(frozen=True)
class HardenedGuard:
    """What `harden` wrote, and what it measured."""

    out: Path
    classifier: Path
    detector: Path
    guard: Path
    report: dict[str, Any] | None
    clean_accuracy: float
    validation: list[dict[str, float]]


def harden(
    model_path: str | Path,
    data: Data,
    out: str | Path,
    settings: HardenSettings = HardenSettings(),
    *,
    evaluate: bool = True,
    n_eval: int | None = 1000,
    adaptive: AdaptiveSettings = DEFAULT_ADAPTIVE,
    devices: Devices = 1,
    log: Log = print,
) -> HardenedGuard:
    """Build a robust guard from the classifier at `model_path` into the new directory `out`:
    classifier.keras (hardened), datasets/, detector/ (joint rule), guard/ (the deployable guard
    directory), report/ (unless `evaluate=False`) and harden.json (`begin_record`). Everything is
    checked before training. The same call after an interruption resumes: at the last finished
    epoch of the fine-tuning, or after the last finished stage.
    `adaptive`: the evaluation's adaptive suite. `devices` (a count or "all") runs the fine-tuning
    data-parallel (`train_adversarial`)."""
    out = Path(out)
    data = as_dataset(data)
    classifier = load_model(model_path)
    eps = default_eps(data.input_shape) if settings.eps is None else settings.eps
    attack = training_attack(settings.attack, eps)
    if settings.validation_n >= len(data.x_train) // 2:
        raise ValueError(f"validation_n {settings.validation_n} leaves too few of the {len(data.x_train)} training images")
    rows = np.random.default_rng(settings.seed).permutation(len(data.x_train))
    held, fit = rows[: settings.validation_n], rows[settings.validation_n :]
    stopper = RobustEarlyStopping(
        classifier, data.x_train[held], data.y_train[held], PGD(eps=attack.eps, norm=attack.norm, steps=settings.validation_steps,
                                                                 clip=attack.clip, seed=settings.seed),
        patience=settings.patience, warmup_epochs=settings.warmup_epochs, log=log,
    )
    learning_rate: LearningRate = settings.learning_rate
    if settings.schedule == "cosine":  # robust accuracy gains most as the rate decays (Rice et al. 2020)
        steps = settings.epochs * math.ceil(len(fit) / settings.batch_size)
        learning_rate = keras.optimizers.schedules.CosineDecay(settings.learning_rate, steps, alpha=0.02)
    colour = data.input_shape[-1] == 3
    augment = colour if settings.augment is None else settings.augment
    moves = ", random shifts and flips" if colour else ", random shifts"  # `augmentation` flips colour images only
    record = begin_record(out, settings, classifier, data)
    classifier_path = out / "classifier.keras"
    if classifier_path.is_file() and "validation" in record:
        classifier, stopper.history = load_model(classifier_path), record["validation"]
        log(f"[1/4] adversarial fine-tuning: done by the interrupted run, {classifier_path} kept")
    else:
        log(f"[1/4] adversarial fine-tuning against {attack.get_params()}" + ("" if settings.trades_beta is None else f", TRADES beta {settings.trades_beta}")
            + f", {settings.optimizer}" + (moves if augment else "") + ("" if settings.ema is None else f", weights averaged (EMA {settings.ema:g})")
            + f" (each epoch is kept in {out / TRAINING}: the same command resumes)")
        train_adversarial(
            data.x_train[fit], data.y_train[fit], data.num_classes, attack, model=classifier, epochs=settings.epochs,
            batch_size=settings.batch_size, learning_rate=learning_rate, warmup_epochs=settings.warmup_epochs,
            trades_beta=settings.trades_beta, augment=augment, optimizer=settings.optimizer, ema=settings.ema, seed=settings.seed, verbose=0,
            callbacks=[stopper], devices=devices, checkpoint=out / TRAINING, log=log,
        )
        save_model(classifier, classifier_path)
        record = mark(out / RECORD, record, validation=stopper.history)
        shutil.rmtree(out / TRAINING, ignore_errors=True)
    clean_accuracy = accuracy(classifier, data.x_test, data.y_test)
    log(f"hardened classifier saved to {classifier_path}: clean test accuracy {clean_accuracy:.4f}")
    log("[2/4] adversarial datasets against the hardened classifier")
    detector_attacks = default_attacks(data.input_shape, attack.eps)
    datasets = [out / "datasets" / a.name for a in detector_attacks]
    for spec, path in zip(detector_attacks, datasets, strict=True):
        attack_stage(classifier_path, data, spec, path, split="train", n=settings.n_attack, log=log)
    log(f"[3/4] joint rule: {settings.family} detector + the classifier's logit gap, one threshold at FPR {settings.target_fpr}")
    detector_path = out / "detector"
    if not detector_path.is_dir():  # saved whole or not at all: one there is finished
        train_detector_stage(datasets, detector_path, family="joint", members=(settings.family,), model_path=classifier_path,
                             target_fpr=settings.target_fpr, epochs=settings.detector_epochs, seed=settings.seed,
                             benign_augmentation=settings.benign_augmentation, shifted_fpr=settings.shifted_fpr, log=log)
    guard_path = save_guard_directory(out / "guard", classifier, load_detector(detector_path, classifier=classifier))
    log(f"guard written to {guard_path} (serve it with: safetynet serve --guard {guard_path})")
    report = None
    if evaluate:
        log("[4/4] evaluation, adaptive attacks included")
        report = evaluate_stage(classifier_path, detector_path, data, out / "report", n=n_eval, adaptive=adaptive,
                                seed=settings.seed, log=log)
    mark(out / RECORD, record, finished=True)
    return HardenedGuard(out=out, classifier=Path(classifier_path), detector=detector_path, guard=guard_path, report=report,
                         clean_accuracy=clean_accuracy, validation=stopper.history)
