"""What an answer tells the client, and no more: the response rows of `:predict` and `:classify`.

A rejected input gets "probabilities", "label" and, by default, "adversarial_score" null: the
classifier's answer on a suspected adversarial input is an oracle, and a continuous score is a
gradient for getting under the detector's threshold. `AnswerPolicy` sets what trusted callers may
see (`scores_for_rejected`) and how precise the probabilities of accepted inputs are (`decimals`
rounds them, `top_k` keeps the k largest and zeroes the rest): exact probabilities give an attacker
exact logit margins. The exported SavedModel masks the same rows (`serving.export`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from serving.guard import GuardResult


@dataclasses.dataclass(frozen=True)
class AnswerPolicy:
    """What the response rows carry; the defaults are the safe ones for untrusted clients."""

    scores_for_rejected: bool = False  # the detector's score on rejected inputs (trusted callers only)
    decimals: int | None = None  # round probabilities to this many decimals
    top_k: int | None = None  # keep the k largest probabilities, zero the rest

    def __post_init__(self) -> None:
        if self.decimals is not None and (isinstance(self.decimals, bool) or not 0 <= self.decimals <= 15):
            raise ValueError(f"decimals must be an integer in [0, 15] or None, got {self.decimals!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")

    def coarsened(self, probabilities: np.ndarray) -> np.ndarray:
        """The probabilities as answered: top-k kept, then rounded (labels come from the exact ones)."""
        if self.top_k is not None and self.top_k < probabilities.shape[1]:
            smallest = np.argsort(probabilities, axis=1, kind="stable")[:, : probabilities.shape[1] - self.top_k]
            probabilities = probabilities.copy()
            np.put_along_axis(probabilities, smallest, 0.0, axis=1)
        return probabilities if self.decimals is None else np.round(probabilities, self.decimals)


def prediction_rows(result: GuardResult, probabilities: np.ndarray | None,
                    policy: AnswerPolicy = AnswerPolicy()) -> list[dict[str, Any]]:
    """The response rows; `probabilities` has a row per input (rows of rejected inputs are withheld)."""
    rows = labels = None
    if probabilities is not None:
        rows, labels = policy.coarsened(probabilities).tolist(), probabilities.argmax(axis=1).tolist()
    return [
        {
            "probabilities": rows[i] if rows is not None and not rejected else None,
            "label": labels[i] if labels is not None and not rejected else None,
            "adversarial_score": score if math.isfinite(score) and (policy.scores_for_rejected or not rejected) else None,
            "flagged": flagged,
            "rejected": rejected,
        }
        for i, (score, flagged, rejected) in enumerate(
            zip(result.scores.tolist(), result.flagged.tolist(), result.rejected.tolist(), strict=True)
        )
    ]
