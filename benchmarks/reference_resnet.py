"""Clean test accuracy against epochs and training time for the reference ResNet (`training.resnet`)
trained as `safetynet train-classifier --architecture resnet` trains it (`training.augmented`:
augmentation, SGD on a one-cycle schedule); prints JSON.

After every epoch: clean accuracy on the test images and the training seconds so far (evaluation
excluded); the JSON is rewritten each time, so a run cut short keeps its curve. The schedule spans
--epochs, so an early point is the accuracy midway through that schedule, not that of a shorter run.

    python benchmarks/reference_resnet.py --width 16 --epochs 30                # CIFAR-10, the 20k shared images
    KERAS_BACKEND=jax python benchmarks/reference_resnet.py --width 64 --epochs 40 --batch-size 512
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np

from foundation.models import save_model
from foundation.storage import atomic_write_json
from training.augmented import train_augmented
from training.data import load_dataset
from training.resnet import RESNET_WIDTH, build_resnet
from curves import EpochCurve
from timing import emit

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


class Curve(EpochCurve):
    """After each epoch: test accuracy of `classifier` on (x, y), timed training seconds, the JSON rewritten."""

    def measure(self, logs: dict) -> dict[str, Any]:
        predicted = np.argmax(self.classifier.predict(self.x, batch_size=500, verbose=0), axis=-1)
        return {"train_loss": round(float(logs.get("loss", np.nan)), 4),
                "train_accuracy": round(float(logs.get("accuracy", np.nan)), 4),
                "test_accuracy": float(np.mean(predicted == self.y))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(CIFAR10))
    parser.add_argument("--width", type=int, default=RESNET_WIDTH)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=0.2, help="the one-cycle schedule's peak")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--n-train", type=int, help="training images (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here (rewritten after every epoch)")
    parser.add_argument("--save", help="save the trained classifier here (.keras)")
    args = parser.parse_args()

    data = load_dataset(args.data)
    x, y = data.x_train[: args.n_train], data.y_train[: args.n_train]
    keras.utils.set_random_seed(args.seed)
    model = build_resnet(data.input_shape, data.num_classes, width=args.width)
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "backend": keras.backend.backend(), "versions": {"keras": keras.__version__},
        "data": args.data, "n_train": len(x), "n_test": len(data.x_test), "params": model.count_params(), "args": vars(args),
    }

    def write() -> None:
        report["curve"] = curve.points
        if args.out:
            atomic_write_json(args.out, report)

    curve = Curve(model, data.x_test, data.y_test, write)
    train_augmented(model, x, y, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    augment=not args.no_augment, seed=args.seed, verbose=0, callbacks=[curve])
    report["train_seconds"] = round(curve.train_s, 1)
    if args.save:
        save_model(model, args.save)
    write()
    emit(report)


if __name__ == "__main__":
    main()
