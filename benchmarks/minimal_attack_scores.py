"""Which scores see a minimal attack that stops a little past the boundary (ART's CW-L2)? Prints JSON.

Issue 15 names two directions for detecting CW-L2 from FGSM/PGD training: Lee et al.'s full
Mahalanobis (every block, input pre-processing, logistic weights) and features of closeness to the
decision boundary. This scores both on the same images as benchmarks/detection.py's `--art` rows
(ART's images from its `--art-cache`, the turned ones): each Mahalanobis variant fitted on FGSM and
PGD-10 of the first `--n-fit` training images; the boundary scores training-free. Cells: AUROC
against the `--n-test` clean test images, and TPR at the clean test images' own 95th percentile (an
oracle threshold: an upper bound on what a calibrated one reaches).

    python benchmarks/minimal_attack_scores.py --data ../shared/data/cifar10 --eps 8/255 \
        --model runs/reference_resnet/cifar_w20_e30.keras --art-cache runs/detection/art_cifar_w20_5x50.npz \
        --block-layers prep_relu stage1_res1_add stage2_pool stage3_res1_add pool
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from art_unseen import art_attacks, art_cw_params, require_art  # noqa: E402
from attacks import FGSM, PGD, parse_attack_spec  # noqa: E402
from detector.features import predict  # noqa: E402
from detector.joint import logit_gap  # noqa: E402
from detector.mahalanobis import MahalanobisDetector  # noqa: E402
from detector.margin import MarginDetector  # noqa: E402
from detector.metrics import auroc, correctly_classified, tpr_at_fpr  # noqa: E402
from foundation.backend import value_and_grad  # noqa: E402
from foundation.models import load_model  # noqa: E402
from training.data import load_dataset  # noqa: E402
from timing import emit  # noqa: E402


def boundary_distance(model: keras.Model, x: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Minus the first-order L2 distance to the boundary, gap / ||d gap / dx|| (higher: nearer)."""
    def gap(z: Any) -> tuple[Any, Any]:
        values = logit_gap(model(z, training=False))
        return values, values

    out = []
    for start in range(0, len(x), batch_size):
        values, _, grad = value_and_grad(gap, ops.convert_to_tensor(x[start:start + batch_size]))
        norms = ops.sqrt(ops.sum(ops.square(ops.reshape(grad, (grad.shape[0], -1))), axis=1))
        out.append(-ops.convert_to_numpy(values / (norms + 1e-12)))
    return np.concatenate(out).astype(np.float64)


