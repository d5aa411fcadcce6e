"""Peers measured beside safetynet's attacks when they are importable (never dependencies):
cleverhans 4 and IBM ART on the TensorFlow backend, torchattacks on a PyTorch twin of the model."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import keras
import numpy as np

from timing import importable


def cleverhans_runs(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, eps: float) -> dict[str, Callable[[], Any]]:
    """cleverhans 4's TF2 FGSM and PGD-10, each batch in a plain tf.function (its fastest use), on
    batches converted to tensors beforehand."""
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
    return {name: (lambda fn=fn: [fn(xb, yb).numpy() for xb, yb in batches]) for name, fn in (("fgsm", fgsm), ("pgd10", pgd))}


def art_classifier(model: keras.Model) -> Any:
    import tensorflow as tf
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model, nb_classes=int(model.output_shape[-1]), input_shape=tuple(model.input_shape[1:]),
        loss_object=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), clip_values=(0.0, 1.0),
    )


def art_runs(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, eps: float) -> dict[str, Callable[[], Any]]:
    """IBM ART's FGSM and PGD-10 (its defaults otherwise)."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    classifier = art_classifier(model)
    fgsm = FastGradientMethod(classifier, eps=eps, batch_size=batch)
    pgd = ProjectedGradientDescent(classifier, eps=eps, eps_step=2.5 * eps / 10, max_iter=10, batch_size=batch, verbose=False)
    return {"fgsm": lambda: fgsm.generate(x, y=y), "pgd10": lambda: pgd.generate(x, y=y)}


def peer_runs(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, eps: float, backend: str,
              chosen: Sequence[str]) -> dict[str, dict[str, Callable[[], Any]]]:
    """cleverhans and ART (TensorFlow backend), when importable and chosen: runs to time beside ours."""
    runs: dict[str, dict[str, Callable[[], Any]]] = {}
    if "cleverhans" in chosen and backend == "tensorflow" and importable("cleverhans"):
        runs["cleverhans"] = cleverhans_runs(model, x, y, batch, eps)
    if "art" in chosen and backend == "tensorflow" and importable("art"):
        runs["art"] = art_runs(model, x, y, batch, eps)
    return runs


def torchattacks_peer(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, eps: float,
                      chosen: Sequence[str]) -> dict[str, Any] | None:
    """torchattacks on a PyTorch twin with the same weights (timed by torch_peer), when importable and chosen."""
    if "torchattacks" not in chosen or not importable("torchattacks"):
        return None
    from torch_peer import default_device, torchattacks_rates

    return torchattacks_rates(model, x, y, batch, repeats, eps, default_device())
