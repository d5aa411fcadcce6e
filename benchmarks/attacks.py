"""Attack throughput against the hardware limits and against peers; prints JSON.

Two limits, measured in the same run on the same model and batch: the compiled forward + backward
pass that yields the input gradient with every batch already on the device ("on_device": the
hardware's), and the same with each batch copied in from numpy and its gradient copied back in turn
("numpy_io"); plus the bare copy round trip, which bounds any attack with numpy in and out. FGSM and
PGD-10 (early stop off, so the ratio measures the engine) run with numpy in and out and on
device-resident arrays. Success flags are judged only when read; "*_with_success" adds reading them
(one forward pass). `eps_sweep_pgd10` times 8 eps values against 8 calls at one (a new eps must cost
no compilation). CW-L2 and DeepFool report speed, success and median L2. Peers (cleverhans 4 and
IBM ART on TensorFlow; torchattacks on a PyTorch twin with the same weights, benchmarks/torch_peer.py)
are measured when importable; they are never dependencies.

    python benchmarks/attacks.py                      # CIFAR-size 4-conv CNN, batch 256, n 4096
    KERAS_BACKEND=jax python benchmarks/attacks.py    # the same on JAX
    python benchmarks/attacks.py --model path/to/model.keras --n 1024 --cw-n 128
    # the GPU machine (JAX, PyTorch + torchattacks, no TensorFlow), about 5 minutes:
    source .device/env.sh && python benchmarks/attacks.py --batch 1024 --n 16384 --bf16 --out $OUT/attacks.json
"""
from __future__ import annotations

import argparse
import datetime as dt
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

from attacks import FGSM, PGD, make_attack  # noqa: E402
from foundation.backend import compile_with_model, value_and_grad  # noqa: E402
from foundation.models import bfloat16_copy, load_model  # noqa: E402
from benchmark_models import cifar_cnn  # noqa: E402
from peers import art_classifier, peer_runs, torchattacks_peer  # noqa: E402
from timing import best_time, emit, importable, interleaved_rates, rate, sync  # noqa: E402

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


def gradient_step(model: keras.Model, jit: bool = False) -> Callable[..., Any]:
    """The compiled forward + backward pass that yields the input gradient of a batch."""

    def gradient(forward: Callable, xb: Any, yb: Any) -> Any:
        def loss(z: Any) -> tuple[Any, Any]:
            values = keras.losses.sparse_categorical_crossentropy(yb, forward(z), from_logits=True)
            return values, values

        return value_and_grad(loss, xb)[2]

    return compile_with_model(model, gradient, jit_compile=jit)


def limit_runs(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, jit: bool) -> dict[str, Callable[[], Any]]:
    """The compiled input gradient over all batches: "on_device" with every batch already on the
    device and the gradients left there (the hardware limit), "numpy_io" with each batch copied in
    from numpy and its gradient copied back, one after the other (what a naive loop gets)."""
    step = gradient_step(model, jit)
    host = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)]
    device = [(keras.ops.convert_to_tensor(xb), keras.ops.convert_to_tensor(yb)) for xb, yb in host]

    def on_device() -> None:
        sync([step(xb, yb) for xb, yb in device][-1])

    def numpy_io() -> None:
        for xb, yb in host:
            keras.ops.convert_to_numpy(step(xb, yb))

    return {"on_device": on_device, "numpy_io": numpy_io}


def copy_rate(x: np.ndarray, batch: int, repeats: int) -> float:
    """Images/s of copying batches to the device and back with no work between: the bound on any
    attack with numpy in and out, however well it overlaps copies and work."""

    def run() -> None:
        for i in range(0, len(x) - batch + 1, batch):
            keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(x[i : i + batch]))

    return (len(x) - len(x) % batch) / best_time(run, repeats)


def eps_sweep_ratio(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, base_eps: float) -> dict[str, Any]:
    """PGD-10 at 8 new eps values (a new attack object each) against 8 calls at one eps, the two kinds
    of call alternating, after one warm-up call: 1.0 means a new eps costs nothing (the budgets are
    runtime inputs); every new eps that compiled would add seconds."""
    values = [base_eps * f for f in (0.25, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0, 2.25)]
    PGD(eps=base_eps, steps=10)(model, x, y, batch_size=batch)  # compile the structure once
    seconds = {"same": 0.0, "different": 0.0}
    for eps in values:
        for kind, attack_eps in (("same", base_eps), ("different", eps)):
            start = time.perf_counter()
            PGD(eps=attack_eps, steps=10)(model, x, y, batch_size=batch)
            seconds[kind] += time.perf_counter() - start
    return {"n": len(x), "eps_values": values, "same_eps_s": seconds["same"], "different_eps_s": seconds["different"],
            "ratio": seconds["different"] / seconds["same"]}


