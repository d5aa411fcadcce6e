"""The attacker who knows the detector: for each L-p budget (eps, norm) among the evaluated gradient
attacks, `AdaptivePGD` runs on the classifier joined to a differentiable stand-in of the detector
(`detector.differentiable`), and the real detector judges the result.

A detector whose guarded accuracy under this attack stays within `masking_margin` of its accuracy
under the strongest non-adaptive attack at the same budget is flagged (`gradient_masking_check`):
an attack that knows the detector should do clearly better, so either the detector is robust there
or the attack's gradients are masked; a sceptic checks before believing the number. The adaptive
attack is untargeted (any misclassification that gets through counts), also when the evaluated
attacks are targeted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from attacks.adaptive import AdaptivePGD, joint_model
from attacks.base import Attack, AttackResult, check_integer
from detector.base import Detector
from detector.differentiable import stand_in
from detector.metrics import attack_row, flagged


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings:
    """steps: PGD steps per lambda. lambdas: weights of the detector term, swept.
    loss: the classifier term, "margin" (C&W logit margin), "dlr" or "ce" (see `attacks.adaptive`).
    max_inputs: the adaptive attack runs on the first this many inputs (None: all); the
        non-adaptive guarded accuracy it is compared with is taken on the same inputs.
    surrogate_epochs: training of a surrogate stand-in, when one is needed.
    masking_margin: adaptive guarded accuracy within this of the non-adaptive one is flagged."""

    steps: int = 40
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0)
    loss: str = "margin"
    max_inputs: int | None = 1000
    surrogate_epochs: int = 10
    masking_margin: float = 0.05

    def __post_init__(self) -> None:
        check_integer("adaptive steps", self.steps)
        check_integer("surrogate_epochs", self.surrogate_epochs)
        if self.max_inputs is not None:
            check_integer("adaptive max_inputs", self.max_inputs)
        lambdas = tuple(float(v) for v in self.lambdas)
        if not lambdas or any(not np.isfinite(v) or v < 0 for v in lambdas):
            raise ValueError(f"lambdas must be one or more finite numbers >= 0, got {list(self.lambdas)}")
        object.__setattr__(self, "lambdas", lambdas)
        if self.loss not in ("margin", "ce", "dlr"):
            raise ValueError(f"the adaptive loss must be 'margin', 'ce' or 'dlr', got {self.loss!r}")
        if not 0.0 <= self.masking_margin < 1.0:
            raise ValueError(f"masking_margin must lie in [0, 1), got {self.masking_margin}")


DEFAULT_ADAPTIVE = AdaptiveSettings()
FIT_IMAGES = 6000  # at most this many clean and adversarial images train a surrogate and check the stand-in


def budgets(attacks: Sequence[Attack]) -> list[Attack]:
    """The first attack of each distinct (eps > 0, norm) among those that have both."""
    seen: dict[tuple[float, str], Attack] = {}
    for attack in attacks:
        eps, norm = getattr(attack, "eps", None), getattr(attack, "norm", None)
        if isinstance(norm, str) and isinstance(eps, (int, float)) and eps > 0:
            seen.setdefault((float(eps), norm), attack)
    return list(seen.values())


def _key(attack: Attack) -> str:
    return f"adaptive_pgd@eps={attack.eps:g}" + ("" if attack.norm == "inf" else f",norm={attack.norm}")


def _masking_note(row: dict[str, Any], baseline_key: str, method: str, margin: float) -> str:
    return (
        f"Guarded accuracy under the adaptive attack ({row['guarded_accuracy']:.3f}) is within "
        f"{margin * 100:g} points of the strongest non-adaptive attack at this budget ({baseline_key}: "
        f"{row['non_adaptive_guarded_accuracy']:.3f}). An attacker who knows the detector should do clearly "
        f"better: either the detector is robust here, or gradients through it (stand-in: {method}) are "
        "masked. Check with more steps, larger lambdas, a surrogate stand-in and transfer attacks."
    )


def evaluate_adaptive(
    classifier: keras.Model,
    detector: Detector,
    x: np.ndarray,
    y: np.ndarray,
    keyed: dict[str, tuple[Attack, AttackResult]],
    handled: dict[str, np.ndarray],
    clean_scores: np.ndarray,
    settings: AdaptiveSettings,
    *,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The report's "adaptive" section and its curves; (None, {}) when no attack has an L-p budget.

    `keyed` maps the non-adaptive report keys to (attack, result); `handled` to whether each input
    was rejected or still classified correctly under that attack."""
    chosen = budgets([attack for attack, _ in keyed.values()])
    if not chosen:
        return None, {}
    threshold = detector.threshold
    parts = [x, *(result.x_adv for _, result in keyed.values())]
    per_part = max(1, FIT_IMAGES // len(parts))  # clean and each attack's images in equal shares
    rows_of = [np.sort(np.random.default_rng([seed, i]).permutation(len(p))[:per_part]) for i, p in enumerate(parts)]
    x_fit = np.concatenate([p[r] for p, r in zip(parts, rows_of, strict=True)])
    standin = stand_in(detector, x_fit, surrogate_epochs=settings.surrogate_epochs, seed=seed)
    real = np.asarray(detector.score(x_fit), np.float64)
    approximate = np.asarray(standin.model.predict(x_fit, batch_size=batch_size, verbose=0), np.float64).reshape(-1)
    spread = float(np.std(clean_scores[np.isfinite(clean_scores)])) if np.isfinite(clean_scores).any() else 1.0
    joint = joint_model(classifier, standin.model)
    section: dict[str, Any] = {
        "stand_in": {"method": standin.method, "n_checked": len(x_fit),
                     "decision_agreement": float(np.mean(flagged(real, threshold) == flagged(approximate, threshold)))},
        "settings": dataclasses.asdict(settings) | {"lambdas": list(settings.lambdas)},
        "attacks": {},
    }
    curves = {}
    count = len(x) if settings.max_inputs is None else min(settings.max_inputs, len(x))
    x, y = x[:count], y[:count]
    for template in chosen:
        attack = AdaptivePGD(eps=template.eps, norm=template.norm, threshold=threshold, score_scale=spread if spread > 0 else 1.0,
                             lambdas=settings.lambdas, steps=settings.steps, loss=settings.loss, clip=template.clip,
                             seed=template.seed)
        result = attack(joint, x, y, batch_size=batch_size, progress=progress)
        predicted = np.argmax(classifier.predict(result.x_adv, batch_size=batch_size, verbose=0), axis=-1)
        scores = detector.score(result.x_adv)
        key = _key(attack)
        row, curves[key] = attack_row(clean_scores, threshold, scores, result, predicted != y)
        same = [k for k, (a, _) in keyed.items() if getattr(a, "eps", None) == template.eps and getattr(a, "norm", None) == template.norm]
        baseline = min(same, key=lambda k: handled[k][:count].mean())  # the strongest on the same inputs
        row |= {
            "eps": attack.eps, "norm": attack.norm, "n": count, "params": attack.params(),
            "non_adaptive_attack": baseline,
            "non_adaptive_guarded_accuracy": float(handled[baseline][:count].mean()),
        }
        row["guarded_accuracy_drop"] = row["non_adaptive_guarded_accuracy"] - row["guarded_accuracy"]
        row["worst_case_guarded_accuracy"] = min(row["non_adaptive_guarded_accuracy"], row["guarded_accuracy"])
        row["gradient_masking_check"] = bool(row["guarded_accuracy_drop"] < settings.masking_margin)
        if row["gradient_masking_check"]:
            row["note"] = _masking_note(row, baseline, standin.method, settings.masking_margin)
        section["attacks"][key] = row
    return section, curves
