"""The adaptive suite's examples judged by the real classifier and detector: one attack's outcome per
input, the targeted attack run target by target, and the worst case per input over the attacks.

An input is broken when the real classifier misclassifies the example and the real detector lets
it through; among the attacks that broke it, the example with the lowest score is kept. With
`Checkpoints`, each attack's outcome (and each target of the targeted one) is stored once it has run,
so an interrupted evaluation resumes at the attack or target it was running (random starts depend only on the seed and each input's index, so the
resumed run finds what the uninterrupted one would have).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from attacks.base import Attack, AttackResult
from detector.base import Detector
from detector.metrics import flagged
from foundation.storage import atomic_write

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


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Where an adaptive evaluation stores each finished attack's outcome; `identity` names what
    they belong to (classifier, detector, inputs, seed): an outcome is reused only for the same
    identity and the same attack settings."""

    directory: Path
    identity: str

    def outcome(self, name: str, settings: Any, run: Callable[[], tuple[Outcome | None, int]]) -> tuple[Outcome | None, int]:
        """`run()` (an outcome, or None, and how many targets ran), or what an earlier run with the
        same identity and `settings` (JSON-able) stored under `name`; stored once run."""
        digest = hashlib.sha256(json.dumps([self.identity, settings], sort_keys=True, default=str).encode()).hexdigest()
        path = self.directory / f"{name}.npz"
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["identity"]) == digest:
                    found = Outcome(*(stored[field] for field in FIELDS)) if bool(stored["found"]) else None
                    return found, int(stored["tried"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # none yet, or unreadable: the attack runs (again)
        found, tried = run()
        arrays = {} if found is None else {field: getattr(found, field) for field in FIELDS}
        atomic_write(path, lambda temp: np.savez(temp, identity=digest, found=found is not None, tried=tried, **arrays))
        return found, tried


def judge(classifier: keras.Model, detector: Detector, result: AttackResult, y: np.ndarray, batch_size: int) -> Outcome:
    """An attack's result as the real classifier (against the labels `y`) and detector see it."""
    predicted = np.argmax(classifier.predict(result.x_adv, batch_size=batch_size, verbose=0), axis=-1)
    scores = np.asarray(detector.score(result.x_adv), np.float64)
    return Outcome(np.asarray(result.x_adv), np.asarray(result.linf), np.asarray(result.l2), predicted != y, scores,
                   flagged(scores, detector.threshold))


def targeted(attack: Attack, classifier: keras.Model, detector: Detector, joint: keras.Model, x: np.ndarray,
             y: np.ndarray, count: int, batch_size: int, progress: bool,
             keep: Callable[[int, Callable[[], Outcome]], Outcome] = lambda rank, run: run()) -> tuple[Outcome | None, int]:
    """Targeted runs at each input's `count` most likely other classes in turn, each on the inputs
    no earlier target broke, and how many targets ran; (None, 0) for fewer than 4 classes (targeted
    DLR needs 4). `keep(rank, run)` gives each target's outcome: `run()`, or one stored by an earlier
    run, so that an interrupted evaluation loses at most the target it was running."""
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
        def run(rows: np.ndarray = rows, rank: int = rank) -> Outcome:
            result = attack(joint, x[rows], y[rows], targets=others[rows, rank], index=rows, batch_size=batch_size,
                            progress=progress)
            return judge(classifier, detector, result, y[rows], batch_size)

        judged, tried = keep(rank, run), rank + 1
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
