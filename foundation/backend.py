"""The one backend seam: compiling attack code and differentiating through a model's input.

Everything else in `attacks` is written in `keras.ops`, so it runs unchanged on every backend that
this module supports. Two functions make the seam:

- `compile_with_model(model, fn)` compiles `fn(forward, *tensors)` for the active backend, where
  `forward(x)` returns the model's logits (TensorFlow: `tf.function`; JAX: `jax.jit` over
  `model.stateless_call`, with the weights passed as arguments so retraining the model never leaves a
  stale compiled copy behind).
- `value_and_grad(fn, x)` returns `fn(x)` (one value per sample, plus auxiliary outputs) and the
  gradient of the values' sum with respect to `x`. Samples are independent, so that is each
  sample's own input gradient.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import keras
import numpy as np

Tensor = Any
Forward = Callable[[Tensor], Tensor]

SUPPORTED_BACKENDS = ("tensorflow", "jax")

Array = Any  # a numpy array or a backend tensor


def is_backend_array(x: Any) -> bool:
    """True for a tensor of the active Keras backend (left on its device), False for numpy and lists."""
    return not isinstance(x, np.ndarray) and keras.ops.is_tensor(x)


class _QuietRetracing(logging.Filter):
    """Each (model, attack) pair is compiled once on purpose; TensorFlow's retracing hint, which
    counts calls across such functions, only adds noise to the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_QuietRetracing())


def _backend() -> str:
    name = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise RuntimeError(
            f"safetynet attacks support the Keras backends {SUPPORTED_BACKENDS}, not {name!r}; "
            "set KERAS_BACKEND accordingly"
        )
    return name


def compile_with_model(
    model: keras.Model, fn: Callable[..., Any], *, jit_compile: bool = False
) -> Callable[..., Any]:
    """Compile `fn(forward, *tensors)` into a callable of `*tensors` for the active backend.

    `jit_compile` asks TensorFlow for XLA; leave it off on CPU, where XLA ran convolutions about 2x
    slower than TensorFlow's default kernels. JAX always compiles with XLA.
    """
    if _backend() == "tensorflow":
        import tensorflow as tf

        def forward_tf(x: Tensor) -> Tensor:
            return model(x, training=False)

        return tf.function(
            lambda *tensors: fn(forward_tf, *tensors),
            jit_compile=jit_compile,
            reduce_retracing=True,
            autograph=False,  # loops are explicit (keras.ops.while_loop): nothing to convert
        )

    import jax

    def run(trainable: list, non_trainable: list, *tensors: Tensor) -> Any:
        def forward_jax(x: Tensor) -> Tensor:
            logits, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return logits

        return fn(forward_jax, *tensors)

    jitted = jax.jit(run)

    def call(*tensors: Tensor) -> Any:
        return jitted(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            *tensors,
        )

    return call


