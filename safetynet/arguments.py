"""The command's argument types and the library's names, checked without importing the library.

The names mirror the library's (tests/test_cli.py checks they agree) so that a typo is refused in a
fraction of a second, with one line and no TensorFlow start-up noise.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from training.calibration_images import CalibrationImages

EXIT_USAGE = 2
ATTACK_NAMES = ("fgsm", "bim", "pgd", "mifgsm", "apgd", "cw", "deepfool", "jsma")  # attacks.ATTACKS
TRAINING_ATTACK_NAMES = (*ATTACK_NAMES, "fgsm_rs")  # training.adversarial.training_attack
DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10")  # training.data.BUILTIN_DATASETS
ADAPTIVE_SUITE = ("adaptive_pgd", "apgd_ce", "apgd_dlr", "apgd_dlr_targeted", "orthogonal_pgd", "orthogonal_pgd_warm", "selective_pgd")  # detector.adaptive_evaluation.SUITE
ADAPTIVE_STEPS = 60  # AdaptiveSettings.steps
FAMILIES = ("input", "activations", "safetynet", "mahalanobis", "squeeze", "margin", "shift_margin", "shift_drop", "odds",
            "ensemble", "joint")  # detector.FAMILIES
DEFAULT_MEMBERS = ("input", "safetynet", "squeeze", "margin", "shift_margin")  # training.detector.DEFAULT_MEMBERS
COLOUR_MEMBERS = ("input", "margin", "shift_margin", "odds", "shift_drop")  # training.detector.COLOUR_MEMBERS
ARCHITECTURES = ("reference", "resnet")  # training.classifier.ARCHITECTURES
RESNET_WIDTH = 64  # training.resnet.RESNET_WIDTH
OPTIMIZERS = ("adam", "sgd")  # training.classifier.OPTIMIZERS


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `safetynet attack: error: ...`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _spec_checker(names: Sequence[str]) -> Callable[[str], str]:
    """An argparse type for `name[:key=value,...]` that knows the names (parameters are checked later)."""

    def check(text: str) -> str:
        name = text.partition(":")[0].strip().lower().replace("-", "_")
        if name not in names:
            raise argparse.ArgumentTypeError(f"unknown attack {name!r}: expected one of {', '.join(names)}")
        return text

    return check


attack_spec = _spec_checker(ATTACK_NAMES)
training_attack_spec = _spec_checker(TRAINING_ATTACK_NAMES)


def data_spec(text: str) -> str:
    """A built-in dataset name, or a path that exists."""
    if text in DATASET_NAMES or Path(text).expanduser().exists():
        return text
    if text.endswith(".npz") or Path(text).name != text:
        raise argparse.ArgumentTypeError(f"dataset path not found: {text}")
    raise argparse.ArgumentTypeError(f"unknown dataset {text!r}: valid names are {', '.join(DATASET_NAMES)}, "
                                     "and no file or folder of that name was found")


def part(text: str) -> tuple[int, int]:
    """I/N: the I-th (0-based) of N parts."""
    index, slash, count = text.partition("/")
    try:
        chosen = (int(index), int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not slash or chosen[1] < 1 or not 0 <= chosen[0] < chosen[1]:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return chosen


def fraction(text: str) -> float:
    """A number or a fraction such as 8/255."""
    numerator, slash, denominator = text.partition("/")
    try:
        return float(numerator) / float(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


def momentum(text: str) -> float:
    """An exponential moving average's momentum per step: a number in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a momentum in (0, 1) such as 0.99 or 0.999, got {text!r}")
    return value


def id_range(text: str) -> list[int]:
    """A record id (7) or an inclusive range of them (10-20)."""
    first, dash, last = text.partition("-")
    if not (first.isdigit() and (not dash or last.isdigit())) or (dash and int(last) < int(first)):
        raise argparse.ArgumentTypeError(f"not a record id or range such as 7 or 10-20: {text!r}")
    return list(range(int(first), int(last or first) + 1))


def add_adaptive_n_option(parser: argparse.ArgumentParser) -> None:
    """--adaptive-n, for the commands that run the adaptive suite (evaluate, quickstart)."""
    parser.add_argument("--adaptive-n", type=int, default=1000,
                        help="run the adaptive attacks on the first N test images (default 1000: the longest part on a CPU)")


