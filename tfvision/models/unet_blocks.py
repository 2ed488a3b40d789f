"""U-Net building blocks: conv blocks, up-sampling, attention gates, aux heads, pad/crop.

Shared by the classic U-Net and the U-Net decoder on a `keras.applications`
encoder (`tfvision.models.unet`). Blocks are functions over Keras tensors made of
stock layers, so a saved model needs only the two small custom layers below.
"""

from __future__ import annotations

import math

import keras
from keras import ops

UPSAMPLING = ("transpose", "bilinear")
NORM_LAYERS = ("batch", "group")


@keras.saving.register_keras_serializable(package="tfvision")
class PadToMultiple(keras.layers.Layer):
    """Zero-pad height and width at the bottom/right up to a multiple of `multiple`.

    Placed after `ImageNormalization`, so the padding is the normalised mean
    intensity, not black. `CropTo` removes it again before the logits, so a
    U-Net with 4 poolings accepts a 40x56 image and returns 40x56 logits.

    >>> PadToMultiple(16)(np.zeros((1, 40, 56, 1))).shape
    TensorShape([1, 48, 64, 1])

    Args:
        multiple: the total down-sampling factor of the network (2**poolings).
    """

    def __init__(self, multiple, **kwargs):
        super().__init__(**kwargs)
        self.multiple = int(multiple)

    def call(self, x):
        shape = ops.shape(x)
        pad_h = (-shape[1]) % self.multiple
        pad_w = (-shape[2]) % self.multiple
        return ops.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])

    def compute_output_shape(self, input_shape):
        def up(n):
            return None if n is None else -(-n // self.multiple) * self.multiple

        return (input_shape[0], up(input_shape[1]), up(input_shape[2]), input_shape[3])

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}


@keras.saving.register_keras_serializable(package="tfvision")
class CropTo(keras.layers.Layer):
    """``[x, reference] -> x[:, :H_ref, :W_ref]``: undo `PadToMultiple`.

    >>> CropTo()([np.zeros((1, 48, 64, 2)), np.zeros((1, 40, 56, 1))]).shape
    TensorShape([1, 40, 56, 2])
    """

    def call(self, inputs):
        x, reference = inputs
        x_shape, ref_shape = ops.shape(x), ops.shape(reference)
        return ops.slice(x, [0, 0, 0, 0], [x_shape[0], ref_shape[1], ref_shape[2], x_shape[3]])

    def compute_output_shape(self, input_shapes):
        x, reference = input_shapes
        return (x[0], reference[1], reference[2], x[3])


def norm(filters: int, norm_layer: str, groups: int, name: str) -> keras.layers.Layer:
    """BatchNorm, or GroupNorm for small batches (groups shrink to divide `filters`)."""
    if norm_layer == "batch":
        return keras.layers.BatchNormalization(name=name)
    if norm_layer == "group":
        return keras.layers.GroupNormalization(groups=math.gcd(groups, filters), name=name)
    raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")


def conv_block(x, filters: int, norm_layer: str, groups: int, name: str):
    """(3x3 conv -> norm -> ReLU) x 2, the U-Net unit at every level."""
    for i in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = norm(filters, norm_layer, groups, f"{name}_norm{i}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def upsample(x, filters: int, mode: str, name: str):
    """x2 up: a learned 2x2 transposed conv, or bilinear resize + 1x1 conv (no checkerboard)."""
    if mode == "transpose":
        return keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"{name}_upconv")(x)
    if mode == "bilinear":
        x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_upsample")(x)
        return keras.layers.Conv2D(filters, 1, name=f"{name}_upconv")(x)
    raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {mode!r}")


def attention_gate(skip, gate, name: str):
    """Additive attention gate (Oktay et al. 2018) re-weighting a skip connection.

    ``skip * sigmoid(psi(relu(theta(skip) + phi(gate))))``, one coefficient per
    pixel. The gating signal is the decoder feature already up-sampled to the
    skip's resolution, which keeps the gate exact for any (padded) image size.
    """
    inter = max(int(skip.shape[-1]) // 2, 1)
    theta = keras.layers.Conv2D(inter, 1, use_bias=False, name=f"{name}_theta")(skip)
    phi = keras.layers.Conv2D(inter, 1, name=f"{name}_phi")(gate)
    a = keras.layers.Activation("relu", name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")([theta, phi]))
    alpha = keras.layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_psi")(a)
    return keras.layers.Multiply(name=f"{name}_apply")([skip, alpha])


def decoder_block(x, skip, filters: int, *, upsampling: str, attention: bool, norm_layer: str,
                  groups: int, name: str):
    """Up-sample x2, concatenate the (gated) skip when there is one, conv block."""
    x = upsample(x, filters, upsampling, name)
    if skip is not None:
        if attention:
            skip = attention_gate(skip, x, f"{name}_gate")
        x = keras.layers.Concatenate(name=f"{name}_concat")([x, skip])
    return conv_block(x, filters, norm_layer, groups, name)


def logits_head(x, image, num_classes: int, stride: int = 1, name: str = "logits"):
    """1x1 conv to float32 logits, up-sampled by `stride` (bilinear) and cropped to `image`.

    The main head (stride 1) crops the features first so its last layer is the
    Conv2D named ``logits``; aux heads end in the `CropTo` that carries their name.
    """
    if stride == 1:
        x = CropTo(name=f"{name}_crop")([x, image])
        return keras.layers.Conv2D(num_classes, 1, dtype="float32", name=name)(x)
    x = keras.layers.Conv2D(num_classes, 1, dtype="float32", name=f"{name}_conv")(x)
    x = keras.layers.UpSampling2D(stride, interpolation="bilinear", dtype="float32", name=f"{name}_upsample")(x)
    return CropTo(dtype="float32", name=name)([x, image])
