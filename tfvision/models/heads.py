"""Heads and the image-model assembly shared by every image-level task.

    image (0..255, any size) -> ImageNormalization -> backbone -> pool -> head -> logits

The model outputs logits in float32 (also under mixed precision): losses are
computed from logits for stability, and softmax/sigmoid with the fitted
temperature is applied by evaluate, predict and the export wrapper.
"""

from __future__ import annotations

import keras

from tfvision.config import HeadConfig
from tfvision.models.backbones import InputNorm, build_backbone, get_spec
from tfvision.models.layers import ImageNormalization


def head(features, num_outputs: int, cfg: HeadConfig):
    """Linear, or MLP (hidden -> ReLU -> Dropout)*, then Dense to logits."""
    x = features
    if cfg.type == "mlp":
        for i, units in enumerate(cfg.hidden):
            x = keras.layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
            x = keras.layers.Dropout(cfg.dropout, name=f"head_dropout{i}")(x)
    elif cfg.dropout > 0:
        x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    return keras.layers.Dense(num_outputs, dtype="float32", name="logits")(x)


def input_norm(backbone: str, normalization: str, channels: int, stats=None) -> InputNorm:
    """The normalisation constants for `channels` channels.

    imagenet: what the backbone's ImageNet weights expect; channels beyond RGB
    use the mean of the RGB constants (their kernels are initialised the same way).
    """
    if normalization == "none":
        return InputNorm((0.0,) * channels, (1.0,) * channels)
    if normalization == "dataset":
        mean, std = stats
        return InputNorm(tuple(mean), tuple(std))
    if backbone == "unet":  # the classic U-Net has no pretrained statistics: centre on mid-grey
        return InputNorm((127.5,) * channels, (127.5,) * channels)
    base = get_spec(backbone).norm
    if channels == 3:
        return base
    avg_m, avg_s = sum(base.mean) / 3, sum(base.std) / 3
    if channels == 1:
        return InputNorm((avg_m,), (avg_s,))
    return InputNorm(tuple(base.mean) + (avg_m,) * (channels - 3), tuple(base.std) + (avg_s,) * (channels - 3), base.bgr)


def build_image_model(
    backbone: str, channels: int, num_outputs: int, weights, head_cfg: HeadConfig, norm: InputNorm,
    name: str = "tfvision", clahe: float | None = None,
) -> keras.Model:
    """Image-level model (classification, multi-label) accepting any image size.

    `clahe` (a clip limit) adds Keras's CLAHE layer before normalisation, so the
    contrast enhancement X-rays often want is part of the model and its exports.
    """
    inputs = keras.Input((None, None, channels), name="image")
    x = inputs
    if clahe:
        x = keras.layers.ContrastLimitedAdaptiveHistogramEqualization(
            value_range=(0, 255), clip_limit=clahe, name="clahe")(x)
    x = ImageNormalization(norm.mean, norm.std, norm.bgr and channels >= 3, name="normalize")(x)
    net = build_backbone(backbone, (None, None, channels), weights)
    x = net(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head(x, num_outputs, head_cfg), name=name)
