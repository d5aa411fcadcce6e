"""Stop adversarial training that has collapsed, with a message that says what to change.

Adversarial training with a strong attack from the first step (PGD at full eps, no warm-up, large
batches) can collapse: the model gives up on the clean task and sits at chance. Measured on an H200:
MNIST PGD-AT at eps 0.3 without warm-up ended at 11% clean accuracy, and every later stage (detector,
evaluation) ran on without a word. `CollapseCheck` measures clean accuracy on a fixed slice of
training images after each epoch and raises `TrainingCollapsed` once it has stayed near chance, or
far below where a pretrained model started, for `patience` epochs in a row. Epochs that end before
`min_steps` optimizer steps are not judged: a new model on a small dataset (512 CIFAR images, batch
256: two steps an epoch) is still at chance because it has barely trained, not because it collapsed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

# clean accuracy within this of chance (1 / classes) counts as collapsed
CHANCE_MARGIN = 0.1
# a pretrained model whose clean accuracy falls this far below its start counts as collapsed
MAX_DROP = 0.4
# optimizer steps before the first epoch that is judged
MIN_STEPS = 50


class TrainingCollapsed(ValueError):
    """Adversarial training drove clean accuracy to chance (or far below the starting model)."""


class CollapseCheck(keras.callbacks.Callback):
    """After each epoch: clean accuracy of `classifier` on (x, y); raises TrainingCollapsed when it
    has been collapsed for `patience` epochs in a row.

    start_accuracy: the classifier's clean accuracy before training (None for a new model: only the
        chance rule applies). min_steps: optimizer steps before an epoch is judged. advice: what the
        error tells the user to change.
    """

    def __init__(self, classifier: keras.Model, x: np.ndarray, y: np.ndarray, num_classes: int, *,
                 start_accuracy: float | None = None, patience: int = 2, min_steps: int = MIN_STEPS,
                 advice: str = "") -> None:
        super().__init__()
        self.classifier, self.x, self.y = classifier, x, np.asarray(y)
        self.chance = 1.0 / num_classes
        self.start_accuracy, self.patience, self.min_steps, self.advice = start_accuracy, patience, min_steps, advice
        self.history: list[float] = []
        self.steps = 0

    def state(self, directory: Path) -> dict[str, Any]:
        """The accuracies so far and the steps run: `training.resume.Resumable`."""
        return {"history": self.history, "steps": self.steps}

    def restore(self, state: dict[str, Any], directory: Path) -> None:
        self.history, self.steps = list(state["history"]), int(state["steps"])

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.steps += 1

    def clean_accuracy(self) -> float:
        logits = self.classifier.predict(self.x, batch_size=256, verbose=0)
        return float(np.mean(np.argmax(logits, axis=-1) == self.y))

    def collapsed(self, accuracy: float) -> bool:
        if accuracy <= self.chance + CHANCE_MARGIN:
            return True
        return self.start_accuracy is not None and accuracy < self.start_accuracy - MAX_DROP

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.steps < self.min_steps:
            return
        accuracy = self.clean_accuracy()
        self.history.append(accuracy)
        recent = self.history[-self.patience:]
        if len(recent) == self.patience and all(self.collapsed(a) for a in recent):
            started = "" if self.start_accuracy is None else f", the model started at {self.start_accuracy:.1%}"
            raise TrainingCollapsed(
                f"adversarial training collapsed: clean accuracy {accuracy:.1%} after epoch {epoch + 1} "
                f"(chance {self.chance:.0%}{started}); {self.advice or 'ramp eps up over the first epochs, lower the learning rate or use smaller batches'}"
            )
