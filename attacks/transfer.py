"""Black-box attacks that need no gradient of the target: transfer from a surrogate, fooling images.

Transferability: adversarial examples crafted on a model the attacker owns (a surrogate trained on
the same data) often fool a different model the attacker cannot see. `transfer_attack` crafts on the
surrogate and measures the success on the target.

Fooling images: start from uniform noise and optimise until the model predicts a class, showing
that a classifier answers confidently on inputs that look like nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from attacks.base import Attack, AttackResult
from attacks.gradient_sign import BIM
from foundation.validation import check_model_input


@dataclasses.dataclass(frozen=True)
class TransferResult:
    """What the surrogate attack produced, and which of its images fool the target."""

    crafted: AttackResult
    target_success: np.ndarray

    @property
    def success_rate(self) -> float:
        """Fraction of all inputs whose adversarial image fools the target."""
        return float(self.target_success.mean())

    @property
    def transfer_rate(self) -> float:
        """Fraction of the surrogate's successes that also fool the target."""
        fooled_surrogate = self.crafted.success
        return float(self.target_success[fooled_surrogate].mean()) if fooled_surrogate.any() else 0.0


def fools(model: keras.Model, x_adv: np.ndarray, y: np.ndarray, targets: np.ndarray | None, batch_size: int) -> np.ndarray:
    """Whether `model` misclassifies each image (or, with `targets`, predicts its target)."""
    predicted = np.argmax(model.predict(x_adv, batch_size=batch_size, verbose=0), axis=-1)
    return predicted == targets if targets is not None else predicted != y


def transfer_attack(
    attack: Attack,
    surrogate: keras.Model,
    target: keras.Model,
    x: Any,
    y: Any,
    *,
    targets: Any = None,
    batch_size: int = 256,
    progress: bool = False,
) -> TransferResult:
    """Craft adversarial examples on `surrogate` with `attack`, then test them on `target`."""
    crafted = attack(surrogate, x, y, targets=targets, batch_size=batch_size, progress=progress)
    check_model_input(target, crafted.x_adv)
    return TransferResult(crafted, fools(target, crafted.x_adv, np.asarray(y), crafted.targets, batch_size))


def fooling_images(
    model: keras.Model,
    n: int,
    *,
    targets: Any = None,
    attack: Attack | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> AttackResult:
    """`n` images optimised from uniform noise until the model predicts `targets` (targeted-from-
    noise; an array or "random") or anything other than what it predicted on the noise (untargeted).

    The default attack is BIM over the whole clip range (eps = range width, 50 steps of 0.01):
    the result need not stay near the noise, only fool the model.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shape = tuple(model.input_shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"fooling images need a model with a fixed input shape, got {shape}")
    attack = attack or BIM(eps=1.0, steps=50, step_size=0.01)
    low, high = attack.clip
    noise = np.random.default_rng(seed).uniform(low, high, (n, *shape)).astype(np.float32)
    predicted = np.argmax(model.predict(noise, batch_size=batch_size, verbose=0), axis=-1)
    return attack(model, noise, predicted, targets=targets, batch_size=batch_size)
