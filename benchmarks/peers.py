"""Peers measured beside safetynet's attacks when they are importable (never dependencies):
cleverhans 4 and IBM ART on the TensorFlow backend, torchattacks on a PyTorch twin of the model."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from timing import importable, rate


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


def peer_rates(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, eps: float, backend: str,
               chosen: Sequence[str] = ("cleverhans", "art", "torchattacks")) -> dict[str, dict[str, Any]]:
    """cleverhans and ART (TensorFlow backend) and torchattacks (on the same weights), when importable."""
    peers: dict[str, dict[str, Any]] = {}
    if "cleverhans" in chosen and backend == "tensorflow" and importable("cleverhans"):
        peers["cleverhans"] = cleverhans_rates(model, x, y, batch, repeats, eps)
    if "art" in chosen and backend == "tensorflow" and importable("art"):
        peers["art"] = art_rates(model, x, y, batch, repeats, eps)
    if "torchattacks" in chosen and importable("torchattacks"):
        from torch_peer import default_device, torchattacks_rates

        peers["torchattacks"] = torchattacks_rates(model, x, y, batch, repeats, eps, default_device())
    return peers
