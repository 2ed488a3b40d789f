"""Which Keras backend trains: TensorFlow, or JAX for ``train.strategy: "jax"``.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, and cannot switch afterwards.
The training CLI validates its config before anything imports Keras, so `select_backend`
can still set the variable there; once Keras is loaded it can only check, and a config that
asks for another backend stops with a `ConfigError` naming the fix.

>>> select_backend("jax")  # before `import keras`: sets KERAS_BACKEND=jax
'jax'

The ``tf.distribute`` strategies (mirrored, multi_worker, tpu) need the TensorFlow backend;
``default`` runs on whichever backend Keras has (one device). Export, evaluate, predict and
extract always run on TensorFlow (`use_tensorflow`), whatever KERAS_BACKEND says: a checkpoint
trained on JAX is a Keras file like any other. Nothing here imports Keras.
"""

from __future__ import annotations

import logging
import os
import sys

from tfvision.errors import ConfigError

log = logging.getLogger("tfvision.backend")

# train.strategy -> the backend it needs (None: either)
STRATEGY_BACKEND = {"default": None, "jax": "jax", "mirrored": "tensorflow",
                    "multi_worker": "tensorflow", "tpu": "tensorflow"}


def current_backend() -> str:
    """The backend Keras has, or will have when imported (KERAS_BACKEND, else TensorFlow)."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def select_backend(strategy: str) -> str:
    """Make the Keras backend the one `strategy` needs, and return it.

    Raises:
        ConfigError: the backend is fixed already (Keras imported, or KERAS_BACKEND set) to
            another one than `strategy` needs.
    """
    want = STRATEGY_BACKEND.get(strategy)
    have = current_backend()
    if want is None or want == have:
        return have
    fixed = "keras" in sys.modules or "KERAS_BACKEND" in os.environ
    if not fixed:
        os.environ["KERAS_BACKEND"] = want
        return want
    how = ("Keras was imported with it already" if "keras" in sys.modules
           else f"KERAS_BACKEND={os.environ['KERAS_BACKEND']}")
    if want == "jax":
        raise ConfigError(f"train.strategy: 'jax' trains on Keras's JAX backend, but this process has "
                          f"the {have!r} backend ({how}); unset KERAS_BACKEND or set it to jax")
    raise ConfigError(f"train.strategy: {strategy!r} is a tf.distribute strategy and needs the TensorFlow "
                      f"backend, but this process has {have!r} ({how}); use train.strategy 'jax' "
                      "(keras.distribution over all devices) or 'default' (one device) on JAX")


def use_tensorflow(command: str) -> None:
    """Give `command` Keras's TensorFlow backend: SavedModel, ONNX and TFLite are TensorFlow
    formats, and serving, TTA and Grad-CAM run TensorFlow functions.

    KERAS_BACKEND=jax, as a Kaggle TPU notebook sets it for training, is overridden with a
    one-line notice, so a JAX run exports, evaluates and predicts in the same environment.

    Raises:
        ConfigError: Keras was imported with another backend already (only in-process use).
    """
    have = current_backend()
    if have == "tensorflow":
        return
    if "keras" in sys.modules:
        raise ConfigError(f"{command} needs Keras's TensorFlow backend, but this process imported Keras "
                          f"with {have!r}; run it in a process of its own")
    log.warning("note: %s runs on Keras's TensorFlow backend; KERAS_BACKEND=%s is ignored here",
                command, os.environ["KERAS_BACKEND"])
    os.environ["KERAS_BACKEND"] = "tensorflow"
