"""Attack throughput against the hardware limit and against peers; prints JSON.

The limit is the fastest compiled forward + backward pass that computes the input gradient for a
batch (TensorFlow: tf.function with and without XLA; JAX: jax.jit), measured in the same run on the
same model and batch. FGSM should reach ~1x the limit and PGD-10 ~1x limit/10 (early stop off, so
the ratio measures the engine, not the stopping). Success flags are judged only when read, so those
rates are for the adversarial images; "*_with_success" adds reading the flags (one forward pass). Peers (cleverhans 4, IBM ART) are measured when
importable; they are never dependencies.

    python benchmarks/attacks.py                      # CIFAR-size 4-conv CNN, batch 256, n 4096
    KERAS_BACKEND=jax python benchmarks/attacks.py    # the same on JAX (e.g. on a GPU)
    python benchmarks/attacks.py --model path/to/model.keras --n 1024 --cw-n 128
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
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from attacks import ATTACKS, FGSM, PGD, make_attack  # noqa: E402
from attacks.backend import compile_with_model, value_and_grad  # noqa: E402
from attacks.models import load_model  # noqa: E402
from benchmark_models import cifar_cnn  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def benchmark_data(n: int, train_epochs: int, model: keras.Model | None) -> tuple[keras.Model, np.ndarray, np.ndarray, str]:
    """The model (trained briefly on the shared CIFAR-10 batches when present) and n test-like images."""
    if CIFAR.is_dir():
        from training.data import load_dataset

        data = load_dataset(str(CIFAR))
        x_train, y_train = data.x_train, data.y_train
        x = np.concatenate([data.x_test, data.x_train[-max(0, n - len(data.x_test)):]])[:n]
        y = np.concatenate([data.y_test, data.y_train[-max(0, n - len(data.y_test)):]])[:n]
        source = f"CIFAR-10 ({CIFAR})"
    else:
        rng = np.random.default_rng(0)
        x_train, y_train = rng.uniform(0, 1, (2048, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 2048)
        x, y = x_train[:n], y_train[:n]
        source = "uniform noise (shared CIFAR-10 not found)"
    if model is None:
        keras.utils.set_random_seed(0)
        model = cifar_cnn()
        if train_epochs:
            model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x_train, y_train, epochs=train_epochs, batch_size=128, verbose=0)
    return model, x.astype("float32"), y.astype("int32"), source


def best_time(run: Callable[[], Any], repeats: int) -> float:
    """Best wall-clock time of `repeats` runs, after one warm-up run (compilation)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def limit_rate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, jit: bool) -> float:
    """Images/s of the compiled forward + backward pass that yields the input gradient."""

    def gradient(forward: Callable, xb: Any, yb: Any) -> Any:
        def loss(z: Any) -> tuple[Any, Any]:
            values = keras.losses.sparse_categorical_crossentropy(yb, forward(z), from_logits=True)
            return values, values

        return value_and_grad(loss, xb)[2]

    step = compile_with_model(model, gradient, jit_compile=jit)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)]

    def run() -> None:
        for xb, yb in batches:
            keras.ops.convert_to_numpy(step(xb, yb))

    return len(batches) * batch / best_time(run, repeats)


def rate(run: Callable[[], Any], n: int, repeats: int) -> float:
    return n / best_time(run, repeats)


def cleverhans_rates(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, eps: float) -> dict[str, float]:
    """cleverhans 4's TF2 FGSM and PGD-10, each batch in a plain tf.function (its fastest use)."""
    import tensorflow as tf
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    fgsm = tf.function(lambda xb, yb: fast_gradient_method(model, xb, eps, np.inf, clip_min=0.0, clip_max=1.0, y=yb))
    pgd = tf.function(
        lambda xb, yb: projected_gradient_descent(
            model, xb, eps, 2.5 * eps / 10, 10, np.inf, clip_min=0.0, clip_max=1.0, y=yb, sanity_checks=False
        )
    )
    batches = [(tf.constant(x[i : i + batch]), tf.constant(y[i : i + batch])) for i in range(0, len(x), batch)]
    out = {}
    for name, fn in (("fgsm", fgsm), ("pgd10", pgd)):
        out[name] = rate(lambda fn=fn: [fn(xb, yb).numpy() for xb, yb in batches], len(x), repeats)
    return out


def art_classifier(model: keras.Model) -> Any:
    import tensorflow as tf
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model, nb_classes=int(model.output_shape[-1]), input_shape=tuple(model.input_shape[1:]),
        loss_object=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), clip_values=(0.0, 1.0),
    )


