"""The adaptive suite's examples judged by the real classifier and detector: one attack's outcome per
input, the targeted attack run target by target, and the worst case per input over the attacks.

An input is broken when the real classifier misclassifies the example and the real detector lets
it through; among the attacks that broke it, the example with the lowest score is kept.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np

from attacks.base import Attack, AttackResult
from detector.base import Detector
from detector.metrics import flagged

FIELDS = ("x_adv", "linf", "l2", "misclassified", "scores", "rejected")


@dataclasses.dataclass
class Outcome:
    """One attack's examples on every input, judged by the real classifier and detector."""

    x_adv: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    misclassified: np.ndarray
    scores: np.ndarray
    rejected: np.ndarray

    @property
    def broken(self) -> np.ndarray:
        """Misclassified and let through by the detector."""
        return self.misclassified & ~self.rejected


def judge(classifier: keras.Model, detector: Detector, result: AttackResult, y: np.ndarray, batch_size: int) -> Outcome:
    """An attack's result as the real classifier (against the labels `y`) and detector see it."""
    predicted = np.argmax(classifier.predict(result.x_adv, batch_size=batch_size, verbose=0), axis=-1)
    scores = np.asarray(detector.score(result.x_adv), np.float64)
    return Outcome(np.asarray(result.x_adv), np.asarray(result.linf), np.asarray(result.l2), predicted != y, scores,
                   flagged(scores, detector.threshold))


def targeted(attack: Attack, classifier: keras.Model, detector: Detector, joint: keras.Model, x: np.ndarray,
             y: np.ndarray, count: int, batch_size: int, progress: bool) -> tuple[Outcome | None, int]:
    """Targeted runs at each input's `count` most likely other classes in turn, each on the inputs
    no earlier target broke, and how many targets ran; (None, 0) for fewer than 4 classes (targeted
    DLR needs 4)."""
    logits = classifier.predict(x, batch_size=batch_size, verbose=0)
    classes = logits.shape[-1]
    if classes < 4:
        return None, 0
    order = np.argsort(-logits, axis=-1, kind="stable")
    others = np.stack([row[row != label] for row, label in zip(order, y, strict=True)])
    outcome, tried = None, 0
    for rank in range(min(count, classes - 1)):
        rows = np.arange(len(x)) if outcome is None else np.flatnonzero(~outcome.broken)
        if not len(rows):
            break
        result = attack(joint, x[rows], y[rows], targets=others[rows, rank], index=rows, batch_size=batch_size,
                        progress=progress)
        judged, tried = judge(classifier, detector, result, y[rows], batch_size), rank + 1
        if outcome is None:
            outcome = judged
            continue
        for name in FIELDS:
            getattr(outcome, name)[rows[judged.broken]] = getattr(judged, name)[judged.broken]
    return outcome, tried


def worst_case(outcomes: dict[str, Outcome]) -> tuple[np.ndarray, Outcome]:
    """Per input, which attack's example is kept (an index into `outcomes`): among those that broke
    it, the one with the lowest score; where none did, the lowest score of all."""
    names = list(outcomes)
    broken = np.stack([outcomes[k].broken for k in names])
    scores = np.stack([np.nan_to_num(outcomes[k].scores, nan=np.inf) for k in names])
    choice = np.lexsort((scores, ~broken), axis=0)[0]  # broken first, then the lowest score
    rows = np.arange(broken.shape[1])
    return choice, Outcome(*(np.stack([getattr(outcomes[k], f) for k in names])[choice, rows] for f in FIELDS))
