"""Keras training-time metrics that understand packed multi-label targets."""

from __future__ import annotations

import keras

from tfvision.losses import split_packed


@keras.saving.register_keras_serializable(package="tfvision")
class MaskedAUC(keras.metrics.AUC):
    """ROC-AUC over known labels only: macro over classes, or one class.

    ``y_true`` is ``concat([target, known])``; targets are binarised at 0.5 (a
    smoothed 0.7 counts as positive) and unknown entries get zero weight.
    """

    def __init__(self, num_classes, class_index=None, name="auc", **kwargs):
        kwargs.pop("multi_label", None)
        kwargs.pop("num_labels", None)
        kwargs.pop("from_logits", None)
        super().__init__(
            name=name, multi_label=class_index is None, from_logits=True,
            num_labels=num_classes if class_index is None else None, **kwargs,
        )
        self.num_classes = int(num_classes)
        self.class_index = class_index

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        target, known = split_packed(ops.cast(y_true, "float32"), self.num_classes)
        y_pred = ops.cast(y_pred, "float32")
        if self.class_index is not None:
            i = self.class_index
            target, known, y_pred = target[:, i : i + 1], known[:, i : i + 1], y_pred[:, i : i + 1]
        weight = known
        if sample_weight is not None:
            weight = weight * ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))
        return super().update_state(ops.cast(target >= 0.5, "float32"), y_pred, sample_weight=weight)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "class_index": self.class_index}