def value_and_grad(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """For `fn(x) -> (values, aux)` with one value per sample: `values`, `aux`, d(sum values)/dx."""
    if _backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            values, aux = fn(x)
        return values, aux, tape.gradient(values, x)

    import jax

    def total(z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        values, aux = fn(z)
        return values.sum(), (values, aux)

    (_, (values, aux)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return values, aux, grad


# loops up to this many steps are unrolled into the compiled graph; longer ones (PGD-40, adaptive
# attacks) become a real loop, so that their graphs build in seconds
UNROLL_MAX_STEPS = 20


def repeat(body: Callable[..., tuple], state: tuple, steps: int) -> tuple:
    """`state = body(*state)` exactly `steps` times, inside a compiled function.

    Unrolled into the graph up to UNROLL_MAX_STEPS, on both backends: under TensorFlow that measured
    faster on CPU than `tf.while_loop` (no per-iteration control flow), and under JAX on CPU XLA ran
    the model 3.4x slower inside `fori_loop` than unrolled (FGSM on the benchmark CNN: 2.0 s against
    0.6 s a batch of 256). Longer loops use `fori_loop`.
    """
    if steps <= UNROLL_MAX_STEPS:
        for _ in range(steps):
            state = body(*state)
        return state
    return keras.ops.fori_loop(0, steps, lambda _, carried: body(*carried), state)


def distribute(strategy: Any, run: Callable[..., tuple]) -> Callable[..., tuple]:
    """Run a compiled batch function data-parallel under a `tf.distribute` strategy: every input
    tensor is split along its first axis across the replicas, and the outputs are gathered back."""
    if _backend() != "tensorflow":
        raise ValueError("distribution strategies need the TensorFlow backend")
    replicas = strategy.num_replicas_in_sync

    def call(*tensors: Tensor) -> tuple:
        given = [t for t in tensors if t is not None]
        if any(len(t) % replicas for t in given):
            raise ValueError(f"the batch must divide evenly across {replicas} replicas")
        chunks = [None if t is None else [t[r * len(t) // replicas : (r + 1) * len(t) // replicas] for r in range(replicas)]
                  for t in tensors]
        values = [
            None if c is None else
            strategy.experimental_distribute_values_from_function(lambda context, c=c: c[context.replica_id_in_sync_group])
            for c in chunks
        ]
        outputs = strategy.run(run, args=tuple(values))
        return tuple(
            None if o is None else keras.ops.concatenate(strategy.experimental_local_results(o), axis=0)
            for o in outputs
        )

    return call


def local_strategy() -> Any:
    """MirroredStrategy over all local GPUs when there is more than one (TensorFlow), else None."""
    if _backend() != "tensorflow":
        return None
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([g.name for g in gpus]) if len(gpus) > 1 else None


Devices = int | str | Sequence[str]  # a count, "all", or device names as keras.distribution.list_devices() gives them


def _chosen_devices(devices: Devices) -> list[str]:
    """The device names meant by a count (the first N of the default kind: GPUs, else CPUs), "all",
    or a list of names; refuses more devices than exist."""
    available = keras.distribution.list_devices()
    if devices == "all":
        return available
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        if devices > len(available):
            raise ValueError(f"{devices} devices asked for, but only {len(available)} exist: {', '.join(available)}")
        return available[:devices]
    if isinstance(devices, (list, tuple)) and devices and all(isinstance(d, str) for d in devices):
        unknown = [d for d in devices if d not in available]
        if unknown:
            raise ValueError(f"unknown devices {unknown}: the devices here are {', '.join(available)}")
        return list(devices)
    raise ValueError(f"devices must be a count >= 1, 'all' or a list of device names, got {devices!r}")


@functools.cache
def _mirrored_strategy(devices: tuple[str, ...]) -> Any:
    """One MirroredStrategy per device set and process: a second one over the same devices clashed
    with the first's collective all-reduce ("Shape mismatch in the collective instance")."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy([f"/{name}" for name in devices])


@contextlib.contextmanager
def training_devices(devices: Devices = 1) -> Iterator[Any]:
    """The context to build, compile and fit a model under, data-parallel over `devices` (a count,
    "all", or names such as "gpu:0"): each batch is split across them and the gradients combined.

    TensorFlow: `tf.distribute.MirroredStrategy` over those devices, entered as `strategy.scope()`.
    JAX: `keras.distribution.DataParallel(devices=...)`, made the global distribution
    (`set_distribution`) inside and restored after. Yields the strategy or distribution, or None for
    one device, where nothing is set at all. Variables (the model's, the optimizer's) must be
    created inside the context, which is why it wraps building and compiling too.
    """
    chosen = None if devices == 1 and not isinstance(devices, bool) else _chosen_devices(devices)
    if chosen is None or len(chosen) == 1:
        yield None
        return
    if _backend() == "tensorflow":
        strategy = _mirrored_strategy(tuple(chosen))
        with strategy.scope():
            yield strategy
        return
    distribution = keras.distribution.DataParallel(devices=chosen)
    with distribution.scope():
        yield distribution


def replica_count(distributed: Any) -> int:
    """How many devices the context that `training_devices` yielded splits each batch across."""
    if distributed is None:
        return 1
    if _backend() == "tensorflow":
        return int(distributed.num_replicas_in_sync)
    return int(distributed.device_mesh.devices.size)
