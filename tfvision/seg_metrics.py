"""Segmentation metrics: per-class Dice and IoU, as Keras metrics and for numpy reports.

Both accumulate per-class intersection and sizes over every pixel seen (the
whole epoch), then divide once: the dataset-level Dice/IoU of each class, not
a mean of per-batch values.

Absent classes: a class that appears in neither truth nor prediction has no
defined Dice or IoU (0/0). Reporting 1 would reward a model for classes the
data never tested, and 0 would punish it; the Keras metrics give NaN for such a
class (`Segmentation.score` reports None), and the macro means skip it. These
metrics are the one Dice/IoU: training logs them and evaluation reads them.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tfvision.seg_losses import one_hot_and_valid


def _count_dtype() -> str:
    """float64: float32 counts stop being exact past 2**24 pixels (~64 CT slices of 512x512).

    JAX keeps no float64 unless ``jax_enable_x64`` is set (off by default: JAX 0.10 truncates a
    float64 array to float32 with a warning, under a Keras variable that says float64), so there
    the counts are float32, exact up to 2**24 pixels per class and nearly so beyond.
    """
    if keras.backend.backend() == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"


class _OverlapScore(keras.metrics.Metric):
    """Accumulates per-class |P & T|, |P| and |T| from logits and integer (or one-hot) masks."""

    def __init__(self, num_classes, class_index=None, ignore_index=None, include_background=True,
                 name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.class_index = None if class_index is None else int(class_index)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.include_background = bool(include_background)
        shape = (self.num_classes,)
        c = _count_dtype()
        self.intersection = self.add_variable(shape, "zeros", name="intersection", dtype=c)
        self.predicted = self.add_variable(shape, "zeros", name="predicted", dtype=c)
        self.actual = self.add_variable(shape, "zeros", name="actual", dtype=c)

    def update_state(self, y_true, y_pred, sample_weight=None):
        target, valid = one_hot_and_valid(y_true, self.num_classes, self.ignore_index)
        pred = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes, dtype="float32") * valid
        if sample_weight is not None:  # one weight per image
            w = ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1, 1, 1))
            target, pred = target * w, pred * w

        def total(x):
            return ops.cast(ops.sum(x, axis=(0, 1, 2)), self.intersection.dtype)

        self.intersection.assign_add(total(target * pred))
        self.predicted.assign_add(total(pred))
        self.actual.assign_add(total(target))

    def per_class(self):
        """Per-class values [K]; NaN where the class was never seen nor predicted."""
        raise NotImplementedError

    def result(self):
        scores = self.per_class()
        if self.class_index is not None:
            return ops.cast(scores[self.class_index], "float32")
        if not self.include_background:
            scores = scores[1:]
        present = ops.logical_not(ops.isnan(scores))
        mean = ops.sum(ops.where(present, scores, 0.0)) / ops.sum(ops.cast(present, self.intersection.dtype))
        return ops.cast(mean, "float32")

    def reset_state(self):
        for v in (self.intersection, self.predicted, self.actual):
            v.assign(ops.zeros(v.shape, v.dtype))  # ops.zeros_like(v) fails on a variable under JAX 0.10

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "class_index": self.class_index, "ignore_index": self.ignore_index,
                "include_background": self.include_background}


def _ratio(num, den):
    return ops.where(den > 0, num / ops.maximum(den, 1e-12), float("nan"))


@keras.saving.register_keras_serializable(package="tfvision")
class DiceScore(_OverlapScore):
    """Dice (F1) of argmax predictions, macro over present classes or of `class_index`.

    >>> m = DiceScore(num_classes=2)
    >>> m.update_state(np.array([[[[0], [1]]]]), np.array([[[[5.0, 0.0], [5.0, 0.0]]]]))
    >>> float(m.result())  # class 0: 2*1/(2+1); class 1: 0
    0.333...

    Args:
        num_classes: K.
        class_index: None for the macro mean, or the one class to report.
        ignore_index: a label whose pixels are left out.
        include_background: whether class 0 enters the macro mean.
    """

    def __init__(self, num_classes, class_index=None, ignore_index=None, include_background=True,
                 name="dice", **kwargs):
        super().__init__(num_classes, class_index, ignore_index, include_background, name=name, **kwargs)

    def per_class(self):
        return _ratio(2.0 * self.intersection, self.predicted + self.actual)


@keras.saving.register_keras_serializable(package="tfvision")
class IoUScore(_OverlapScore):
    """IoU (Jaccard) of argmax predictions, macro over present classes or of `class_index`.

    Like `keras.metrics.MeanIoU`, but from logits, with per-class results and
    absent classes left out of the mean rather than counted as 0.

    Args: as in `DiceScore`.
    """

    def __init__(self, num_classes, class_index=None, ignore_index=None, include_background=True,
                 name="iou", **kwargs):
        super().__init__(num_classes, class_index, ignore_index, include_background, name=name, **kwargs)

    def per_class(self):
        return _ratio(self.intersection, self.predicted + self.actual - self.intersection)


def per_class_metrics(num_classes: int, class_names=None, ignore_index=None,
                      include_background=True) -> list[keras.metrics.Metric]:
    """Macro ``dice`` and ``iou`` plus one Dice and one IoU per class (``dice_<name>``, ``iou_<name>``)."""
    names = class_names or [str(k) for k in range(num_classes)]
    out = [DiceScore(num_classes, None, ignore_index, include_background),
           IoUScore(num_classes, None, ignore_index, include_background)]
    for k, n in enumerate(names):
        out.append(DiceScore(num_classes, k, ignore_index, name=f"dice_{n}"))
        out.append(IoUScore(num_classes, k, ignore_index, name=f"iou_{n}"))
    return out


def macro(values, include_background=True) -> float | None:
    """Mean over the classes that have a value (None when none has)."""
    present = [v for v in values[0 if include_background else 1:] if v is not None]
    return float(np.mean(present)) if present else None
