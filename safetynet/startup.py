"""Load Keras (and TensorFlow) for a command without TensorFlow's C++ start-up lines.

TensorFlow logs through absl before it reads TF_CPP_MIN_LOG_LEVEL ("All log messages before
absl::InitializeLog() ...", oneDNN, "Could not find cuda drivers", cuInit errors), so the variable
alone leaves 6-7 lines of noise on every command. The only reliable quiet is to point file
descriptor 2 at /dev/null while the libraries load and the devices are listed; Python exceptions
still surface afterwards, and SAFETYNET_DEBUG=1 keeps everything.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load_keras_quietly() -> None:
    """Import Keras and initialise the backend's devices with native stderr silenced (a no-op when loaded)."""
    if os.environ.get("SAFETYNET_DEBUG") or "keras" in sys.modules:
        import keras  # noqa: F401
        return
    with _stderr_silenced():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices()  # cuInit and its errors happen here, not at import
