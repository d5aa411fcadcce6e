"""Adversarial training, training on stored adversarial datasets, and robust-accuracy reports.

`AdversarialTraining` wraps a classifier in a `keras.Model` whose `train_step` replaces (part of)
each batch by adversarial versions made on the current weights, then runs Keras's own step; so
`fit`, callbacks and distribution strategies work unchanged and the classifier itself stays a plain
model (save `trainer.classifier`, never the wrapper). The attack is one of the gradient-sign family
(`attacks.gradient_sign`) run by the one engine inside the step (`perturb_batch`), with eps a
runtime value, so the PGD loop exists once and eps warm-up is just a smaller eps.

- PGD-AT (Madry et al. 2018): `pgd:eps=0.3,steps=40`.
- FGSM-RS, the fast variant (Wong et al. 2020): `fgsm_rs:eps=0.3`, one step of 1.25 eps from a
  uniform random start.
- TRADES (Zhang et al. 2019): cross-entropy on the clean batch + beta * KL(clean || adversarial),
  with the attack maximising that KL (the engine's `TradesKL` objective).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from attacks import APGD, PGD, Attack, CarliniWagnerL2, GradientSignAttack, parse_attack_spec
from foundation.validation import check_images, check_integer, check_labels, check_model_input
from attacks.engine import unit_noise_in_graph
from attacks.norms import check_norm
from attacks.objectives import TradesKL
from foundation.shards import iter_shards, read_manifest
from foundation.storage import atomic_write_json

Tensor = Any


def training_attack(spec: str | Attack, default_eps: float) -> GradientSignAttack:
    """The attack to train against: a gradient-sign attack object or spec (`pgd:eps=0.3,steps=7`),
    or `fgsm_rs[:eps=...]` (PGD with one step of 1.25 eps from a random start, Wong et al. 2020)."""
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        if name.strip().lower().replace("-", "_") == "fgsm_rs":
            given = {item.partition("=")[0].strip().replace("-", "_") for item in rest.split(",") if item.strip()}
            attack = parse_attack_spec(f"pgd:{rest}", defaults={"eps": default_eps, "steps": 1})
            return attack if given & {"step_size", "rel_stepsize"} else dataclasses.replace(attack, rel_stepsize=1.25)
        spec = parse_attack_spec(spec, defaults={"eps": default_eps})
    if not isinstance(spec, GradientSignAttack):
        raise ValueError(  # noqa: TRY004 (a bad --adversarial spec: the CLI's one-line error)
            f"adversarial training takes a gradient-sign attack (fgsm, fgsm_rs, bim, pgd, mifgsm), got {spec.name!r}"
        )
    if spec.eps_min is not None:
        raise ValueError("eps_min draws a radius per image for datasets; adversarial training ramps eps with"
                         " its warm-up instead (--eps-warmup): leave eps_min out of the training attack")
    return spec


class AdversarialTraining(keras.Model):
    """Trains `classifier` on adversarial versions of its batches, made on the fly on its weights.

    mix: fraction of each batch replaced by its adversarial version (the first rows of a shuffled
        batch); 0 is standard training.
    warmup_steps: eps (and the step size with it) ramps linearly from eps/K to eps over the first K
        optimizer steps.
    trades_beta: TRADES instead of PGD-AT: every row is attacked, the loss is cross-entropy on the
        clean rows + beta * KL(clean || adversarial) (needs mix=1).
    augment: a layer applied to each batch in training mode before the attack (random shifts and
        flips, `training.augmented.augmentation`), so the attack perturbs the image the step trains on.
    """

    def __init__(
        self, classifier: keras.Model, attack: GradientSignAttack, *, mix: float = 1.0,
        warmup_steps: int = 0, trades_beta: float | None = None, augment: keras.layers.Layer | None = None, seed: int = 0,
    ) -> None:
        super().__init__(name=f"{classifier.name}_adversarial_training")
        if not classifier.trainable_weights:
            raise ValueError(f"model {classifier.name!r} has no trainable weights: nothing to train")
        if not isinstance(attack, GradientSignAttack):
            raise ValueError(f"adversarial training takes a gradient-sign attack, got {type(attack).__name__}")  # noqa: TRY004
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1] (the adversarial fraction of each batch), got {mix}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if trades_beta is not None:
            if not (math.isfinite(trades_beta) and trades_beta >= 0):
                raise ValueError(f"trades_beta must be a finite number >= 0, got {trades_beta}")
            if mix != 1.0 or attack.restarts > 1 or attack.early_stop:
                raise ValueError("TRADES attacks every row once: it needs mix=1, restarts=1 and no early_stop")
        self.classifier = classifier
        self.attack = attack
        self.mix, self.warmup_steps, self.trades_beta, self.augment = float(mix), warmup_steps, trades_beta, augment
        if augment is not None and not augment.built:
            augment.build(classifier.input_shape)  # no weights; built here, Keras (JAX) would warn it is not
        self.noise_seed = keras.random.SeedGenerator(seed)
        self.built = True  # its weights are the classifier's (built) and the seeds': loadable before fit (`training.resume`)

    def call(self, x: Tensor, training: bool = False) -> Tensor:
        return self.classifier(x, training=training)

    def train_step(self, *args: Any) -> Any:
        """Keras's own step on the adversarial batch. TensorFlow calls it as (data); JAX as
        (state, data), where the attack reads the state's values through a StatelessScope."""
        if keras.backend.backend() != "jax":
            (data,) = args
            return super().train_step(self.adversarial_batch(*keras.utils.unpack_x_y_sample_weight(data)))
        (trainable, non_trainable, optimizer_values, metrics_values), data = args
        mapping = [
            *zip(self.trainable_variables, trainable), *zip(self.non_trainable_variables, non_trainable),
            *zip(self.optimizer.variables, optimizer_values),
        ]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            data = self.adversarial_batch(*keras.utils.unpack_x_y_sample_weight(data))
        non_trainable = [scope.get_current_value(v) for v in self.non_trainable_variables]  # the noise seed moved
        return super().train_step((trainable, non_trainable, optimizer_values, metrics_values), data)

    def adversarial_batch(self, x: Tensor, y: Tensor, sample_weight: Tensor | None = None) -> tuple:
        """(x, y, sample_weight) to train on: the first `mix` of the rows made adversarial (TRADES:
        the clean rows followed by their adversarial versions)."""
        x = ops.convert_to_tensor(x, "float32")
        if self.augment is not None:
            x = self.augment(x, training=True)
        if self.mix == 0.0:
            return x, y, sample_weight
        if self.trades_beta is not None:
            twice = None if sample_weight is None else ops.concatenate([sample_weight, sample_weight])
            return ops.concatenate([x, self._attack(x, y)]), ops.concatenate([y, y]), twice
        n = ops.shape(x)[0]
        k = round(self.mix * n) if isinstance(n, int) else ops.cast(ops.round(self.mix * ops.cast(n, "float32")), "int32")
        return ops.concatenate([self._attack(x[:k], y[:k]), x[k:]]), y, sample_weight

    def _attack(self, x: Tensor, y: Tensor) -> Tensor:
        """The attack on the current weights (the engine, in the train step), from an in-graph random
        start; during warm-up at eps (and step) scaled by the fraction of warm-up done."""
        y = ops.reshape(y, (-1,))
        attack = self.attack
        noise = None
        if attack.random_start:
            noise = unit_noise_in_graph((ops.shape(x)[0], attack.restarts, *x.shape[1:]), attack.norm, self.noise_seed)
        scale = 1.0
        if self.warmup_steps:
            scale = ops.minimum(1.0, (ops.cast(self.optimizer.iterations, "float32") + 1.0) / self.warmup_steps)
        objective = TradesKL() if self.trades_beta is not None else None
        return attack.perturb_batch(self._logits, x, y, noise, scale=scale, objective=objective)

    def _logits(self, x: Tensor) -> Tensor:
        return self.classifier(x, training=False)

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None, training: bool = True) -> Tensor:
        """TRADES while training: the model's loss on the clean half + beta * KL(clean || adversarial)."""
        if self.trades_beta is None or not training:
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        clean, adversarial = ops.split(y_pred, 2)
        weight = None if sample_weight is None else ops.split(sample_weight, 2)[0]
        natural = super().compute_loss(x, ops.split(y, 2)[0], clean, weight, training)
        kl = keras.losses.KLDivergence()(ops.softmax(clean), ops.softmax(adversarial))  # a Loss: scaled per replica too
        return natural + self.trades_beta * kl