def minimal_attack_comparison(name: str, model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, with_art: bool
                              ) -> dict[str, Any]:
    """CW-L2 ("cw") or DeepFool with default parameters (ours and ART's), one timed run each on the
    images the model classifies correctly (a misclassified image "succeeds" at L2 0 and would drag
    the median down): images/s, success and the median L2 of the successful examples."""

    def fooled(x_adv: np.ndarray) -> np.ndarray:
        return np.argmax(model.predict(x_adv, batch_size=batch, verbose=0), axis=1) != y

    correct = ~fooled(x)
    x, y = x[correct], y[correct]
    attack = make_attack(name)
    attack(model, x[:batch], y[:batch], batch_size=batch).success  # compile
    start = time.perf_counter()
    ours = attack(model, x, y, batch_size=batch)
    success = ours.success
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "n": len(x), "params": attack.get_params(), "images_per_s": len(x) / seconds, "success_rate": float(success.mean()),
        "median_l2": float(np.median(ours.l2[success])) if success.any() else None,
    }
    if with_art:
        from art.attacks.evasion import CarliniL2Method, DeepFool

        peer_class = CarliniL2Method if name == "cw" else DeepFool
        peer = peer_class(art_classifier(model), batch_size=batch, verbose=False)
        start = time.perf_counter()
        x_art = peer.generate(x, y=y) if name == "cw" else peer.generate(x)
        art_seconds = time.perf_counter() - start
        hit = fooled(x_art)
        result["art"] = {
            "images_per_s": len(x) / art_seconds, "success_rate": float(hit.mean()),
            "median_l2": float(np.median(np.linalg.norm((x_art - x).reshape(len(x), -1), axis=1)[hit])) if hit.any() else None,
        }
        result["speedup_vs_art"] = result["images_per_s"] / result["art"]["images_per_s"]
    return result


def our_runs(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, eps: float) -> dict[str, Callable[[], Any]]:
    """FGSM and PGD-10 with numpy in and out, on device-resident arrays, and with the success flags read."""
    x_device, y_device = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    runs: dict[str, Callable[[], Any]] = {}
    for name, attack in (("fgsm", FGSM(eps=eps)), ("pgd10", PGD(eps=eps, steps=10))):
        runs[name] = lambda a=attack: a(model, x, y, batch_size=batch)
        runs[f"{name}_on_device"] = lambda a=attack: sync(a(model, x_device, y_device, batch_size=batch).x_adv)
        # the same with the per-sample success flags read (one more forward pass), as datasets do
        runs[f"{name}_with_success"] = lambda a=attack: a(model, x, y, batch_size=batch).success
    return runs


