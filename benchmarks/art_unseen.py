"""IBM ART's CW-L2 and DeepFool as unseen attacks for benchmarks/detection.py, beside ours.

Imported only when `--art` asks for them: ART is a peer measured against, never a dependency of
safetynet. ART's CW runs through cw_reference's `art` (the same wrapping as there, peers'
`art_classifier`); its images are scored like ours: AUROC against every clean test image and TPR at
the detector's calibrated threshold, on the images that fool the classifier.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cw_reference import art as art_cw
from cw_reference import fooled
from detector.base import Detector
from detector.metrics import detection
from foundation.storage import atomic_write, model_fingerprint
from peers import art_classifier
from timing import importable


def require_art() -> None:
    """One clear error when ART is missing, before any work is done."""
    if not importable("art"):
        raise SystemExit("--art needs IBM ART (pip install adversarial-robustness-toolbox): it is only a peer"
                         " to measure against, never a dependency of safetynet")


def art_cw_params(search_steps: int, iterations: int, initial_const: float) -> dict[str, Any]:
    """ART CarliniL2Method's settings as the benchmarks run it (untargeted, confidence 0); the
    cache key of `art_attacks`."""
    return {"binary_search_steps": search_steps, "max_iter": iterations, "initial_const": initial_const,
            "learning_rate": 0.01, "confidence": 0.0, "batch_size": 256}


def art_attacks(model: keras.Model, x: np.ndarray, y: np.ndarray, cw_params: dict[str, Any],
                cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """ART's CarliniL2Method (untargeted, `cw_params`) and DeepFool (its defaults) on (x, y): images,
    success (the model's argmax differs from y) and wall time of each. With `cache`, a result stored
    there for the same images, parameters and model weights is reused, and a new one is stored."""
    from art.attacks.evasion import DeepFool

    key = json.dumps({"params": cw_params, "model": model_fingerprint(model)}, sort_keys=True)
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["key"]) != key or not np.array_equal(stored["x"], x):
                raise SystemExit(f"{cache} holds ART's images for another model, images or parameters: remove it or pick another path")
            return {name: {"x_adv": stored[f"{name}_x_adv"], "success": stored[f"{name}_success"],
                           "seconds": float(stored[f"{name}_seconds"]), "params": cw_params, "cached": str(cache)}
                    for name in ("art_cw", "art_deepfool")}

    runs = {"art_cw": art_cw(model, x, y, cw_params)}
    start = time.perf_counter()
    x_adv = DeepFool(art_classifier(model), batch_size=cw_params["batch_size"], verbose=False).generate(x).astype(np.float32)
    runs["art_deepfool"] = {"x_adv": x_adv, "success": fooled(model, x_adv, y, cw_params["batch_size"]),
                            "seconds": time.perf_counter() - start}
    if cache is not None:
        arrays = {f"{name}_{field}": run[field] for name, run in runs.items() for field in ("x_adv", "success", "seconds")}
        atomic_write(cache, lambda temp: np.savez(temp, x=x, key=key, **arrays))
    return runs


def art_rows(detector: Detector, x_clean: np.ndarray, clean_correct: np.ndarray,
             runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ART attack: success rate, AUROC and TPR at the calibrated threshold on the images it
    turned (successful, from a clean image the classifier got right: `clean_correct` of the first
    images, as our rows in `detector.metrics.attack_row`)."""
    clean_scores = np.asarray(detector.score(x_clean), np.float64)
    rows = {}
    for name, run in runs.items():
        scores = np.asarray(detector.score(run["x_adv"]), np.float64)
        turned = run["success"] & clean_correct[:len(scores)]
        found = detection(clean_scores, scores[turned], detector.threshold)
        rows[name] = {"success_rate": float(np.mean(run["success"])), "auroc": found["auroc"], "tpr": found["tpr"],
                      "n": len(scores), "n_successful": int(np.sum(run["success"])), "n_turned": int(turned.sum())}
    return rows
