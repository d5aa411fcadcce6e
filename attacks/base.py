"""What every attack shares: input validation, batching, compiled-function caching, the result type."""
from __future__ import annotations

import abc
import dataclasses
import weakref
from typing import Any, Callable, ClassVar

import keras
import numpy as np
from tqdm.auto import tqdm

from attacks.batches import run_batches
from attacks.objectives import Objective, fooled
from foundation.backend import (
    Array,
    Forward,
    compile_with_model,
    distribute,
    is_backend_array,
)
from foundation.validation import (
    CLIP_RANGE,
    Interval,
    Parameterized,
    check_images,
    check_labels,
    check_model_input,
)


class AttackResult:
    """Adversarial images with a per-sample success flag and perturbation norms.

    The arrays are numpy when the attack was given numpy, and backend arrays (jax.Array, tf.Tensor)
    left on the device when it was given those. `success` may be given as a function that computes
    it: it then runs on first access (one batched forward pass over `x_adv`), so callers that only
    need the images, such as adversarial training, do not pay for it, and an attack's images come at
    the speed of its gradient steps alone.
    """

    def __init__(
        self,
        x_adv: Array,
        success: Array | Callable[[], Array],
        linf: Array,
        l2: Array,
        targets: np.ndarray | None = None,
    ) -> None:
        self.x_adv, self.linf, self.l2, self.targets = x_adv, linf, l2, targets
        self._success = success

    @property
    def success(self) -> Array:
        if callable(self._success):
            judged = self._success()
            self._success = judged if is_backend_array(judged) else np.asarray(judged, dtype=bool)
        return self._success

    @property
    def success_rate(self) -> float:
        flags = keras.ops.convert_to_numpy(self.success)
        return float(flags.mean()) if len(flags) else 0.0

    def __repr__(self) -> str:
        judged = "pending" if callable(self._success) else f"{self.success_rate:.1%}"
        return f"AttackResult(n={len(self.x_adv)}, success={judged})"