def bfloat16_rates(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, eps: float) -> dict[str, Any]:
    """FGSM and PGD-10 on the model's bfloat16 copy (device-resident input): speed and success,
    beside the float32 model's success on the same images."""
    half = bfloat16_copy(model)
    x_device, y_device = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    out: dict[str, Any] = {}
    for name, attack in (("fgsm", FGSM(eps=eps)), ("pgd10", PGD(eps=eps, steps=10))):
        out[name] = rate(lambda a=attack: sync(a(half, x_device, y_device, batch_size=batch).x_adv), len(x), repeats)
        on_half = attack(half, x, y, batch_size=batch).x_adv
        fooled = np.argmax(model.predict(on_half, batch_size=batch, verbose=0), axis=-1) != y  # judged in float32
        out[f"{name}_success_rate"] = float(fooled.mean())
        out[f"{name}_float32_success_rate"] = attack(model, x, y, batch_size=batch).success_rate
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=".keras model (default: the fixed 4-conv CIFAR-size CNN)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-epochs", type=int, default=1, help="train the default model this long first")
    parser.add_argument("--cw-n", type=int, default=256, help="images for the CW-L2 and DeepFool comparison (0 skips it)")
    parser.add_argument("--sweep-n", type=int, default=512, help="images for the eps-sweep compile check (0 skips it)")
    parser.add_argument("--bf16", action="store_true", help="also measure the model's bfloat16 copy")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--peers", nargs="+", choices=("cleverhans", "art", "torchattacks"),
                        default=("cleverhans", "art", "torchattacks"), help="which peers to measure, when importable")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    backend = keras.backend.backend()
    model, x, y, source = benchmark_data(args.n, args.train_epochs, load_model(args.model) if args.model else None)
    n = len(x) - len(x) % args.batch
    x, y = x[:n], y[:n]
    # every timed run takes its turn in each round (see timing.interleaved_rates)
    runs = {f"limit/{k}": v for k, v in limit_runs(model, x, y, args.batch, jit=False).items()}
    if backend == "tensorflow":
        runs |= {f"limit/{k}_xla": v for k, v in limit_runs(model, x, y, args.batch, jit=True).items()}
    runs |= {f"safetynet/{k}": v for k, v in our_runs(model, x, y, args.batch, args.eps).items()}
    chosen = () if args.no_peers else args.peers
    for peer, peer_runs_ in peer_runs(model, x, y, args.batch, args.eps, backend, chosen).items():
        runs |= {f"{peer}/{k}": v for k, v in peer_runs_.items()}
    timed = interleaved_rates(runs, n, args.repeats)
    group = {prefix: {k.split("/", 1)[1]: v for k, v in timed.items() if k.startswith(prefix + "/")}
             for prefix in dict.fromkeys(k.split("/", 1)[0] for k in timed)}
    limits, ours = group.pop("limit"), group.pop("safetynet")
    ours["pgd10_success_rate"] = PGD(eps=args.eps, steps=10)(model, x, y, batch_size=args.batch).success_rate
    limit = max(v for k, v in limits.items() if k.startswith("on_device"))
    copies = copy_rate(x, args.batch, args.repeats)
    torchattacks = torchattacks_peer(model, x, y, args.batch, args.repeats, args.eps, chosen)
    if torchattacks is not None:
        group["torchattacks"] = torchattacks
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
        "copy_round_trip_images_per_s": copies,
        "safetynet_images_per_s": ours,
        "ratios": {
            "fgsm_on_device_vs_limit": ours["fgsm_on_device"] / limit,
            "pgd10_on_device_vs_limit_over_10": ours["pgd10_on_device"] / (limit / 10),
            "fgsm_numpy_io_vs_copy_bound": ours["fgsm"] / min(limit, copies),
            "fgsm_vs_limit": ours["fgsm"] / limit,
            "pgd10_vs_limit_over_10": ours["pgd10"] / (limit / 10),
        },
        "peers": group,
    }
    for peer, rates in group.items():
        for attack in ("fgsm", "pgd10"):
            if peer == "torchattacks":  # like for like: on the device, and numpy in and out
                report["ratios"][f"{attack}_on_device_vs_torchattacks"] = ours[f"{attack}_on_device"] / rates[attack]
                report["ratios"][f"{attack}_vs_torchattacks"] = ours[attack] / rates[f"{attack}_numpy_io"]
            else:
                report["ratios"][f"{attack}_vs_{peer}"] = ours[attack] / rates[attack]
                if peer == "cleverhans":  # it is timed on inputs converted to tensors beforehand: like for like
                    report["ratios"][f"{attack}_on_device_vs_cleverhans"] = ours[f"{attack}_on_device"] / rates[attack]
    if args.sweep_n:
        count = min(args.sweep_n, n)
        report["eps_sweep_pgd10"] = eps_sweep_ratio(model, x[:count], y[:count], min(args.batch, count), args.eps)
    if args.bf16:
        report["bfloat16"] = bfloat16_rates(model, x, y, args.batch, args.repeats, args.eps)
    if args.cw_n:
        count = min(args.cw_n, n)
        with_art = "art" in chosen and backend == "tensorflow" and importable("art")
        report["cw_l2"] = minimal_attack_comparison("cw", model, x[:count], y[:count], min(args.batch, count), with_art)
        report["deepfool"] = minimal_attack_comparison("deepfool", model, x[:count], y[:count], min(args.batch, count), with_art)
    emit(report, args.out)


def _devices(backend: str) -> list:
    if backend == "jax":
        import jax

        return jax.devices()
    import tensorflow as tf

    return tf.config.list_logical_devices()


if __name__ == "__main__":
    main()
