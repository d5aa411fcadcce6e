"""Black-box clients for benchmarks/query_attacks.py: an oracle that counts queries and remembers
whether the attacker got what it wanted, our own Square attack (L-inf, Andriushchenko et al. 2020),
HopSkipJump (ART's implementation, used here only), and the benign replay's augmentations.

An attack succeeds when the service ACCEPTS a query within eps (L-inf) of the clean image and labels
it other than the clean label: that answer is the adversarial example, whatever the attack does next.
A rejected input tells the attacker nothing but "no" (its probabilities are withheld)."""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

# a batch of images -> per image its probabilities, or None when the service rejected it
Send = Callable[[np.ndarray], list]


class Blocked(Exception):
    """The service refused the client (HTTP 429): the attack cannot go on."""


class BudgetSpent(Exception):
    """The attack used its query budget."""


class Oracle:
    """The attacker's view of the service for one image: counts queries, stops at the budget, and
    records the first accepted, misclassified query within eps (the success); stops there when
    `stop_at_success` (Square does; HopSkipJump goes on shrinking the perturbation)."""

    def __init__(self, send: Send, x: np.ndarray, label: int, eps: float, budget: int, stop_at_success: bool = True) -> None:
        self.send, self.x, self.label, self.eps, self.budget = send, x, label, eps, budget
        self.stop_at_success = stop_at_success
        self.queries = 0
        self.success_at: int | None = None

    def __call__(self, batch: np.ndarray) -> list:
        if self.queries >= self.budget or (self.stop_at_success and self.success_at is not None):
            raise BudgetSpent
        if len(batch) > self.budget - self.queries:  # the queries the budget allows, then stop
            self(batch[: self.budget - self.queries])
            raise BudgetSpent
        answers = self.send(batch)
        for i, (image, probabilities) in enumerate(zip(batch, answers, strict=True)):
            if (probabilities is not None and int(np.argmax(probabilities)) != self.label
                    and np.abs(image - self.x).max() <= self.eps + 1e-6 and self.success_at is None):
                self.success_at = self.queries + i + 1
        self.queries += len(batch)
        return answers


def _square_size(p_init: float, queries: int, budget: int, height: int, width: int) -> int:
    """The side of the next square: Square's schedule (p halves at fixed fractions of 10,000 queries,
    rescaled to the budget)."""
    progress = int(queries / budget * 10_000)
    halvings = sum(progress > step for step in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    side = round(np.sqrt(p_init / 2**halvings * height * width))
    return int(min(max(side, 1), height - 1))


def square_attack(oracle: Oracle, clip: tuple[float, float], rng: np.random.Generator, p_init: float = 0.3) -> None:
    """Square attack, L-inf, untargeted, on the margin of the answered probabilities (a rejected
    answer counts as no progress). Runs until success, the budget or a block."""
    x, eps, label = oracle.x, oracle.eps, oracle.label
    height, width, channels = x.shape

    def margin(probabilities: np.ndarray | None) -> float:
        if probabilities is None:
            return np.inf
        return float(probabilities[label] - np.max(np.delete(probabilities, label)))

    best_x = np.clip(x + eps * rng.choice([-1.0, 1.0], size=(1, width, channels)), *clip).astype(np.float32)
    best = margin(oracle(best_x[None])[0])
    while True:
        side = _square_size(p_init, oracle.queries, oracle.budget, height, width)
        row, col = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        for _ in range(10):  # redraw until the square changes the image
            delta = best_x - x
            delta[row : row + side, col : col + side] = eps * rng.choice([-1.0, 1.0], size=(1, 1, channels))
            candidate = np.clip(x + delta, *clip).astype(np.float32)
            if (candidate != best_x).any():
                break
        value = margin(oracle(candidate[None])[0])
        if value < best:
            best, best_x = value, candidate


def hop_skip_jump(oracle: Oracle, start: np.ndarray, num_classes: int, clip: tuple[float, float]) -> None:
    """HopSkipJump (L-inf; ART's implementation) from `start`, an image the service accepts with
    another label. A rejected query reads as the clean label (not adversarial)."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    def predict(batch: np.ndarray) -> np.ndarray:
        answers = oracle(batch.astype(np.float32))
        labels = [oracle.label if p is None else int(np.argmax(p)) for p in answers]
        return np.eye(num_classes, dtype=np.float32)[labels]

    classifier = BlackBoxClassifier(predict, oracle.x.shape, num_classes, clip_values=clip)
    attack = HopSkipJump(classifier, norm=np.inf, max_iter=100, max_eval=200, init_eval=20, verbose=False)
    attack.generate(oracle.x[None], y=np.eye(num_classes)[[oracle.label]], x_adv_init=start[None])


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A benign client's version of a test image in [0, 1]: maybe flipped left-right, a random crop
    of 80-100% of each side resized back, then JPEG re-encoded at quality 60-95."""
    height, width, channels = image.shape
    if rng.random() < 0.5:
        image = image[:, ::-1]
    crop_h, crop_w = (max(2, int(round(n * rng.uniform(0.8, 1.0)))) for n in (height, width))
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    pixels = np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w] * 255).astype(np.uint8)
    pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    return (decoded.reshape(height, width, channels) / 255).astype(np.float32)
