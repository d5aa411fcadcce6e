"""The gradient-sign family on the one engine (`attacks.engine`): FGSM (one step), BIM / I-FGSM,
PGD, MI-FGSM, in L-inf or L2, untargeted or targeted, with any objective (`attacks.objectives`).

eps, the step size and the momentum are runtime budgets: the attack object holds defaults, a call
may override them (`PGD(eps=0.3)(model, x, y, eps=0.1)`, or one value per input), and the compiled
loop is shared by every value.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from keras import ops

from attacks.base import Attack, per_sample
from attacks.engine import Plan, ascend, unit_noise
from attacks.norms import NORM, perturbation_norms
from attacks.objectives import CrossEntropy, DifferenceOfLogitsRatio, Margin, Objective
from foundation.backend import Forward
from foundation.validation import BOOLEAN, InstanceOf, Interval, Options, param_error

LOSSES = {"ce": CrossEntropy(), "margin": Margin(), "dlr": DifferenceOfLogitsRatio()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientSignAttack(Attack):
    """Iterative gradient attack with L-inf or L2 projection (the engine behind FGSM, BIM and PGD).

    eps: radius of the allowed perturbation in the chosen norm.
    eps_min: when set, each input's radius is drawn log-uniformly from [eps_min, eps] (from its own
        generator: seed and index), so a dataset also holds perturbations far below the budget; a
        detector fitted on it sees small L2 attacks too (docs/benchmarks.md). A call's eps replaces
        the draw. Datasets only: adversarial training ramps eps with its warm-up instead.
    steps: gradient steps. step_size: the absolute per-step move; or rel_stepsize, the move as a
        fraction of eps (Foolbox's rel_stepsize), which follows eps when a call changes it.
        Default: rel_stepsize 2.5 / steps (Madry et al.).
    random_start: begin at a uniform random point of the eps-ball (PGD) instead of the input.
    restarts: independent random starts; each input keeps its best (first successful, else
        highest-loss) result. Needs random_start.
    momentum: decay of the accumulated L1-normalised gradient (MI-FGSM, Dong et al. 2018); 0 = off.
    early_stop: a sample that already fools the model stops changing; the loop ends when all do.
    loss: what the steps maximise: "ce" (cross-entropy), "margin" (C&W logit margin), "dlr"
        (Croce & Hein's scale-invariant Difference of Logits Ratio) or an
        `attacks.objectives.Objective` of your own.
    """

    name = "gradient_sign"
    budgets: ClassVar[tuple[str, ...]] = ("eps", "step_size", "rel_stepsize", "momentum")
    _parameter_constraints = {
        **Attack._parameter_constraints,
        "eps": [Interval(float, 0)],
        "eps_min": [None, Interval(float, 0, closed="neither")],
        "norm": [NORM],
        "steps": [Interval(int, 1)],
        "step_size": [None, Interval(float, 0)],
        "rel_stepsize": [None, Interval(float, 0)],
        "random_start": [BOOLEAN],
        "restarts": [Interval(int, 1)],
        "momentum": [Interval(float, 0)],
        "early_stop": [BOOLEAN],
        "loss": [Options(*LOSSES), InstanceOf(Objective, "an Objective")],
    }
    eps: float
    eps_min: float | None = None
    norm: str = "inf"
    steps: int = 10
    step_size: float | None = None
    rel_stepsize: float | None = None
    random_start: bool = False
    restarts: int = 1
    momentum: float = 0.0
    early_stop: bool = False
    loss: str | Objective = "ce"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_eps_range(np.array([self.eps]))
        if self.restarts > 1 and not self.random_start:
            raise param_error(type(self).__name__, "restarts", "1 without random_start (every restart would be identical)",
                              self.restarts)
        if self.step_size is not None and self.rel_stepsize is not None:
            raise ValueError("give step_size (absolute) or rel_stepsize (a fraction of eps), not both")
        if self.eps_min is not None and self.eps_min > self.eps:
            raise param_error(type(self).__name__, "eps_min", f"at most eps ({self.eps:.6g})", self.eps_min)

    def _check_eps_range(self, eps: np.ndarray) -> None:
        """An L-inf eps beyond the clip range's width is a mistake (every pixel could go anywhere)."""
        width = self.clip[1] - self.clip[0]
        if self.norm == "inf" and (eps > width).any():
            raise ValueError(f"{type(self).__name__}: eps must lie in [0, {width}] for L-inf (the clip range's width), "
                             f"got {eps.max():.6g}")

    def relative_step(self) -> float | None:
        """The step as a fraction of eps (None when the step is absolute): rel_stepsize, by default 2.5 / steps."""
        if self.step_size is not None:
            return None
        return 2.5 / self.steps if self.rel_stepsize is None else self.rel_stepsize

    def _objective(self) -> Objective:
        return self.loss if isinstance(self.loss, Objective) else LOSSES[self.loss]

    def _plan(self) -> Plan:
        return Plan(self._objective(), norm=self.norm, steps=self.steps, restarts=self.restarts,
                    early_stop=self.early_stop, clip=self.clip)

    def _structure(self) -> tuple:
        return (type(self), self._plan(), self.random_start)

    def _eps(self, index: np.ndarray) -> np.ndarray | float:
        """Each input's radius: eps, or with eps_min one log-uniform draw per input."""
        if self.eps_min is None:
            return self.eps
        low, high = np.log(self.eps_min), np.log(self.eps)
        return np.exp([self.input_rng(key, purpose=2).uniform(low, high) for key in index])

    def _budget(self, index: np.ndarray, overrides: dict[str, Any]) -> dict[str, np.ndarray]:
        n = len(index)
        unknown = sorted(set(overrides) - set(self.budgets))
        if unknown:
            raise ValueError(f"{self.name} takes no call-time budget {unknown}; it takes {list(self.budgets)}")
        if "step_size" in overrides and "rel_stepsize" in overrides:
            raise ValueError("give step_size (absolute) or rel_stepsize (a fraction of eps), not both")
        eps = per_sample("eps", overrides["eps"] if "eps" in overrides else self._eps(index), n)
        self._check_eps_range(eps)
        step_size, rel = self.step_size, self.relative_step()
        if "step_size" in overrides:
            step_size, rel = overrides["step_size"], None
        elif "rel_stepsize" in overrides:
            step_size, rel = None, overrides["rel_stepsize"]
        step = per_sample("step_size", step_size, n) if step_size is not None else per_sample("rel_stepsize", rel, n) * eps
        return {"eps": eps, "step": step, "momentum": per_sample("momentum", overrides.get("momentum", self.momentum), n)}

    def get_params(self) -> dict[str, Any]:
        """As `Attack.get_params`, with the effective relative step (so a report shows the step
        taken: eps times rel_stepsize)."""
        values = super().get_params()
        if "rel_stepsize" in values:
            values["rel_stepsize"] = self.relative_step()
        return values

    def _batch_noise(self, shape: tuple[int, ...], index: np.ndarray) -> np.ndarray | None:
        """(batch, restarts, H, W, C) random starts in the unit ball, per input from (seed, index);
        the engine scales them by each input's eps."""
        if not self.random_start:
            return None
        restarts = self._plan().restarts
        noise = np.zeros((shape[0], restarts, *shape[1:]), np.float32)
        for row, key in enumerate(index):
            rng = self.input_rng(key)
            for restart in range(restarts):
                noise[row, restart] = unit_noise(rng, shape[1:], self.norm)
        return noise

    def perturb_batch(self, forward: Forward, x: Any, y: Any, noise: Any = None, *, scale: Any = 1.0,
                      objective: Objective | None = None) -> Any:
        """The attack on one batch inside a compiled function (adversarial training's step): eps and
        the step scaled by `scale` (eps warm-up; a tensor), `noise` unit random starts or None, and
        optionally another objective (TRADES). Untargeted; returns x_adv."""
        plan = self._plan() if objective is None else dataclasses.replace(self._plan(), objective=objective)
        ones = ops.ones((ops.shape(x)[0],), x.dtype)
        step = self.step_size if self.step_size is not None else self.relative_step() * self.eps
        return ascend(forward, plan, x, y, noise, ones * scale * self.eps, ones * scale * step, ones * self.momentum,
                      None, False)[0]

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool, *,
               eps: Any, step: Any, momentum: Any) -> tuple:
        x_adv, success = ascend(forward, self._plan(), x, y, noise, eps, step, momentum, None, targeted)
        return (x_adv, success, *perturbation_norms(x, x_adv))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FGSM(GradientSignAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size eps."""

    name = "fgsm"
    steps: int = dataclasses.field(default=1, init=False)
    step_size: float | None = dataclasses.field(default=None, init=False)
    rel_stepsize: float | None = dataclasses.field(default=1.0, init=False)
    random_start: bool = dataclasses.field(default=False, init=False)
    restarts: int = dataclasses.field(default=1, init=False)
    momentum: float = dataclasses.field(default=0.0, init=False)
    early_stop: bool = dataclasses.field(default=False, init=False)
    budgets: ClassVar[tuple[str, ...]] = ("eps",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BIM(GradientSignAttack):
    """Basic Iterative Method / I-FGSM (Kurakin et al. 2017): iterated FGSM from the input."""

    name = "bim"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PGD(GradientSignAttack):
    """Projected Gradient Descent (Madry et al. 2018): BIM from a random point of the eps-ball."""

    name = "pgd"
    random_start: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class MIFGSM(GradientSignAttack):
    """Momentum Iterative FGSM (Dong et al. 2018): BIM whose steps follow accumulated gradients,
    which transfers better to models the attacker cannot see."""

    name = "mifgsm"
    momentum: float = 1.0
