"""What every attack shares: input validation, batching, compiled-function caching, the result type."""
from __future__ import annotations

import abc
import dataclasses
import math
import weakref
from typing import Any, Callable, ClassVar

import keras
import numpy as np
from tqdm.auto import tqdm

from attacks.backend import Forward, compile_with_model, distribute


class AttackResult:
    """Adversarial images with a per-sample success flag and perturbation norms (all numpy).

    `success` may be given as a function that computes it: it then runs on first access (one batched
    forward pass over `x_adv`), so callers that only need the images, such as adversarial training,
    do not pay for it, and an attack's images come at the speed of its gradient steps alone.
    """

    def __init__(
        self,
        x_adv: np.ndarray,
        success: np.ndarray | Callable[[], np.ndarray],
        linf: np.ndarray,
        l2: np.ndarray,
        targets: np.ndarray | None = None,
    ) -> None:
        self.x_adv, self.linf, self.l2, self.targets = x_adv, linf, l2, targets
        self._success = success

    @property
    def success(self) -> np.ndarray:
        if callable(self._success):
            self._success = np.asarray(self._success(), dtype=bool)
        return self._success

    @property
    def success_rate(self) -> float:
        return float(self.success.mean()) if len(self.success) else 0.0

    def __repr__(self) -> str:
        judged = "pending" if callable(self._success) else f"{self.success_rate:.1%}"
        return f"AttackResult(n={len(self.x_adv)}, success={judged})"


def check_images(x: Any, clip: tuple[float, float]) -> np.ndarray:
    """Return `x` as a float32 NHWC array after checking rank, dtype, finiteness and range."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"images must be a 4-D NHWC array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be floating point in {list(clip)}, got dtype {x.dtype}")
    if len(x) == 0:
        raise ValueError("no images given (empty batch)")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < clip[0] or high > clip[1]:
        raise ValueError(f"images must lie in {list(clip)}, found values in [{low:.4g}, {high:.4g}]")
    return x.astype(np.float32, copy=False)


def check_labels(y: Any, n: int, num_classes: int, what: str = "labels") -> np.ndarray:
    """Return `y` as int32 class indices after checking length, dtype and range."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{what} must be a 1-D array of {n} class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must be integer class indices, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{what} must lie in [0, {num_classes - 1}] for this model, "
            f"found [{y.min()}, {y.max()}]"
        )
    return y.astype(np.int32)