def labelled_adversarial_examples(
    directories: Sequence[str | os.PathLike], image_shape: Sequence[int], *, seed: int = 0, shuffle_buffer: int = 10_000
) -> Any:
    """A repeating `tf.data.Dataset` of (adversarial image, true label) from datasets written by
    `safetynet attack`: each streamed shard by shard (sha256-verified), shuffled through a buffer of
    `shuffle_buffer` examples, and drawn from uniformly."""
    import tensorflow as tf

    if not directories:
        raise ValueError("no adversarial datasets given")
    streams = []
    for directory in directories:
        manifest = read_manifest(directory)
        shape = tuple(manifest["image_shape"])
        if shape != tuple(image_shape):
            raise ValueError(f"dataset {directory} holds images of shape {shape}, the classifier takes {tuple(image_shape)}")

        def pairs(directory: str | os.PathLike = directory) -> Any:
            for arrays in iter_shards(directory):
                yield from zip(arrays["x_adv"], arrays["y"].astype(np.int64), strict=True)

        signature = (tf.TensorSpec(shape, tf.float32), tf.TensorSpec((), tf.int64))
        stream = tf.data.Dataset.from_generator(pairs, output_signature=signature)
        streams.append(stream.shuffle(min(shuffle_buffer, manifest["count"]), seed=seed).repeat())
    return tf.data.Dataset.sample_from_datasets(streams, seed=seed) if len(streams) > 1 else streams[0]


