"""Second-stage heads on ROI-Aligned crops: the box head and the mask head.

Both fold the ROI axis into the batch axis, so a head is a handful of dense or
convolutional layers over [B * K, ...] with no loop over ROIs. Outputs are
float32 (also under mixed precision): they feed losses and box decoding.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfvision")
class BoxHead(keras.layers.Layer):
    """Flatten -> (Dense + ReLU) x num_fcs -> class logits [B, K, C + 1] and deltas [B, K, C + 1, 4].

    Slot 0 is the background; its deltas exist (Model Garden's layout) but are never trained.
    """

    def __init__(self, num_classes: int, num_fcs: int = 2, fc_dims: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.num_fcs, self.fc_dims = num_classes, num_fcs, fc_dims
        self.fcs = [keras.layers.Dense(fc_dims, activation="relu", name=f"box_fc{i}") for i in range(num_fcs)]
        self.logits = keras.layers.Dense(num_classes + 1, dtype="float32", name="box_class",
                                         kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))
        self.deltas = keras.layers.Dense(4 * (num_classes + 1), dtype="float32", name="box_delta",
                                         kernel_initializer=keras.initializers.RandomNormal(stddev=0.001))

    def build(self, input_shape):
        width = input_shape[2] * input_shape[3] * input_shape[4]
        for fc in self.fcs:
            fc.build((None, width))
            width = self.fc_dims
        self.logits.build((None, width))
        self.deltas.build((None, width))

    def call(self, crops):
        batch, rois = ops.shape(crops)[0], crops.shape[1]
        x = ops.reshape(crops, (batch, rois, -1))
        for fc in self.fcs:
            x = fc(x)
        deltas = ops.reshape(self.deltas(x), (batch, rois, self.num_classes + 1, 4))
        return self.logits(x), deltas

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "num_fcs": self.num_fcs,
                "fc_dims": self.fc_dims}


@keras.saving.register_keras_serializable(package="tfvision")
class MaskHead(keras.layers.Layer):
    """(3x3 conv + ReLU) x num_convs -> 2x2 stride-2 deconv + ReLU -> 1x1 conv to C mask logits.

    [B, K, s, s, F] crops give [B, K, 2s, 2s, C] class-specific logits (28 x 28 from 14 x 14).
    """

    def __init__(self, num_classes: int, num_convs: int = 4, filters: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.num_convs, self.filters = num_classes, num_convs, filters
        self.convs = [keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"mask_conv{i}")
                      for i in range(num_convs)]
        self.upsample = keras.layers.Conv2DTranspose(filters, 2, strides=2, activation="relu", name="mask_deconv")
        self.logits = keras.layers.Conv2D(num_classes, 1, dtype="float32", name="mask_logits")

    def build(self, input_shape):
        size, channels = input_shape[2], input_shape[4]
        for conv in self.convs:
            conv.build((None, size, size, channels))
            channels = self.filters
        self.upsample.build((None, size, size, channels))
        self.logits.build((None, 2 * size, 2 * size, self.filters))

    def call(self, crops):
        batch, rois, size = ops.shape(crops)[0], crops.shape[1], crops.shape[2]
        x = ops.reshape(crops, (-1, size, size, crops.shape[4]))
        for conv in self.convs:
            x = conv(x)
        x = self.logits(self.upsample(x))
        return ops.reshape(x, (batch, rois, 2 * size, 2 * size, self.num_classes))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "num_convs": self.num_convs,
                "filters": self.filters}


def class_masks(mask_logits, classes):
    """Each ROI's [B, K, s, s] logits for its class (`classes` [B, K] int, 0-based foreground)."""
    channel = ops.one_hot(ops.cast(classes, "int32"), mask_logits.shape[-1], dtype=mask_logits.dtype)
    return ops.sum(mask_logits * channel[:, :, None, None, :], axis=-1)