def check_model_input(model: keras.Model, x: np.ndarray) -> int:
    """Check that `x` fits the model's input and return the number of classes it outputs."""
    expected = tuple(model.input_shape[1:])
    if len(expected) != 3 or any(e is not None and e != a for e, a in zip(expected, x.shape[1:], strict=True)):
        raise ValueError(
            f"images of shape {x.shape[1:]} do not fit the model's input shape {expected}"
        )
    return int(model.output_shape[-1])


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """An integer parameter (bools refused) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_finite_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def fooled(logits: Any, goal: Any, targeted: bool) -> Any:
    """Per sample: the model predicts the target (targeted) or anything but the label (untargeted)."""
    predicted = keras.ops.cast(keras.ops.argmax(logits, axis=-1), goal.dtype)
    return predicted == goal if targeted else predicted != goal


def _batched(
    run: Callable[..., tuple], arrays: list[np.ndarray], size: int, *,
    noise: Callable[[slice, tuple[int, ...]], np.ndarray] | None = None, bar: tqdm | None = None,
) -> list[np.ndarray | None]:
    """`run(*batch_arrays[, noise])` over fixed-size batches (the last padded with copies of its first
    row, so nothing recompiles); each output concatenated with the padding dropped (None stays None)."""
    n = len(arrays[0])
    outputs: list[list[np.ndarray]] | None = None
    for start in range(0, n, size):
        batch = [a[start : start + size] for a in arrays]
        count = len(batch[0])
        if count < size:
            batch = [np.concatenate([b, np.repeat(b[:1], size - count, axis=0)]) for b in batch]
        if noise is not None:
            batch.append(noise(slice(start, start + size), batch[0].shape))
        values = run(*batch)
        outputs = outputs or [[] for _ in values]
        for out, value in zip(outputs, values, strict=True):
            if value is not None:
                out.append(keras.ops.convert_to_numpy(value)[:count])
        if bar is not None:
            bar.update(count)
    return [np.concatenate(parts) if parts else None for parts in outputs]


_compiled: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Attack(abc.ABC):
    """Base of all attacks: immutable, keyword-only parameters, called as `attack(model, x, y)`.

    Subclasses implement `_batch(forward, x, y, noise, targeted)` in `keras.ops`, which is compiled
    once per model and reused for every batch, and may override `_batch_noise` for random starts
    (drawn per input from a generator seeded by `seed` and that input's index: `input_rng`).
    """

    name: ClassVar[str]
    clip: tuple[float, float] = (0.0, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.clip)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"clip must be a finite range (low, high) with low < high, got {self.clip}")
        object.__setattr__(self, "clip", (low, high))

    @abc.abstractmethod
    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool) -> tuple:
        """One batch, in `keras.ops`: returns (x_adv, success, linf, l2) tensors; success may be
        None when the attack does not know it, and is then judged from `x_adv` on demand."""

    def _batch_noise(self, shape: tuple[int, ...], index: np.ndarray) -> np.ndarray:
        """Random starts for one batch of `shape` (batch axis first); by default none (zeros)."""
        return np.zeros(shape, np.float32)

    def input_rng(self, index: int, purpose: int = 0) -> np.random.Generator:
        """The random generator of one input: depends only on `seed`, the input's index and purpose."""
        return np.random.default_rng([self.seed, int(index), purpose])

    def _compiled(self, model: keras.Model, what: str, targeted: bool, strategy: Any) -> Callable[..., tuple]:
        """The compiled `_batch` ("batch") or success test ("judge") for `model`, built once."""
        per_model = _compiled.setdefault(model, {})
        key = (self, what, targeted)
        if key not in per_model:
            if what == "batch":
                def fn(forward: Forward, x: Any, y: Any, noise: Any) -> tuple:
                    return self._batch(forward, x, y, noise, targeted)
            else:
                def fn(forward: Forward, x: Any, y: Any) -> tuple:
                    return (fooled(forward(x), y, targeted),)
            per_model[key] = compile_with_model(model, fn)
        return per_model[key] if strategy is None else distribute(strategy, per_model[key])

    def __call__(
        self,
        model: keras.Model,
        x: Any,
        y: Any,
        *,
        targets: Any = None,
        index: Any = None,
        batch_size: int = 256,
        progress: bool | tqdm = False,
        strategy: Any = None,
    ) -> AttackResult:
        """Attack `x` (labels `y`); with `targets`, push each input towards its target class.

        `targets` is an array of classes, "random" (a random other class per input) or
        "least_likely" (the class the model finds least likely on the clean input).

        Inputs are processed in fixed-size batches (the last one padded) so nothing recompiles.
        The caller's arrays are never modified. Each input's random start depends only on `seed` and
        its `index` (default 0..n-1; pass source indices so a dataset split into shards gets the
        same bytes as one run). `progress` shows a bar, or advances a caller's `tqdm` bar.
        `strategy` (a `tf.distribute` strategy, e.g. MirroredStrategy over the local GPUs) splits
        every batch across its replicas; results do not change.
        """
        x = check_images(x, self.clip)
        num_classes = check_model_input(model, x)
        y = check_labels(y, len(x), num_classes)
        index = np.arange(len(x)) if index is None else np.asarray(index)
        if index.shape != (len(x),):
            raise ValueError(f"index must hold one integer per input ({len(x)}), got shape {index.shape}")
        targeted = targets is not None
        if isinstance(targets, str):
            targets = self._choose_targets(targets, model, x, y, index, num_classes, batch_size)
        goal = check_labels(targets, len(x), num_classes, "targets") if targeted else y
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        size = min(batch_size, len(x))
        if strategy is not None:
            size = -(-size // strategy.num_replicas_in_sync) * strategy.num_replicas_in_sync
        own_bar = not isinstance(progress, tqdm)
        bar = tqdm(total=len(x), desc=self.name, unit="img", disable=not progress) if own_bar else progress
        x_adv, success, linf, l2 = _batched(
            self._compiled(model, "batch", targeted, strategy), [x, goal], size,
            noise=lambda rows, shape: self._batch_noise(shape, index[rows]), bar=bar,
        )
        if own_bar:
            bar.close()
        if success is None:  # judged on first access: one forward pass over the results
            judge = self._compiled(model, "judge", targeted, strategy)
            success = lambda: _batched(judge, [x_adv, goal], size)[0]
        return AttackResult(x_adv, success, linf, l2, targets=goal if targeted else None)

    def _choose_targets(
        self, mode: str, model: keras.Model, x: np.ndarray, y: np.ndarray, index: np.ndarray,
        num_classes: int, batch_size: int,
    ) -> np.ndarray:
        if mode == "random":
            shifts = [self.input_rng(i, purpose=1).integers(1, num_classes) for i in index]
            return (y + np.asarray(shifts, dtype=np.int64)) % num_classes
        if mode == "least_likely":
            return np.argmin(model.predict(x, batch_size=batch_size, verbose=0), axis=-1)
        raise ValueError(f"unknown target mode {mode!r}: give classes, 'random' or 'least_likely'")

    def params(self) -> dict[str, Any]:
        """The attack's effective parameters as JSON-able values (for manifests and reports);
        `make_attack(**params)` rebuilds the same attack."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        values["clip"] = list(self.clip)
        return {"attack": self.name, **values}