def mixed_batches(
    x: np.ndarray, y: np.ndarray, directories: Sequence[str | os.PathLike], *, mix: float = 0.5,
    batch_size: int = 128, seed: int = 0, shuffle_buffer: int = 10_000,
) -> Any:
    """Endless batches whose last round(mix * batch_size) rows are stored adversarial examples and
    the rest shuffled clean training images."""
    import tensorflow as tf

    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1] (the adversarial fraction of each batch), got {mix}")
    k = round(mix * batch_size)
    clean = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int64))).shuffle(len(x), seed=seed).repeat()
    adversarial = labelled_adversarial_examples(directories, x.shape[1:], seed=seed, shuffle_buffer=shuffle_buffer)
    if k == 0:
        return clean.batch(batch_size).prefetch(2)
    if k == batch_size:
        return adversarial.batch(batch_size).prefetch(2)
    joined = tf.data.Dataset.zip(clean.batch(batch_size - k), adversarial.batch(k))
    return joined.map(lambda a, b: (tf.concat([a[0], b[0]], 0), tf.concat([a[1], b[1]], 0))).prefetch(2)


def robustness_report(
    model: keras.Model, x: np.ndarray, y: np.ndarray, *, eps: float, norm: str = "inf", steps: int = 100,
    restarts: int = 5, target_classes: int = 9, cw_n: int = 100, batch_size: int = 256, seed: int = 0,
) -> dict[str, Any]:
    """Clean and robust accuracy on (x, y) under a worst-case suite: PGD-`steps` with `restarts`
    random starts, APGD-CE, APGD-DLR and targeted APGD-DLR (Croce & Hein 2020: towards each of the
    input's `target_classes` most likely other classes in turn, on the inputs no earlier target
    broke, as the adaptive suite of `evaluate` does), each `steps` iterations (AutoAttack's 100 by
    default: at 40, 0.8 points above ART's AutoAttack on a PGD-trained digits CNN), on all of x; and
    CW-L2 on the first `cw_n` images. An input counts as robust when it is classified correctly and no attack of the suite
    found a misclassified point within eps (in `norm`): "robust_accuracy" is that worst case, with
    each attack's own figure beside it and the attack that broke most inputs alone. CW-L2 (no eps)
    also gives the median L2 of the perturbations it needed (the minimal distortion)."""
    x = check_images(x, (0.0, 1.0))
    y = check_labels(y, len(x), check_model_input(model, x))
    target_classes = check_integer("target_classes", target_classes)
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    correct = np.argmax(logits, axis=-1) == y
    order = np.argsort(-logits, axis=-1, kind="stable")
    others = np.stack([row[row != label] for row, label in zip(order, y, strict=True)])
    suite = {
        "pgd": PGD(eps=eps, norm=norm, steps=steps, restarts=restarts, seed=seed),
        "apgd_ce": APGD(eps=eps, norm=norm, steps=steps, seed=seed),
        "apgd_dlr": APGD(eps=eps, norm=norm, steps=steps, loss="dlr", seed=seed),
        "apgd_dlr_targeted": APGD(eps=eps, norm=norm, steps=steps, loss="dlr", seed=seed),
    }
    report: dict[str, Any] = {"n": len(x), "eps": float(eps), "norm": check_norm(norm), "clean_accuracy": float(correct.mean())}
    held = correct.copy()

    def misclassified(attack: Attack, rows: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
        result = attack(model, x[rows], y[rows], targets=targets, batch_size=batch_size)
        return np.argmax(model.predict(result.x_adv, batch_size=batch_size, verbose=0), axis=-1) != y[rows]

    for name, attack in suite.items():
        if name == "apgd_dlr_targeted":
            broken, tried = np.zeros(len(x), bool), min(target_classes, others.shape[1])
            for rank in range(tried):
                rows = np.flatnonzero(correct & ~broken)
                if len(rows):
                    broken[rows] = misclassified(attack, rows, others[rows, rank])
        else:
            broken = misclassified(attack, np.arange(len(x)))
        held &= ~broken
        report[name] = {"attack": attack.get_params(), "robust_accuracy": float((correct & ~broken).mean())}
        if name == "apgd_dlr_targeted":
            report[name]["target_classes"] = tried
    report["robust_accuracy"] = float(held.mean())
    report["strongest"] = min(suite, key=lambda name: report[name]["robust_accuracy"])
    if cw_n > 0:
        cw = CarliniWagnerL2(seed=seed)
        result = cw(model, x[:cw_n], y[:cw_n], batch_size=batch_size)
        size = result.linf if report["norm"] == "inf" else result.l2
        found = result.success & correct[:cw_n]
        report["cw"] = {
            "attack": cw.get_params(), "n": len(result.x_adv),
            "robust_accuracy": float((correct[:cw_n] & ~(result.success & (size <= eps + 1e-6))).mean()),
            "median_l2": float(np.median(result.l2[found])) if found.any() else None,
        }
    return report


def format_robustness(report: dict[str, Any]) -> str:
    """One line per attack: clean and robust accuracy, then the worst case over the suite."""
    lines = [f"clean accuracy {report['clean_accuracy']:.4f} on {report['n']} test images (eps {report['eps']:.4g}, L{report['norm']})"]
    pgd = report["pgd"]
    lines.append(f"PGD-{pgd['attack']['steps']} x {pgd['attack']['restarts']} restarts: robust accuracy {pgd['robust_accuracy']:.4f}")
    for name, label in (("apgd_ce", "APGD-CE"), ("apgd_dlr", "APGD-DLR"), ("apgd_dlr_targeted", "APGD-DLR targeted")):
        if name in report:
            at = f" at {report[name]['target_classes']} classes" if "target_classes" in report[name] else ""
            lines.append(f"{label}-{report[name]['attack']['steps']}{at}: robust accuracy {report[name]['robust_accuracy']:.4f}")
    if "robust_accuracy" in report:
        lines.append(f"worst case over the suite: robust accuracy {report['robust_accuracy']:.4f} (strongest alone: {report['strongest']})")
    if "cw" in report:
        cw = report["cw"]
        median = "n/a" if cw["median_l2"] is None else f"{cw['median_l2']:.3f}"
        lines.append(f"CW-L2 on {cw['n']}: robust accuracy {cw['robust_accuracy']:.4f}, median L2 of its examples {median}")
    return "\n".join(lines)


def robustness_path(model_path: str | os.PathLike) -> Path:
    """Where a model's robustness report lives: `classifier.keras` -> `classifier.robustness.json`."""
    return Path(model_path).with_suffix(".robustness.json")


def write_robustness(report: dict[str, Any], model_path: str | os.PathLike) -> Path:
    return atomic_write_json(robustness_path(model_path), report)
