"""Robust accuracy against training time for adversarial training of the reference CNN; prints JSON.

After every epoch: clean accuracy and PGD robust accuracy (--curve-steps, one start) on the first
--curve-n test images, with the training seconds so far (evaluation time excluded). Training stops
after --epochs or once --budget-minutes of training time are spent. At the end: the full report of
`training.adversarial.robustness_report` (the worst case per input over PGD x 5 restarts,
APGD-CE, APGD-DLR and targeted APGD-DLR, 100 iterations each (40 before 2026-11-30), on --eval-n
test images; CW-L2 on --cw-n). The JSON is rewritten after every epoch, so a run cut short keeps its curve.

    python benchmarks/robust_training.py                                 # MNIST, FGSM-RS eps 0.3
    python benchmarks/robust_training.py --attack pgd:eps=0.3,steps=40   # Madry's PGD-40
    python benchmarks/robust_training.py --data ../shared/data/cifar10 --attack fgsm_rs:eps=8/255
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np

from attacks import PGD
from foundation.storage import atomic_write_json
from training.adversarial import robustness_report, training_attack
from training.classifier import build_reference_cnn, train_adversarial
from training.data import load_dataset
from training.attack_specs import default_eps
from curves import EpochCurve
from timing import emit

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist_keras_arrays.npz"


class Curve(EpochCurve):
    """After each epoch: clean and PGD robust accuracy of `classifier` on (x, y), timed training
    seconds, the JSON rewritten; stops training once the time budget is spent."""

    def __init__(self, classifier: keras.Model, x: np.ndarray, y: np.ndarray, attack: PGD, budget_s: float, write: Any) -> None:
        super().__init__(classifier, x, y, write)
        self.attack, self.budget_s = attack, budget_s

    def measure(self, logs: dict) -> dict[str, Any]:
        begin = time.perf_counter()
        correct = np.argmax(self.classifier.predict(self.x, batch_size=500, verbose=0), axis=-1) == self.y
        broken = self.attack(self.classifier, self.x, self.y, batch_size=500).success
        return {"train_loss": float(logs.get("loss", np.nan)), "clean_accuracy": float(correct.mean()),
                "robust_accuracy": float((correct & ~broken).mean()), "eval_seconds": round(time.perf_counter() - begin, 1)}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if self.train_s > self.budget_s:
            self.model.stop_training = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(MNIST))
    parser.add_argument("--attack", default="fgsm_rs", help="training attack spec (default fgsm_rs at the data's eps)")
    parser.add_argument("--eps-warmup", type=float, default=1.0, help="epochs of linear eps warm-up")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--budget-minutes", type=float, default=20.0, help="stop after this much training time")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, help="training images (default all)")
    parser.add_argument("--curve-n", type=int, default=500)
    parser.add_argument("--curve-steps", type=int, default=40)
    parser.add_argument("--eval-n", type=int, default=1000)
    parser.add_argument("--eval-restarts", type=int, default=5)
    parser.add_argument("--cw-n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here (rewritten after every epoch)")
    args = parser.parse_args()

    data = load_dataset(args.data)
    attack = training_attack(args.attack, default_eps(data.input_shape))
    x, y = data.x_train[: args.n_train], data.y_train[: args.n_train]
    x_test, y_test = data.x_test[: args.eval_n], data.y_test[: args.eval_n]
    keras.utils.set_random_seed(args.seed)
    model = build_reference_cnn(data.input_shape, data.num_classes)
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "backend": keras.backend.backend(), "versions": {"keras": keras.__version__},
        "data": args.data, "n_train": len(x), "args": vars(args), "training_attack": attack.get_params(),
    }

    def write() -> None:
        report["curve"] = curve.points
        if args.out:
            atomic_write_json(args.out, report)

    curve_attack = PGD(eps=attack.eps, norm=attack.norm, steps=args.curve_steps, seed=args.seed)
    curve = Curve(model, x_test[: args.curve_n], y_test[: args.curve_n], curve_attack, args.budget_minutes * 60, write)
    train_adversarial(
        x, y, data.num_classes, attack, model=model, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_epochs=args.eps_warmup, seed=args.seed, verbose=0, callbacks=[curve],
    )
    begin = time.perf_counter()
    report["final"] = robustness_report(
        model, x_test, y_test, eps=attack.eps, norm=attack.norm, restarts=args.eval_restarts,
        cw_n=args.cw_n, seed=args.seed,
    )
    report["final"]["seconds"] = round(time.perf_counter() - begin, 1)
    report["train_seconds"] = round(curve.train_s, 1)
    write()
    emit(report)


if __name__ == "__main__":
    main()