def add_data_option(parser: argparse.ArgumentParser) -> None:
    """--data, for every command that reads a dataset."""
    parser.add_argument(
        "--data", default="digits", type=data_spec,
        help="digits (bundled, default), mnist, fashion_mnist, cifar10 (downloaded by Keras), "
        "or a path: .npz with x_train/y_train/x_test/y_test, a folder of CIFAR pickle batches, "
        "or an image folder with one sub-folder per class",
    )


def add_architecture_options(parser: argparse.ArgumentParser) -> None:
    """--architecture, --width and --augment, for train-classifier."""
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="reference",
                        help="reference (default: the small CNN) or resnet (ResNet-9, BatchNorm; SGD on a one-cycle schedule)")
    parser.add_argument("--width", type=int, default=RESNET_WIDTH,
                        help=f"resnet: channels of its first layer, doubled at each stage (default {RESNET_WIDTH}; 16-32 for CPUs)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction,
                        help="random shifts (4 px on 32x32) and, for colour images, horizontal flips, in training only "
                        "(default on for resnet's standard training; with --adversarial, off unless given, before each batch's attack)")


def add_hardening_options(parser: argparse.ArgumentParser) -> None:
    """--learning-rate, --schedule, --optimizer, --augment and --ema, for harden's adversarial fine-tuning."""
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="learning rate at the start (default 5e-4, Adam's)")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                        help="learning rate over the epochs (default cosine: decays to 2%%)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                        help="adam (default) or sgd (Nesterov momentum 0.9, weight decay 5e-4: the ResNet recipe's; try --learning-rate 0.05)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction,
                        help="random shifts (4 px on 32x32) and horizontal flips before each batch's attack "
                        "(default on for colour images, off for grayscale)")
    parser.add_argument("--ema", type=momentum, metavar="MOMENTUM",
                        help="validate, keep and save the moving average of the weights (momentum per step, such as 0.99;"
                        " default: the weights as trained)")


def calibration_images(text: str) -> str:
    """--calibrate-on: DATA:SPLIT:START:STOP, checked here; the images are loaded by the stage."""
    try:
        return str(CalibrationImages.parse(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_benign_options(parser: argparse.ArgumentParser, *, keeps_detector_cap: bool = False, names_images: bool = False) -> None:
    """--no-benign-augmentation and --shifted-fpr, for the commands that fit a detector (here so that
    the four share one wording; `retrain` keeps the detector's own cap unless told); with
    `names_images`, --calibrate-on."""
    parser.add_argument("--no-benign-augmentation", action="store_true", help="fit and calibrate on the clean "
                        "images only, without corrupted copies (JPEG, noise, shifts, resizing)")
    parser.add_argument("--shifted-fpr", type=float, default=None if keeps_detector_cap else 0.10, metavar="F",
                        help="with benign augmentation, the threshold also keeps the FPR of clean images under each "
                        "corruption at most F with 95%% confidence, bounded on the held-out images (default " + ("the detector's own" if keeps_detector_cap else "0.10") + ")")
    if names_images:
        parser.add_argument("--calibrate-on", type=calibration_images, metavar="DATA:SPLIT:START:STOP",
                            help="set the threshold on these clean images, like those the guard will serve (e.g. "
                            "mnist.npz:test:1000:3000; STOP may be empty), instead of held-out images of the datasets "
                            "(default" + (": the detector's own" if keeps_detector_cap else " held-out images") + ")")


def device_count(text: str) -> int | str:
    """--devices: a count >= 1, or all."""
    if text == "all" or text.isdigit() and int(text) >= 1:
        return text if text == "all" else int(text)
    raise argparse.ArgumentTypeError(f"expected a number of devices >= 1 or all, got {text!r}")


def add_devices_option(parser: argparse.ArgumentParser) -> None:
    """--devices, for the commands that train adversarially."""
    parser.add_argument("--devices", type=device_count, default=1, metavar="N|all",
                        help="adversarial training data-parallel over N devices (the GPUs, else the CPU devices) or all "
                        "(default 1; TensorFlow: MirroredStrategy, JAX: keras.distribution.DataParallel)")
