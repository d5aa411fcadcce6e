"""safetynet's CW-L2 against a strong reference (IBM ART's CarliniL2Method with many steps) on the
same correctly classified images; prints JSON.

Both attacks run untargeted with confidence 0 on the first `--n` test images the classifier gets
right (a misclassified image "succeeds" at L2 0 and would flatter either side). ART runs on the first
`--art-n` of them (it is far slower). Reported per implementation: success rate, median L2 over the
images both attacks fool, and wall time; `median_l2_ratio` is ours over ART's on those images, and
`per_image_ratio_median` the median of the per-image ratios. Success and L2 are judged the same way
for both: the model's argmax on the returned image, and the L2 norm of the returned perturbation.

The classifier is the reference CNN (`training.classifier`), trained here unless `--model` names a
saved one (`--save-model` keeps the trained one for the next run).

    python benchmarks/cw_reference.py --data ../shared/data/mnist/mnist_keras_arrays.npz --epochs 3
    python benchmarks/cw_reference.py --data ../shared/data/cifar10 --epochs 10 --art-n 100
    python benchmarks/cw_reference.py --data ... --cw "cw:learning_rate=0.1,initial_const=1"   # another setting

ART is slow (its line search costs about 30 forward or backward passes per iteration): `--art-cache
FILE` stores its images and time, and a later run on the same images (checked) reuses them.

ART is imported here only; it is never a dependency of safetynet.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from attacks import parse_attack_spec  # noqa: E402
from foundation.models import load_model  # noqa: E402
from peers import art_classifier  # noqa: E402
from timing import emit  # noqa: E402
from training.classifier import accuracy, train_classifier  # noqa: E402
from training.data import load_dataset  # noqa: E402


def l2_norms(x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
    return np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)


def fooled(model: keras.Model, x_adv: np.ndarray, y: np.ndarray, batch: int) -> np.ndarray:
    return np.argmax(model.predict(x_adv, batch_size=batch, verbose=0), axis=1) != y


def ours(model: keras.Model, spec: str, x: np.ndarray, y: np.ndarray, batch: int) -> dict[str, Any]:
    """Our attack, compiled on one batch first (reported apart), then timed on all images."""
    attack = parse_attack_spec(spec)
    start = time.perf_counter()
    attack(model, x[: min(8, len(x))], y[: min(8, len(y))], batch_size=batch)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = attack(model, x, y, batch_size=batch)
    seconds = time.perf_counter() - start
    success = fooled(model, result.x_adv, y, batch)
    if not np.array_equal(success, result.success):
        raise RuntimeError("the attack's success flags disagree with the model on its own images")
    return {"params": attack.get_params(), "x_adv": result.x_adv, "success": success,
            "seconds": seconds, "compile_seconds": compile_seconds}


def art(model: keras.Model, x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> dict[str, Any]:
    from art.attacks.evasion import CarliniL2Method

    peer = CarliniL2Method(art_classifier(model), verbose=False, **params)
    start = time.perf_counter()
    x_adv = peer.generate(x, y=y).astype(np.float32)
    seconds = time.perf_counter() - start
    return {"params": params, "x_adv": x_adv, "success": fooled(model, x_adv, y, params["batch_size"]), "seconds": seconds}


def cached_art(path: Path, x: np.ndarray, params: dict[str, Any]) -> dict[str, Any] | None:
    """ART's result stored by an earlier run, if it was made on exactly these images with these parameters."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        if not np.array_equal(stored["x"], x) or json.loads(str(stored["params"])) != params:
            raise ValueError(f"{path} holds ART's result for other images or parameters; remove it or pick another path")
        return {"params": params, "x_adv": stored["x_adv"], "success": stored["success"],
                "seconds": float(stored["seconds"]), "cached": str(path)}


def summary(run: dict[str, Any], x: np.ndarray) -> dict[str, Any]:
    l2 = l2_norms(x, run["x_adv"])
    success = run["success"]
    return {"n": len(x), "success_rate": float(success.mean()),
            "median_l2_own_successes": float(np.median(l2[success])) if success.any() else None,
            "seconds": run["seconds"], "images_per_s": len(x) / run["seconds"]}


