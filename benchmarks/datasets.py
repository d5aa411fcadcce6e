"""Dataset generation end to end (attack + shard writing + checksums) against the bare attack, and
peak memory as the dataset grows; prints JSON.

Each measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. The source is an
`.npy` file on disk read a shard at a time (`NpySource`), so memory should stay flat as N grows.

    python benchmarks/datasets.py                         # FGSM, N = 5,000 and 50,000, CIFAR-size CNN
    python benchmarks/datasets.py --attack pgd --sizes 2000 20000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import emit

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, shutil, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, sys.argv[1])
import numpy as np, keras
from attacks import make_attack
from attacks.dataset import NpySource, generate_dataset
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
from benchmark_models import cifar_cnn
mode, work, n, attack_name, batch, shard = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
keras.utils.set_random_seed(0)
model = cifar_cnn()
attack = make_attack(attack_name, eps=8 / 255)
source = NpySource(os.path.join(work, "x.npy"), os.path.join(work, "y.npy"), count=n)
warm_x, warm_y, _ = source.read(0, batch)
attack(model, warm_x, warm_y, batch_size=batch)  # compile outside the timing
start = time.perf_counter()
if mode == "bare":
    for lo in range(0, n, shard):
        x, y, index = source.read(lo, min(lo + shard, n))
        attack(model, x, y, index=index, batch_size=batch).success  # datasets store the flags too
else:
    out = os.path.join(work, f"ds-{n}")
    shutil.rmtree(out, ignore_errors=True)
    generate_dataset(model, attack, source, out, shard_size=shard, batch_size=batch, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"images_per_s": n / seconds, "seconds": seconds,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(mode: str, work: Path, n: int, attack: str, batch: int, shard: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), mode, str(work), str(n), attack, str(batch), str(shard)],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="fgsm")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=2_560)
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args()

    import numpy as np

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        largest = max(args.sizes)
        rng = np.random.default_rng(0)
        images = np.lib.format.open_memmap(work / "x.npy", mode="w+", dtype=np.uint8, shape=(largest, 32, 32, 3))
        for lo in range(0, largest, 10_000):
            images[lo : lo + 10_000] = rng.integers(0, 256, images[lo : lo + 10_000].shape, dtype=np.uint8)
        images.flush()
        del images
        np.save(work / "y.npy", rng.integers(0, 10, largest))
        os.sync()  # flush the source to disk first, or the shards' fsyncs wait for its write-back
        # a first, discarded run: the first shard writes after creating the source were measured
        # up to 10x slower (file-system write-back), which says nothing about the pipeline
        run_child("dataset", work, min(args.sizes), args.attack, args.batch, args.shard_size)
        runs = {}
        for n in args.sizes:
            runs[n] = {"dataset": run_child("dataset", work, n, args.attack, args.batch, args.shard_size),
                       "bare_attack": run_child("bare", work, n, args.attack, args.batch, args.shard_size)}
            runs[n]["throughput_ratio"] = runs[n]["dataset"]["images_per_s"] / runs[n]["bare_attack"]["images_per_s"]
    smallest = min(args.sizes)
    report = {
        "attack": args.attack, "batch": args.batch, "shard_size": args.shard_size, "model": "cifar_cnn (4 conv), 32x32x3",
        "runs": {str(n): run for n, run in runs.items()},
        "rss_ratio_largest_vs_smallest": runs[largest]["dataset"]["peak_rss_mib"] / runs[smallest]["dataset"]["peak_rss_mib"],
    }
    emit(report)


if __name__ == "__main__":
    main()
