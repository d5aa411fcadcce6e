"""The attacker who knows the detector: for each L-p budget (eps, norm) among the evaluated gradient
attacks, a suite of adaptive attacks runs on the classifier joined to a differentiable stand-in of
the detector (`detector.differentiable`: the score itself, BPDA, or a surrogate), and the real
detector and classifier judge every result. The suite (`SUITE`):

- `adaptive_pgd`: PGD on the classifier's loss minus lambda x the detector's margin, swept over
  lambda (Carlini & Wagner 2017; `attacks.adaptive.AdaptivePGD`);
- `apgd_ce`, `apgd_dlr`: APGD-CE and APGD-DLR (Croce & Hein 2020) on the joint objective
  min(classifier margin, lambda x detector margin), random restarts per lambda (`AdaptiveAPGD`);
- `apgd_dlr_targeted`: the same APGD-DLR targeted at each of the classifier's `target_classes`
  most likely other classes in turn (an input broken for one target is not attacked again);
- `orthogonal_pgd`, `selective_pgd`: Bryniarski et al. 2022 (`attacks.orthogonal`), one objective
  at a time, the other's gradient projected out (orthogonal) or not (selective);
- `orthogonal_pgd_warm`: Orthogonal PGD whose first start is an APGD-CE example against the
  classifier alone, so that only the detector is left to evade; twice the steps, since that start
  lies deep in the detector's region (with `steps` it left 9% guarded on the broken MNIST defence).

The report's adaptive row per budget, `adaptive_worst_case@eps=...`, is the worst case per input
over the suite and the evaluated (detector-unaware) attacks at the same budget: an input counts as broken when any attack found a point within the budget that the
real classifier misclassifies and the real detector lets through; its example is the one that
evades with the lowest score. Beside it, each attack's own guarded accuracy, its parameters and how
many inputs it won (broke, with the lowest score among the attacks that broke it).

More steps or restarts never find less with the four PGD-family attacks (adaptive, Orthogonal,
Selective, warm): past `BASE_STEPS` they keep the default's step (2.5 eps / 60; the warm attack's
2.5 eps / 120 from the same 120-iteration APGD-CE start), so a longer run repeats the default run's
iterates first and keeps the best of all. With the step shrinking as 2.5 eps / steps instead, 200
steps x 3 restarts left 94.5% of 200 MNIST inputs guarded against a PGD-trained guard where the
default left 93.0%: the small steps settled where the default's larger ones walked past the detector
(docs/benchmarks.md). APGD's step schedule is its own and scales with its steps.

A detector whose worst-case guarded accuracy stays within `masking_margin` of its accuracy under
the strongest non-adaptive attack at the same budget is flagged (`gradient_masking_check`): either
the detector is robust there or the attacks' gradients are masked; a sceptic checks before believing
the number. The attacks are untargeted in what they count (any misclassification that gets through),
also when the evaluated attacks are targeted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable

import keras
import numpy as np

from attacks.adaptive import AdaptiveAPGD, AdaptivePGD, joint_model
from attacks.base import Attack, AttackResult
from attacks.orthogonal import OrthogonalPGD, SelectivePGD
from detector.base import Detector
from detector.adaptive_outcomes import Checkpoints, Outcome, judge, targeted, worst_case
from detector.differentiable import stand_in
from detector.metrics import attack_row, flagged
from foundation.validation import check_integer

BASE_STEPS = 60  # the default steps; more keep this step size (see the module docstring)
SUITE = ("adaptive_pgd", "apgd_ce", "apgd_dlr", "apgd_dlr_targeted", "orthogonal_pgd", "orthogonal_pgd_warm", "selective_pgd")


def _weights(name: str, values: Sequence[float]) -> tuple[float, ...]:
    weights = tuple(float(v) for v in values)
    if not weights or any(not np.isfinite(v) or v < 0 for v in weights):
        raise ValueError(f"{name} must be one or more finite numbers >= 0, got {list(values)}")
    return weights


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings:
    """steps: iterations of each attack of the suite (per lambda and restart).
    lambdas: weights of the detector term swept by adaptive_pgd. loss: its classifier term,
        "margin" (C&W logit margin), "dlr" or "ce" (see `attacks.adaptive`).
    apgd_lambdas: weights of the detector margin in APGD's joint objective, each with `restarts`
        random starts. restarts: starts of the APGD, orthogonal and selective attacks (orthogonal and
        selective start at the input first, then at random points).
    target_classes: how many of the classifier's most likely other classes apgd_dlr_targeted aims at.
    suite: which attacks run (a subset of `SUITE`, in that order).
    max_inputs: the attacks run on the first this many inputs (None: all); the non-adaptive guarded
        accuracy they are compared with is taken on the same inputs.
    surrogate_epochs: training of a surrogate stand-in, when one is needed.
    masking_margin: worst-case guarded accuracy within this of the non-adaptive one is flagged."""

    steps: int = BASE_STEPS
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0)
    loss: str = "margin"
    apgd_lambdas: tuple[float, ...] = (0.1, 1.0)
    restarts: int = 1
    target_classes: int = 9
    suite: tuple[str, ...] = SUITE
    max_inputs: int | None = 1000
    surrogate_epochs: int = 10
    masking_margin: float = 0.05

    def __post_init__(self) -> None:
        check_integer("adaptive steps", self.steps)
        check_integer("adaptive restarts", self.restarts)
        check_integer("target_classes", self.target_classes)
        check_integer("surrogate_epochs", self.surrogate_epochs)
        if self.max_inputs is not None:
            check_integer("adaptive max_inputs", self.max_inputs)
        object.__setattr__(self, "lambdas", _weights("lambdas", self.lambdas))
        object.__setattr__(self, "apgd_lambdas", _weights("apgd_lambdas", self.apgd_lambdas))
        if self.loss not in ("margin", "ce", "dlr"):
            raise ValueError(f"the adaptive loss must be 'margin', 'ce' or 'dlr', got {self.loss!r}")
        suite = tuple(self.suite) if not isinstance(self.suite, str) else (self.suite,)
        unknown = sorted(set(suite) - set(SUITE))
        if not suite or unknown:
            raise ValueError(f"the adaptive suite must be one or more of {list(SUITE)}, got {list(suite)}")
        object.__setattr__(self, "suite", tuple(name for name in SUITE if name in suite))
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
    return f"adaptive_worst_case@eps={attack.eps:g}" + ("" if attack.norm == "inf" else f",norm={attack.norm}")


def suite(template: Attack, settings: AdaptiveSettings, threshold: float, score_scale: float) -> dict[str, Attack]:
    """The adaptive attacks of `settings.suite` at the budget (eps, norm, clip, seed) of `template`."""
    common = {"eps": template.eps, "norm": template.norm, "threshold": threshold, "score_scale": score_scale,
              "clip": template.clip, "seed": template.seed, "steps": settings.steps}
    again = {"restarts": settings.restarts}
    apgd = again | {"lambdas": settings.apgd_lambdas}
    base = min(settings.steps, BASE_STEPS)  # more steps walk on at the default's step (module docstring)
    fixed = {"rel_stepsize": 2.5 / base}
    pgd = common | fixed | again | {"random_start": settings.restarts > 1}
    warm = pgd | {"steps": 2 * settings.steps, "rel_stepsize": 2.5 / (2 * base), "start_steps": 2 * base}  # from deep
    every = {
        "adaptive_pgd": lambda: AdaptivePGD(**common | fixed, lambdas=settings.lambdas, loss=settings.loss),
        "apgd_ce": lambda: AdaptiveAPGD(**common, **apgd, loss="ce"),
        "apgd_dlr": lambda: AdaptiveAPGD(**common, **apgd, loss="dlr"),
        "apgd_dlr_targeted": lambda: AdaptiveAPGD(**common, **apgd, loss="dlr"),
        "orthogonal_pgd": lambda: OrthogonalPGD(**pgd),
        "orthogonal_pgd_warm": lambda: OrthogonalPGD(**warm, start="classifier_adversarial"),
        "selective_pgd": lambda: SelectivePGD(**pgd),
    }
    return {name: every[name]() for name in settings.suite}


def _masking_note(row: dict[str, Any], baseline_key: str, method: str, margin: float) -> str:
    return (
        f"Worst-case guarded accuracy under the adaptive attacks ({row['guarded_accuracy']:.3f}) is within "
        f"{margin * 100:g} points of the strongest non-adaptive attack at this budget ({baseline_key}: "
        f"{row['non_adaptive_guarded_accuracy']:.3f}). An attacker who knows the detector should do clearly "
        f"better: either the detector is robust here, or gradients through it (stand-in: {method}) are "
        "masked. Check with more steps and restarts, a surrogate stand-in and transfer attacks."
    )


def _suite_row(attack: Attack, outcome: Outcome, won: int, targets: int | None) -> dict[str, Any]:
    """One attack's own figures within a worst-case row."""
    params = attack.get_params()
    plan = getattr(attack, "_plan", None)
    row = {"guarded_accuracy": float(np.mean(~outcome.broken)), "success_rate": float(np.mean(outcome.broken)),
           "won": won, "steps": params.get("steps"), "restarts": plan().restarts if plan else params.get("restarts", 1),
           "params": params}
    return row if targets is None else row | {"target_classes": targets}