def under_noise(model: keras.Model, x: np.ndarray, sigma: float, draws: int, seed: int) -> dict[str, np.ndarray]:
    """Minus the mean gap of the clean top class over `draws` Gaussian copies, and how often it flips."""
    logits = predict(model, x)[0]
    top, rows, rng = logits.argmax(1), np.arange(len(x)), np.random.default_rng(seed)
    gaps, flips = np.zeros(len(x)), np.zeros(len(x))
    for _ in range(draws):
        noisy = predict(model, np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0).astype(np.float32))[0]
        kept = noisy[rows, top]
        noisy[rows, top] = -np.inf
        gap = kept - noisy.max(axis=1)
        gaps, flips = gaps + gap, flips + (gap < 0)
    return {"smoothed_margin": -gaps / draws, "noise_flip_rate": flips / draws}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True, help="the classifier ART's images were made on (.keras, safe mode)")
    parser.add_argument("--art-cache", type=Path, required=True, help="benchmarks/detection.py's --art-cache file")
    parser.add_argument("--art-cw-search-steps", type=int, default=5)
    parser.add_argument("--art-cw-iter", type=int, default=50)
    parser.add_argument("--art-cw-const", type=float, default=1.0)
    parser.add_argument("--eps", default="8/255", help="L-inf budget of FGSM and PGD (fitting and the seen rows)")
    parser.add_argument("--n-fit", type=int, default=2000, help="training images FGSM and PGD are made from")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--n-seen", type=int, default=300, help="test images the seen rows attack")
    parser.add_argument("--block-layers", nargs="+", help="Lee et al.'s layers: the first conv and each block's output")
    parser.add_argument("--mahalanobis-noise", type=float, nargs="+", default=[0.0, 0.001])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.02, 0.03])
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--out")
    args = parser.parse_args()
    require_art()  # its cache is read through ART's attack code
    if not args.art_cache.is_file():
        raise SystemExit(f"{args.art_cache} does not exist: make ART's images first with benchmarks/detection.py --art --art-cache")

    started = time.perf_counter()
    data, model = load_dataset(args.data), load_model(args.model)
    eps = parse_attack_spec(f"fgsm:eps={args.eps}").eps
    x_test, y_test = data.x_test[:args.n_test], data.y_test[:args.n_test]
    correct = correctly_classified(model, x_test, y_test)
    with np.load(args.art_cache, allow_pickle=False) as stored:
        m = len(stored["x"])
    runs = art_attacks(model, x_test[:m], y_test[:m],
                       art_cw_params(args.art_cw_search_steps, args.art_cw_iter, args.art_cw_const), args.art_cache)
    attacked = {name: run["x_adv"][run["success"] & correct[:m]] for name, run in runs.items()}
    for name, attack in (("fgsm", FGSM(eps=eps)), ("pgd", PGD(eps=eps, steps=10))):
        result = attack(model, x_test[:args.n_seen], y_test[:args.n_seen])
        attacked[name] = result.x_adv[np.asarray(result.success) & correct[:args.n_seen]]

    x_fit, y_fit = data.x_train[:args.n_fit], data.y_train[:args.n_fit]
    x_adversarial = np.concatenate([FGSM(eps=eps)(model, x_fit, y_fit).x_adv, PGD(eps=eps, steps=10)(model, x_fit, y_fit).x_adv])
    margin = MarginDetector(model).fit(x_fit, x_adversarial, verbose=0)  # training-free: the family as users get it
    # each scorer gives one or more named scores per image (the noisy copies serve two)
    scorers: list[Callable[[np.ndarray], dict[str, np.ndarray]]] = [
        lambda x: {"margin": margin.score(x)},
        lambda x: {"boundary_distance": boundary_distance(model, x)},
    ]
    for sigma in args.sigmas:
        scorers.append(lambda x, s=sigma: {f"{k}_sigma{s:g}": v for k, v in under_noise(model, x, s, args.draws, 0).items()})
    variants = [("last_three", None)] + ([("blocks", args.block_layers)] if args.block_layers else [])
    for (label, layers), noise in [(v, n) for v in variants for n in args.mahalanobis_noise]:
        detector = MahalanobisDetector(model, layers=layers, noise=noise)
        detector.fit(np.concatenate([x_fit, x_fit]), x_adversarial, y_clean=np.concatenate([y_fit, y_fit]), verbose=0)
        scorers.append(lambda x, d=detector, name=f"mahalanobis_{label}_noise{noise:g}": {name: d.score(x)})

    rows = {}
    for scorer in scorers:
        begin = time.perf_counter()
        clean, positives = scorer(x_test), {attack: scorer(x) for attack, x in attacked.items()}
        for name, negatives in clean.items():
            rows[name] = {attack: {"auroc": auroc(negatives, found[name]), "tpr_at_5pct_test_fpr": tpr_at_fpr(negatives, found[name], 0.05)}
                          for attack, found in positives.items()}
            rows[name]["seconds"] = (time.perf_counter() - begin) / len(clean)
            print(name, {a: round(r["auroc"], 3) for a, r in rows[name].items() if a != "seconds"}, file=sys.stderr)
    emit({"data": args.data, "model": args.model, "eps": eps, "n_fit": args.n_fit, "n_test": args.n_test,
          "n_turned": {name: len(x) for name, x in attacked.items()}, "art_cache": str(args.art_cache),
          "scores": rows, "seconds": time.perf_counter() - started}, args.out)


if __name__ == "__main__":
    main()