def per_sample(name: str, value: Any, n: int) -> np.ndarray:
    """A budget as one finite value >= 0 per sample: a number is repeated, an array must have length n."""
    values = np.asarray(keras.ops.convert_to_numpy(value) if is_backend_array(value) else value, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(n, float(values))
    elif values.shape != (n,):
        raise ValueError(f"{name} must be a number or one value per input ({n}), got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {values.min() if np.isfinite(values).all() else 'NaN or inf'}")
    return values.astype(np.float32)


# compiled functions per model, keyed by (attack structure, what, targeted, budget names)
_compiled: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Attack(Parameterized, abc.ABC):
    """Base of all attacks: immutable, keyword-only parameters, called as `attack(model, x, y)`.

    The parameters are the dataclass fields; `_parameter_constraints` declares what each may be,
    checked at construction (`foundation.validation`), and `get_params` records them.

    Subclasses implement `_batch(forward, x, y, noise, targeted, **budget)` in `keras.ops`, which is
    compiled once per model and structure and reused for every batch. The parameters named in
    `budgets` (eps, step sizes, ...) are not compiled in: `_budget` turns them into per-sample runtime
    arrays, and a call may override them (`attack(model, x, y, eps=...)`). `_batch_noise` gives
    random starts (drawn per input from a generator seeded by `seed` and that input's index: `input_rng`).
    """

    name: ClassVar[str]
    budgets: ClassVar[tuple[str, ...]] = ()
    _parameter_constraints = {"clip": [CLIP_RANGE], "seed": [Interval(int, 0)]}
    clip: tuple[float, float] = (0.0, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        """Check and convert every declared parameter; subclasses add checks between parameters."""
        self._set_params({name: getattr(self, name) for name in self._parameter_constraints})

    @abc.abstractmethod
    def _batch(self, forward: Forward, x: Any, y: Any, noise: Any, targeted: bool, **budget: Any) -> tuple:
        """One batch, in `keras.ops`: returns (x_adv, success, linf, l2) tensors; success may be
        None when the attack does not know it, and is then judged from `x_adv` on demand."""

    def _batch_noise(self, shape: tuple[int, ...], index: np.ndarray) -> np.ndarray | None:
        """Random starts for one batch of `shape` (batch axis first); by default none."""
        return None

    def _budget(self, index: np.ndarray, overrides: dict[str, Any]) -> dict[str, np.ndarray]:
        """The runtime inputs of `_batch` for the inputs at `index` (one row each), from the attack's
        values and a call's overrides."""
        if overrides:
            takes = f"it takes {list(self.budgets)}" if self.budgets else "it has none"
            raise ValueError(f"{self.name} takes no call-time budget {sorted(overrides)}; {takes}")
        return {}

    def _structure(self) -> tuple:
        """What fixes the compiled graph: every parameter but the budgets and the seed (host side)."""
        return (type(self), *(
            (f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
            if f.name not in self.budgets and f.name != "seed"
        ))

    def input_rng(self, index: int, purpose: int = 0) -> np.random.Generator:
        """The random generator of one input: depends only on `seed`, the input's index and purpose."""
        return np.random.default_rng([self.seed, int(index), purpose])

    def _compiled(self, model: keras.Model, what: str, targeted: bool, strategy: Any, names: tuple[str, ...] = ()
                  ) -> Callable[..., tuple]:
        """The compiled `_batch` ("batch") or success test ("judge") for `model`, built once per structure."""
        per_model = _compiled.setdefault(model, {})
        key = (self._structure(), what, targeted, names)
        if key not in per_model:
            if what == "batch":
                def fn(forward: Forward, x: Any, y: Any, *values: Any) -> tuple:  # budgets, then the noise
                    budget = dict(zip(names, values[:-1], strict=True))
                    return self._batch(forward, x, y, values[-1], targeted, **budget)
            else:
                def fn(forward: Forward, x: Any, y: Any) -> tuple:
                    return (fooled(self._logits(forward(x)), y, targeted),)
            per_model[key] = compile_with_model(model, fn)
        return per_model[key] if strategy is None else distribute(strategy, per_model[key])

    def _classes(self, model: keras.Model) -> int:
        """How many classes the model tells apart (the adaptive attack's model adds a score column)."""
        return int(model.output_shape[-1])

    def _logits(self, outputs: Any) -> Any:
        """The classifier's logits within the model's outputs (the adaptive attack's model adds a score)."""
        return outputs

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
        **budget: Any,
    ) -> AttackResult:
        """Attack `x` (labels `y`); with `targets`, push each input towards its target class.

        `targets` is an array of classes, "random" (a random other class per input) or
        "least_likely" (the class the model finds least likely on the clean input).
        `budget` overrides the attack's budgets for this call (e.g. `eps=0.1`, or one eps per
        input): they are runtime inputs, so a new value compiles nothing.

        `x` may be numpy (results come back as numpy; the copies to and from the device overlap the
        work) or a backend array (jax.Array, tf.Tensor: the results stay on its device).
        Inputs are processed in fixed-size batches (the last one padded) so nothing recompiles.
        The caller's arrays are never modified. Each input's random start depends only on `seed` and
        its `index` (default 0..n-1; pass source indices so a dataset split into shards gets the
        same bytes as one run). `progress` shows a bar, or advances a caller's `tqdm` bar.
        `strategy` (a `tf.distribute` strategy, e.g. MirroredStrategy over the local GPUs) splits
        every batch across its replicas; results do not change.
        """
        on_device = is_backend_array(x)
        x = check_images(x, self.clip)
        n = int(x.shape[0])
        check_model_input(model, x)
        num_classes = self._classes(model)
        y = check_labels(y, n, num_classes)
        index = np.arange(n) if index is None else np.asarray(index)
        if index.shape != (n,):
            raise ValueError(f"index must hold one integer per input ({n}), got shape {index.shape}")
        runtime = self._budget(index, budget)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        targeted = targets is not None
        if isinstance(targets, str):
            targets = self._choose_targets(targets, model, x, y, index, num_classes, batch_size)
        goal = check_labels(targets, n, num_classes, "targets") if targeted else y
        size = min(batch_size, n)
        if strategy is not None:
            size = -(-size // strategy.num_replicas_in_sync) * strategy.num_replicas_in_sync
        own_bar = not isinstance(progress, tqdm)
        bar = tqdm(total=n, desc=self.name, unit="img", disable=not progress) if own_bar else progress
        run = self._compiled(model, "batch", targeted, strategy, tuple(runtime))
        x_adv, success, linf, l2 = run_batches(
            run, [x, goal, *runtime.values()], size, bar=bar, on_device=on_device,
            extra=lambda rows, shape: self._batch_noise(shape, index[rows]),
        )
        if own_bar:
            bar.close()
        if success is None:  # judged on first access: one forward pass over the results
            judge = self._compiled(model, "judge", targeted, strategy)
            success = lambda: run_batches(judge, [x_adv, goal], size, on_device=on_device)[0]
        return AttackResult(x_adv, success, linf, l2, targets=goal if targeted else None)

    def _choose_targets(
        self, mode: str, model: keras.Model, x: Array, y: np.ndarray, index: np.ndarray,
        num_classes: int, batch_size: int,
    ) -> np.ndarray:
        if mode == "random":
            shifts = [self.input_rng(i, purpose=1).integers(1, num_classes) for i in index]
            return (y + np.asarray(shifts, dtype=np.int64)) % num_classes
        if mode == "least_likely":
            logits = self._logits(model.predict(x, batch_size=batch_size, verbose=0))
            return np.argmin(logits, axis=-1)
        raise ValueError(f"unknown target mode {mode!r}: give classes, 'random' or 'least_likely'")

    def _param_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.init]

    def _plain(self, value: Any) -> Any:
        """As `Parameterized._plain`; an Objective of the caller's own is recorded by its repr (not rebuildable)."""
        return repr(value) if isinstance(value, Objective) else super()._plain(value)

    def get_params(self) -> dict[str, Any]:
        """The attack's name and effective parameters as JSON-able values (for manifests and
        reports); the class called with them (less "attack") rebuilds the same attack."""
        return {"attack": self.name, **super().get_params()}
