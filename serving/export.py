"""Export a guard as ONE TensorFlow SavedModel that serves without safetynet (TF Serving, or any
TensorFlow runtime: `tf.saved_model.load(dir).signatures["serving_default"]`).

The `serving_default` signature takes `images` (float32 [None, H, W, C], in the guard's clip range)
and returns, per image:
- `probabilities` (float32, softmax of the logits) and `label` (int64): only when the guard has a
  classifier; masked on rejected images (NaN probabilities, label -1), where the HTTP service
  answers null: the classifier's answer on a suspected adversarial input is an oracle;
- `adversarial_score` (float32): the detector's score, as `Detector.score` gives it; NaN on
  rejected images (null over HTTP) unless exported with `scores_for_rejected=True`;
- `flagged` (bool): score above the calibrated threshold, or NaN, or an image that is not finite
  or leaves the clip range (`Guard.predict` refuses such a batch with ValueError; a served model
  answers per image, failing closed);
- `rejected` (bool): `flagged` under the "reject" policy, all False under "flag".
The threshold and the policy are baked into the graph; `assets.extra/safetynet.json` records them
with the calibration, for people (TF Serving ignores that folder).

Which families export: `input` and `activations`, whose scores are Keras graphs
(`Detector.scoring_model`): the export holds the classifier and the detector in one graph (for
`activations`, one pass through the classifier feeds both the logits and the detector head). The
others do not: `safetynet` quantises activations and evaluates an RBF-SVM in NumPy, `mahalanobis`
nudges inputs along input gradients and weighs layers with a scikit-learn regression, `squeeze`
filters images with OpenCV (median, non-local means), and `ensemble` stacks such members in NumPy;
none of that is inside a Keras graph, so a SavedModel could not reproduce their scores.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from foundation.storage import atomic_directory, atomic_write_json
from serving.guard import Guard

METADATA_FILE = Path("assets.extra") / "safetynet.json"


def serving_function(guard: Guard, model: keras.Model, scores_for_rejected: bool = False) -> Any:
    """images -> the signature's outputs, with the guard's threshold, policy and clip range baked in,
    and rejected rows masked as the HTTP service nulls them (`serving.answers`)."""
    threshold = float(guard.detector.threshold)
    low, high = guard.clip
    reject = guard.policy == "reject"

    def serve(images: Any) -> dict[str, Any]:
        outputs = model(images, training=False)
        score = outputs["score"]
        pixels = ops.reshape(images, (ops.shape(images)[0], -1))
        valid = ops.all(ops.isfinite(pixels) & (pixels >= low) & (pixels <= high), axis=-1)
        # in float64, as Guard.predict compares; `not <=` flags a NaN score
        flagged = ops.logical_not(ops.cast(score, "float64") <= threshold) | ops.logical_not(valid)
        rejected = flagged if reject else ops.zeros_like(flagged)
        nan = ops.full_like(score, float("nan"))
        result = {
            "adversarial_score": score if scores_for_rejected else ops.where(rejected, nan, score),
            "flagged": flagged,
            "rejected": rejected,
        }
        if "logits" in outputs:
            probabilities = ops.softmax(outputs["logits"], axis=-1)
            label = ops.cast(ops.argmax(probabilities, axis=-1), "int64")
            result["probabilities"] = ops.where(rejected[:, None], ops.full_like(probabilities, float("nan")), probabilities)
            result["label"] = ops.where(rejected, ops.full_like(label, -1), label)
        return result

    return serve


def export_guard(guard: Guard, directory: str | os.PathLike, *, scores_for_rejected: bool = False) -> Path:
    """Write `guard` as one SavedModel in `directory` (built under a temporary name, then renamed;
    an existing export there is replaced whole). ValueError for families that do not export.
    `scores_for_rejected`: keep the detector's score on rejected rows (for trusted callers only)."""
    model = guard.scoring_model
    if model is None:
        raise ValueError(
            f"a guard with a {guard.detector.kind!r} detector cannot be exported: its score has a step "
            f"with no Keras graph (OpenCV's non-local means in `squeeze`, or `mahalanobis` with noise > 0); "
            f"every family exports without those"
        )
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serving_function(guard, model, scores_for_rejected),
        input_signature=[tf.TensorSpec((None, *guard.input_shape), tf.float32, name="images")],
    )
    metadata = {
        "name": guard.name,
        "policy": guard.policy,
        "clip": list(guard.clip),
        "detector": guard.detector.kind,
        "threshold": guard.detector.threshold,
        "calibration": guard.detector.calibration.to_json(),
        "classifier_fingerprint": guard.detector.classifier_fingerprint,
        "outputs": ["adversarial_score", "flagged", "rejected"]
        + (["probabilities", "label"] if guard.classifier is not None else []),
        "rejected_rows": {"probabilities": "NaN", "label": -1,
                          "adversarial_score": "kept" if scores_for_rejected else "NaN"},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }
    with atomic_directory(directory) as temp:
        archive.write_out(str(temp), verbose=False)
        atomic_write_json(temp / METADATA_FILE, metadata)
    return Path(directory)


def export_guard_directory(guard_directory: str | os.PathLike, directory: str | os.PathLike, *,
                           scores_for_rejected: bool = False) -> Path:
    """Load a guard directory (written by `Guard.save`) and export it (`safetynet export`)."""
    return export_guard(Guard.load(guard_directory), directory, scores_for_rejected=scores_for_rejected)
