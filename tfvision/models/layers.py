"""Custom layers. Every one is Keras-serializable and reloads with safe_mode on."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfvision")
class ImageNormalization(keras.layers.Layer):
    """(x[..., order] - mean) / std with constants baked into the graph.

    Constants are plain Python lists in the config rather than layer weights:
    tf2onnx 1.17 drops the non-trainable weights of Keras `Normalization` and
    ONNX Runtime then asks for them as inputs ("Required inputs ... are missing").

    >>> layer = ImageNormalization(mean=[127.5] * 3, std=[127.5] * 3)
    >>> layer(np.full((1, 2, 2, 3), 255.0)).numpy().max()
    1.0

    Args:
        mean: per-channel mean on the 0..255 scale.
        std: per-channel standard deviation on the 0..255 scale.
        bgr: reverse RGB to BGR first (Caffe-style ResNet weights).
    """

    def __init__(self, mean, std, bgr=False, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.bgr = bool(bgr)

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.bgr:
            x = ops.flip(x, axis=-1)
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        inv = ops.convert_to_tensor([1.0 / s for s in self.std], dtype=self.compute_dtype)
        return (x - mean) * inv

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "bgr": self.bgr}
