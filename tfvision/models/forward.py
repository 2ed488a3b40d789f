"""A compiled forward pass over a dataset: what training's end-of-run summary and the tasks' scorers share."""

from __future__ import annotations

import numpy as np


def predict_logits(model, dataset) -> np.ndarray:
    """Logits for a dataset of ``(x, ...)`` batches, through a compiled `tf.function`.

    About 2x `model.predict` on CPU (benchmarks/README.md).
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(x):
        return model(x, training=False)

    return np.concatenate([step(batch[0]).numpy() for batch in dataset], axis=0)