def compare(mine: dict[str, Any], peer: dict[str, Any], x: np.ndarray) -> dict[str, Any]:
    """Median L2 of each over the images both fool, and the per-image ratio ours / ART."""
    both = mine["success"] & peer["success"]
    ours_l2, art_l2 = l2_norms(x, mine["x_adv"]), l2_norms(x, peer["x_adv"])
    if not both.any():
        return {"both_succeed": 0}
    ratio = float(np.median(ours_l2[both]) / np.median(art_l2[both]))
    return {"both_succeed": int(both.sum()), "ours_median_l2": float(np.median(ours_l2[both])),
            "art_median_l2": float(np.median(art_l2[both])), "median_l2_ratio": ratio,
            "per_image_ratio_median": float(np.median(ours_l2[both] / np.maximum(art_l2[both], 1e-12))),
            "ours_smaller_on": float((ours_l2[both] <= art_l2[both]).mean()),
            "within_10_percent": ratio <= 1.10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset spec or path (training.data.load_dataset)")
    parser.add_argument("--model", help="a saved .keras classifier (default: train the reference CNN)")
    parser.add_argument("--save-model", help="write the trained classifier here")
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n", type=int, default=500, help="correctly classified test images for ours")
    parser.add_argument("--art-n", type=int, default=200, help="the first this many of them for ART (0: skip ART)")
    parser.add_argument("--cw", nargs="+", default=["cw"], help="our attack spec(s), e.g. cw or cw:steps=200")
    parser.add_argument("--art-search-steps", type=int, default=9)
    parser.add_argument("--art-iter", type=int, default=1000)
    parser.add_argument("--art-initial-const", type=float, default=0.01, help="ART's default")
    parser.add_argument("--art-lr", type=float, default=0.01, help="ART's default (its line search adapts it)")
    parser.add_argument("--art-cache", type=Path, help="reuse ART's result stored here, or store it here")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    data = load_dataset(args.data)
    if args.model:
        model = load_model(args.model)
    else:
        model = train_classifier(data.x_train[: args.n_train], data.y_train[: args.n_train], data.num_classes,
                                 epochs=args.epochs, verbose=0)
        if args.save_model:
            model.save(args.save_model)
    correct = ~fooled(model, data.x_test, data.y_test, args.batch)
    x, y = data.x_test[correct][: args.n], data.y_test[correct][: args.n]
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "backend": keras.backend.backend(), "data": args.data, "model": args.model or f"reference CNN, {args.epochs} epochs",
        "clean_accuracy": accuracy(model, data.x_test, data.y_test), "n": len(x), "ours": {},
    }
    runs = {spec: ours(model, spec, x, y, args.batch) for spec in args.cw}
    for spec, run in runs.items():
        report["ours"][spec] = {"params": run["params"], "compile_seconds": run["compile_seconds"], **summary(run, x)}
        print(f"{spec}: {report['ours'][spec]}", file=sys.stderr)
    if args.art_n:
        m = min(args.art_n, len(x))
        params = {"binary_search_steps": args.art_search_steps, "max_iter": args.art_iter,
                  "initial_const": args.art_initial_const, "learning_rate": args.art_lr, "confidence": 0.0,
                  "batch_size": args.batch}
        peer = cached_art(args.art_cache, x[:m], params) if args.art_cache else None
        if peer is None:
            peer = art(model, x[:m], y[:m], params)
            if args.art_cache:
                np.savez(args.art_cache, x=x[:m], x_adv=peer["x_adv"], success=peer["success"],
                         seconds=peer["seconds"], params=json.dumps(params))
        report["art"] = {"params": peer["params"], "cached": peer.get("cached"), **summary(peer, x[:m])}
        for spec, run in runs.items():
            subset = {"x_adv": run["x_adv"][:m], "success": run["success"][:m], "seconds": run["seconds"]}
            report["ours"][spec]["on_art_images"] = {
                "success_rate": float(subset["success"].mean()), **compare(subset, peer, x[:m]),
                "speedup_vs_art": (peer["seconds"] / m) / (run["seconds"] / len(x)),
            }
    emit(report, args.out)


if __name__ == "__main__":
    main()
