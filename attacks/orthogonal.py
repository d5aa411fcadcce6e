"""Orthogonal and Selective PGD (Bryniarski, Hingun, Pachuca, Wang and Carlini 2022, "Evading
Adversarial Example Detection Defenses with Orthogonal Projected Gradient Descent").

A weighted sum of the classifier's loss and the detector's score (`attacks.adaptive.AdaptivePGD`)
lets the two gradients fight: a step that fools the classifier raises the score, the next one undoes
it. These attacks take one objective at a time instead:

- Selective PGD: while the input is classified correctly (by a margin), step on the classifier's
  loss alone; once it is misclassified, step down the detector's score alone.
- Orthogonal PGD: the same, but each step first removes from its gradient the component along the
  other objective's gradient, so that the step on one objective does not undo the other (to first
  order). L-inf steps take the sign after the projection.

Both keep every iterate as a candidate: each input keeps the one that is misclassified and under
the threshold with the lowest score (the rank of `attacks.objectives.DetectorAware`), over
`restarts` starts: the first at the input itself, the others random (with `random_start`). With
`start="classifier_adversarial"` the first start is instead an APGD-CE example against the classifier
alone (`steps` iterations): the attack then only has to walk a misclassified point under the
threshold, which breaks inputs whose misclassified region is too small for the two objectives to
find together (on a PGD-trained digits classifier and an input detector, eps 0.3: the suite's worst
case fell from 29.2% to 28.3% guarded with this one attack added, at twice the suite's steps). On the
MNIST reference CNN and an input detector (eps 0.3, 40 steps, 200 test images) random first starts
left 26% of inputs handled, starts at the input 0-7%: noise of size eps is what the detector saw. Called on a `joint_model` (K logits, then the score), they run through
the engine's parts (`steepest_step`, `keep_better`, `over_restarts`) on TensorFlow and JAX, with
eps and the step size as runtime budgets.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from keras import ops

from attacks.adaptive import DETECTOR_TERMS, OnJointModel
from attacks.apgd import apgd_ascend
from attacks.engine import Plan, keep_better, over_restarts, steepest_step
from attacks.gradient_sign import GradientSignAttack
from attacks.norms import per_image, perturbation_norms, project
from attacks.objectives import CrossEntropy, DetectorAware, logit_margin
from foundation.backend import Forward, repeat, value_and_grad
from foundation.validation import Interval, Options

# an input counts as misclassified for the switch only past this logit margin, so that the
# detector's steps do not push it straight back over the decision boundary (as in the authors' code)
SWITCH_MARGIN = 0.05


def without_component(a: Any, b: Any) -> Any:
    """Per sample, `a` minus its projection onto `b` (flattened): the part of `a` orthogonal to `b`."""
    n = ops.shape(a)[0]
    flat_a, flat_b = ops.reshape(a, (n, -1)), ops.reshape(b, (n, -1))
    scale = ops.sum(flat_a * flat_b, axis=1) / (ops.sum(flat_b * flat_b, axis=1) + 1e-20)
    return a - per_image(scale) * b


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrthogonalPGD(OnJointModel, GradientSignAttack):
    """Orthogonal PGD on a `joint_model` (`SelectivePGD`: the same without the projections).

    eps, norm, steps, step_size / rel_stepsize (default 2.5 * eps / steps), random_start, restarts:
    as for PGD (runtime budgets as there), except that the first start is the input itself. threshold: the detector rejects scores above it.
    loss: the classifier's loss, "ce" (cross-entropy, the authors' choice), "margin" or "dlr".
    start: where the first start is, "input" (the authors' choice) or "classifier_adversarial" (an
    APGD-CE example against the classifier alone, which the detector then has to be walked past).
    start_steps: that APGD-CE's iterations (None: `steps`); the adaptive suite holds it fixed so that
    a longer run begins from the same point as a shorter one."""

    name = "orthogonal_pgd"
    budgets: ClassVar[tuple[str, ...]] = ("eps", "step_size", "rel_stepsize")
    _parameter_constraints = {**GradientSignAttack._parameter_constraints, **DETECTOR_TERMS,
                              "loss": [Options("ce", "margin", "dlr")], "start": [Options("input", "classifier_adversarial")],
                              "start_steps": [None, Interval(int, 1)]}
    threshold: float
    score_scale: float = 1.0
    steps: int = 100
    start: str = "input"
    start_steps: int | None = None
    selective: ClassVar[bool] = False
    momentum: float = dataclasses.field(default=0.0, init=False)
    early_stop: bool = dataclasses.field(default=False, init=False)

    def _objective(self) -> DetectorAware:
        # uncapped for the margin and DLR: the switch, not a cap, hands over to the detector
        return DetectorAware(self.threshold, self.score_scale, self.loss, float("inf"))

    def _plan(self) -> Plan:
        return dataclasses.replace(super()._plan(), keep_best=True)

    def _structure(self) -> tuple:
        return (*super()._structure(), self.start, self.start_steps)

    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool, *,
               eps: Any, step: Any, momentum: Any) -> tuple:
        plan, selective = self._plan(), self.selective
        objective, n = plan.objective, ops.shape(x)[0]
        radius, step = per_image(ops.cast(eps, x.dtype)), per_image(ops.cast(step, x.dtype))
        unweighted = ops.zeros((n,), x.dtype)

        def classifier_term(z: Any) -> tuple[Any, tuple]:
            """The classifier's loss, or (selective, once misclassified) minus the score; with the
            iterate's rank and shortfall, and whether it is misclassified past the margin."""
            outputs = ops.cast(forward(z), x.dtype)
            loss, rank, shortfall = objective.evaluate(outputs, y, targeted, None, unweighted)
            fooled = logit_margin(outputs[:, :-1], y, targeted) > SWITCH_MARGIN
            value = ops.where(fooled, -outputs[:, -1], loss) if selective else loss
            return value, (rank, shortfall, fooled)

        def score_term(z: Any) -> tuple[Any, Any]:
            score = ops.cast(forward(z), x.dtype)[:, -1]
            return -score, score

        def one_step(x_adv: Any, *best: Any) -> tuple:
            _, (rank, shortfall, fooled), grad = value_and_grad(classifier_term, x_adv)
            best = keep_better(best, x_adv, rank, shortfall)
            if not selective:
                _, _, lower = value_and_grad(score_term, x_adv)
                grad = ops.where(per_image(fooled), without_component(lower, grad), without_component(grad, lower))
            return (steepest_step(x, x_adv, grad, radius, step, plan.norm, plan.clip), *best)

        first = x
        if self.start == "classifier_adversarial":
            on_classifier = dataclasses.replace(plan, objective=CrossEntropy(), restarts=1,
                                                steps=self.start_steps or plan.steps)
            first, _ = apgd_ascend(lambda z: forward(z)[:, :-1], on_classifier, x, y, None, eps, None, targeted)

        def restart(r: Any, best: tuple) -> tuple:
            start = first
            if noise is not None:  # later restarts from random points (a random start alone invites the detector)
                moved = project(x, x + radius * ops.take(noise, r, axis=1), eps=radius, norm=plan.norm, clip=plan.clip)
                start = ops.where(r == 0, first, moved)
            last, *best = repeat(one_step, (start, *best), plan.steps)
            _, (rank, shortfall, _) = classifier_term(last)
            return keep_better(tuple(best), last, rank, shortfall)

        x_adv, success = over_restarts(restart, x, plan.restarts, objective.levels, stop_when_all_succeed=False)
        return (x_adv, success, *perturbation_norms(x, x_adv))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectivePGD(OrthogonalPGD):
    """Selective PGD: the classifier's loss while the input is classified correctly, else the
    detector's score, one at a time and without projections (one gradient per step)."""

    name = "selective_pgd"
    selective: ClassVar[bool] = True
