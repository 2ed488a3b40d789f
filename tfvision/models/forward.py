"""A compiled forward pass over a dataset: what training's end-of-run summary and the tasks' scorers share."""

from __future__ import annotations

import keras
import numpy as np


def compiled_forward(model):
    """``model(x, training=False)`` compiled for the Keras backend: x -> outputs.

    TensorFlow: a `tf.function` (about 2x `model.predict` on CPU, benchmarks/README.md).
    JAX: `jax.jit` of `model.stateless_call` on the variables' current values. Not
    `model.predict_on_batch`: under `keras.distribution.DataParallel` it shards each batch over
    the devices and so refuses the last, partial validation batch; here a batch goes whole to
    wherever the (replicated) weights are.
    """
    if keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def step(trainable, non_trainable, x):
            return model.stateless_call(trainable, non_trainable, x, training=False)[0]

        def call(x):
            return step([v.value for v in model.trainable_variables],
                        [v.value for v in model.non_trainable_variables], np.asarray(x))

        return call
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(x):
        return model(x, training=False)

    return step


def predict_logits(model, dataset) -> np.ndarray:
    """Logits for a dataset of ``(x, ...)`` batches, through `compiled_forward`."""
    step = compiled_forward(model)
    return np.concatenate([np.asarray(step(batch[0])) for batch in dataset], axis=0)