def evaluate_adaptive(
    classifier: keras.Model,
    detector: Detector,
    x: np.ndarray,
    y: np.ndarray,
    keyed: dict[str, tuple[Attack, AttackResult]],
    handled: dict[str, np.ndarray],
    clean_scores: np.ndarray,
    clean_correct: np.ndarray,
    settings: AdaptiveSettings,
    *,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    checkpoints: Checkpoints | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The report's "adaptive" section and its curves; (None, {}) when no attack has an L-p budget.

    `keyed` maps the non-adaptive report keys to (attack, result); `handled` to whether each input
    was rejected or still classified correctly under that attack; `clean_correct` whether the
    classifier gets each clean input right; `checkpoints`, where finished attacks are kept for a
    resumed run."""
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
        "settings": jsonable_settings(settings),
        "attacks": {},
    }
    curves = {}
    count = len(x) if settings.max_inputs is None else min(settings.max_inputs, len(x))
    x, y = x[:count], y[:count]
    for template in chosen:
        attacks, key = suite(template, settings, threshold, spread if spread > 0 else 1.0), _key(template)
        outcomes: dict[str, Outcome] = {}
        tried: dict[str, int] = {}
        for name, attack in attacks.items():
            store = _store(checkpoints, key, [attack.get_params(), jsonable_settings(settings), standin.method])
            if name == "apgd_dlr_targeted":
                outcome, tried[name] = store(name, lambda: targeted(
                    attack, classifier, detector, joint, x, y, settings.target_classes, batch_size, progress,
                    keep=lambda rank, run: store(f"{name}-target{rank + 1}", lambda: (run(), rank + 1))[0]))
            else:
                outcome, _ = store(name, lambda: (judge(classifier, detector, attack(joint, x, y, batch_size=batch_size,
                                                                                      progress=progress), y, batch_size), 0))
            if outcome is not None:
                outcomes[name] = outcome
        if not outcomes:
            raise ValueError("the adaptive suite holds only apgd_dlr_targeted, which needs 4 or more classes")
        same = [k for k, (a, _) in keyed.items() if getattr(a, "eps", None) == template.eps and getattr(a, "norm", None) == template.norm]
        for name in same:  # the evaluated attacks at this budget join the worst case per input: an example
            attack, result = keyed[name]  # made without the detector that gets through counts the same
            attacks[name] = attack
            outcomes[name] = judge(classifier, detector, AttackResult(result.x_adv[:count], result.success[:count],
                                                                      result.linf[:count], result.l2[:count]), y, batch_size)
        choice, kept = worst_case(outcomes)
        names = list(outcomes)
        won = np.bincount(choice[kept.broken], minlength=len(names))
        result = AttackResult(kept.x_adv, kept.broken, kept.linf, kept.l2)
        row, curves[key] = attack_row(clean_scores, threshold, kept.scores, result, kept.misclassified, clean_correct[:count])
        baseline = min(same, key=lambda k: handled[k][:count].mean())  # the strongest on the same inputs
        row |= {
            "eps": template.eps, "norm": template.norm, "n": count,
            "params": {"attack": "adaptive_worst_case", "eps": template.eps, "norm": template.norm,
                       "steps": settings.steps, "restarts": settings.restarts,
                       "suite": [attacks[name].name if name in same else name for name in names]},
            "suite": {name: _suite_row(attacks[name], outcomes[name], int(won[i]), tried.get(name))
                      for i, name in enumerate(names)},
            "strongest": max(names, key=lambda name: outcomes[name].broken.mean()),  # the lowest guarded accuracy
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


def _store(checkpoints: Checkpoints | None, key: str, params: Any) -> Callable[[str, Callable[[], Any]], Any]:
    """`store(label, run)`: `run()`, kept in `checkpoints` (when given) under the budget's key and
    `label` for the attack's `params`."""
    if checkpoints is None:
        return lambda label, run: run()
    return lambda label, run: checkpoints.outcome(f"{key}-{label}", params, run)


def jsonable_settings(settings: AdaptiveSettings) -> dict[str, Any]:
    """The settings as the report records them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