def art_rates(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, eps: float) -> dict[str, float]:
    """IBM ART's FGSM and PGD-10 (its defaults otherwise)."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    classifier = art_classifier(model)
    fgsm = FastGradientMethod(classifier, eps=eps, batch_size=batch)
    pgd = ProjectedGradientDescent(classifier, eps=eps, eps_step=2.5 * eps / 10, max_iter=10, batch_size=batch, verbose=False)
    return {
        "fgsm": rate(lambda: fgsm.generate(x, y=y), len(x), repeats),
        "pgd10": rate(lambda: pgd.generate(x, y=y), len(x), repeats),
    }


def cw_comparison(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, with_art: bool) -> dict[str, Any]:
    """CW-L2 with default parameters (ours and ART's), one timed run each: images/s and success."""

    def fooled(x_adv: np.ndarray) -> float:
        return float(np.mean(np.argmax(model.predict(x_adv, verbose=0), axis=1) != y))

    cw = make_attack("cw")
    cw(model, x[:batch], y[:batch], batch_size=batch)  # compile
    start = time.perf_counter()
    ours = cw(model, x, y, batch_size=batch)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "n": len(x), "params": cw.params(), "images_per_s": len(x) / seconds, "success_rate": ours.success_rate,
        "median_l2": float(np.median(ours.l2[ours.success])) if ours.success.any() else None,
    }
    if with_art:
        from art.attacks.evasion import CarliniL2Method

        art_cw = CarliniL2Method(art_classifier(model), batch_size=batch, verbose=False)
        start = time.perf_counter()
        x_art = art_cw.generate(x, y=y)
        art_seconds = time.perf_counter() - start
        result["art"] = {"images_per_s": len(x) / art_seconds, "success_rate": fooled(x_art)}
        result["speedup_vs_art"] = result["images_per_s"] / result["art"]["images_per_s"]
    return result


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=".keras model (default: the fixed 4-conv CIFAR-size CNN)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-epochs", type=int, default=1, help="train the default model this long first")
    parser.add_argument("--cw-n", type=int, default=256, help="images for the CW-L2 comparison (0 skips it)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    backend = keras.backend.backend()
    model, x, y, source = benchmark_data(args.n, args.train_epochs, load_model(args.model) if args.model else None)
    n = len(x) - len(x) % args.batch
    x, y = x[:n], y[:n]
    limits = {"compiled": limit_rate(model, x, y, args.batch, args.repeats, jit=False)}
    if backend == "tensorflow":
        limits["compiled_xla"] = limit_rate(model, x, y, args.batch, args.repeats, jit=True)
    limit = max(limits.values())
    fgsm, pgd = FGSM(eps=args.eps), PGD(eps=args.eps, steps=10)
    ours = {
        "fgsm": rate(lambda: fgsm(model, x, y, batch_size=args.batch), n, args.repeats),
        "pgd10": rate(lambda: pgd(model, x, y, batch_size=args.batch), n, args.repeats),
        # the same with the per-sample success flags read (one more forward pass), as datasets do
        "fgsm_with_success": rate(lambda: fgsm(model, x, y, batch_size=args.batch).success, n, args.repeats),
        "pgd10_with_success": rate(lambda: pgd(model, x, y, batch_size=args.batch).success, n, args.repeats),
    }
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "backend": backend,
        "devices": [str(d) for d in _devices(backend)],
        "model": args.model or "cifar_cnn (4 conv)",
        "data": source,
        "batch": args.batch,
        "n": n,
        "eps": args.eps,
        "limit_images_per_s": limits,
        "safetynet_images_per_s": ours,
        "ratios": {"fgsm_vs_limit": ours["fgsm"] / limit, "pgd10_vs_limit_over_10": ours["pgd10"] / (limit / 10)},
        "peers": {},
    }
    if not args.no_peers and backend == "tensorflow":
        if importable("cleverhans"):
            report["peers"]["cleverhans"] = cleverhans_rates(model, x, y, args.batch, args.repeats, args.eps)
        if importable("art"):
            report["peers"]["art"] = art_rates(model, x, y, args.batch, args.repeats, args.eps)
        for peer, rates in report["peers"].items():
            for attack, value in rates.items():
                report["ratios"][f"{attack}_vs_{peer}"] = ours[attack] / value
    if args.cw_n and "cw" in ATTACKS:
        count = min(args.cw_n, n)
        with_art = not args.no_peers and backend == "tensorflow" and importable("art")
        report["cw_l2"] = cw_comparison(model, x[:count], y[:count], min(args.batch, count), with_art)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _devices(backend: str) -> list:
    if backend == "jax":
        import jax

        return jax.devices()
    import tensorflow as tf

    return tf.config.list_logical_devices()


if __name__ == "__main__":
    main()
