"""Rare-positive oversampling by sampling weights, inside tf.data.

Each sample gets a weight: the largest factor among the classes it is a known
positive of (1 if none). Samples are grouped by weight into a few strata, each
an endlessly reshuffled stream, and `Dataset.sample_from_datasets` draws from
the strata with probability proportional to (size x weight). No file is
duplicated on disk, and the epoch length stays whatever `steps_per_epoch` says.

>>> f = positive_factors(targets, known, OversampleConfig(enabled=True), names)
>>> w = sample_weights(targets, known, f)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfvision.config import OversampleConfig
from tfvision.errors import DataError, did_you_mean


def positive_rates(targets: np.ndarray, known: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Expected share of positives among known labels per class, under sampling `weights`."""
    w = np.ones(len(targets)) if weights is None else weights
    pos = ((targets >= 0.5) & (known > 0)).astype(np.float64)
    return (w[:, None] * pos).sum(0) / np.maximum((w[:, None] * (known > 0)).sum(0), 1e-12)


def positive_factors(targets, known, cfg: OversampleConfig, class_names: list[str]) -> np.ndarray:
    """Sampling factor for the positives of each class.

    A rare class (positive rate p below `rare_below`) gets f = t(1-p) / (p(1-t)),
    which brings its rate to the target t when its positives overlap no other
    boosted class; capped at `max_factor`. `factors` overrides per class.

    Raises:
        DataError: a class in `factors` that the data does not have.
    """
    p = positive_rates(targets, known)
    t = cfg.target_rate
    f = np.ones(len(p))
    rare = (p > 0) & (p < cfg.rare_below) & (p < t)
    f[rare] = np.minimum(t * (1 - p[rare]) / (p[rare] * (1 - t)), cfg.max_factor)
    for name, value in cfg.factors.items():
        if name not in class_names:
            raise DataError(f"data.oversample.factors.{name}: no such class in the data"
                            f"{did_you_mean(name, class_names, known='classes')}")
        f[class_names.index(name)] = float(value)
    return f


def sample_weights(targets, known, factors: np.ndarray) -> np.ndarray:
    pos = (targets >= 0.5) & (known > 0)
    return np.maximum(1.0, (pos * factors[None, :]).max(axis=1)).astype(np.float64)


def weighted_dataset(columns: dict, weights: np.ndarray, seed: int) -> tf.data.Dataset:
    """Endless dataset of elements drawn in proportion to `weights` (few distinct values)."""
    levels = np.unique(np.round(weights, 6))
    streams, probs = [], []
    for level in levels:
        idx = np.flatnonzero(np.isclose(weights, level))
        part = {k: v[idx] for k, v in columns.items()}
        streams.append(tf.data.Dataset.from_tensor_slices(part).shuffle(len(idx), seed=seed).repeat())
        probs.append(len(idx) * level)
    probs = np.asarray(probs) / np.sum(probs)
    return tf.data.Dataset.sample_from_datasets(streams, weights=probs.tolist(), seed=seed,
                                                stop_on_empty_dataset=False)
