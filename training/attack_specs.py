"""Which attacks a stage runs: the data's default budget, spec strings made into attacks, the
attacks a detector was trained on (from its manifest), and eps sweeps."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from attacks import Attack, GradientSignAttack, make_attack, parse_attack_spec
from detector import Detector
from training.data import ImageDataset


def default_eps(input_shape: Sequence[int]) -> float:
    """0.3 for single-channel images (the MNIST convention), 8/255 for colour (CIFAR, ImageNet)."""
    return 0.3 if input_shape[-1] == 1 else 8 / 255


def default_attacks(input_shape: Sequence[int], eps: float | None = None) -> list[Attack]:
    """FGSM and PGD-10 at `eps` (default: `default_eps`)."""
    eps = default_eps(input_shape) if eps is None else eps
    return [make_attack("fgsm", eps=eps), make_attack("pgd", eps=eps, steps=10)]


def resolve_attack(attack: Attack | str, data: ImageDataset, overrides: dict[str, Any] | None = None) -> Attack:
    """An attack object from a spec string, with eps defaulting to the data's convention."""
    if isinstance(attack, Attack):
        return attack
    return parse_attack_spec(attack, defaults={"eps": default_eps(data.input_shape)}, overrides=overrides)


def trained_attacks(detector_dir: str | os.PathLike) -> list[Attack]:
    """The attacks a detector was trained on, rebuilt from its manifest (quarantined inputs, which
    no attack can regenerate, are left out)."""
    info = Detector.read_manifest(detector_dir).get("info", {})
    attacks = []
    for entry in info.get("trained_on", []):
        if entry.get("adversarial_only"):
            continue
        params = {k: v for k, v in entry["attack"].items() if k != "attack"}
        params["clip"] = tuple(params.get("clip", (0.0, 1.0)))
        attacks.append(make_attack(entry["attack"]["attack"], **_legacy_step(params)))
    return attacks


def _legacy_step(params: dict[str, Any]) -> dict[str, Any]:
    """Manifests written before rel_stepsize existed stored the effective step size, 2.5 * eps / steps
    for a default one: read that as the default (relative) step, so that it follows a new eps."""
    if "rel_stepsize" not in params and "step_size" in params and "eps" in params and np.isclose(
        params["step_size"], 2.5 * params["eps"] / params.get("steps", 10)
    ):
        return {k: v for k, v in params.items() if k != "step_size"}
    return params


def sweep_eps(attacks: Sequence[Attack | str], eps_values: Sequence[float], data: ImageDataset) -> list[Attack]:
    """Each attack that has an eps once per value of `eps_values` (others once). A relative step
    (the default) follows the new eps; an absolute step_size stays. All share one compiled loop:
    eps is a runtime value of the engine."""
    swept = []
    for attack in attacks:
        base = resolve_attack(attack, data)
        if not isinstance(base, GradientSignAttack):
            swept.append(base)
            continue
        swept.extend(dataclasses.replace(base, eps=float(eps)) for eps in eps_values)
    return swept
