"""Feature pyramid (P2..P6) on a registered backbone.

The backbone registry gives one output per backbone (its last feature map), so
the multi-scale features C2..C5 are taken here by one rule per backbone
family: C_l is the output of the *last block-ending layer* whose feature map is
2**l times smaller than the image, where `FEATURE_LAYERS` says which layer
names end a block. The rule needs a static image size divisible by
2**max_level, which Mask R-CNN needs anyway.

- ResNet50: ``conv{l}_block*_out`` (C2 = conv2_block3_out ... C5 = conv5_block3_out).
- EfficientNetV2: the residual ``block*_add`` layers and ``top_activation``. Without
  the name filter the last stride-8 layer is ``block4a_expand_activation``, the next
  block's expansion, four times wider and before its strided convolution.
- small_cnn: ``block*_relu2``, giving C2 and C3 only (it has no stride 16 or 32).
- ConvNeXt is not supported yet: in keras.applications its residual add is a Keras
  op, not a layer, so no layer outputs a block; the registry must expose it.

Levels above the deepest C are subsampled from the level below (the FPN
paper's P6), so small_cnn still gets P2..P6.
"""

from __future__ import annotations

import re

import keras

from tfvision.models.backbones import build_backbone
from tfvision.models.maskrcnn.config import MaskRCNNConfig

# Registered-name prefix -> regex (searched) of the layer names that end a block.
FEATURE_LAYERS = {
    "resnet50": r"_out$",
    "efficientnetv2_": r"_add$|^top_activation$",
    "small_cnn": r"_relu2$",
}


def feature_pattern(backbone_name: str) -> str:
    for prefix, pattern in FEATURE_LAYERS.items():
        if backbone_name.startswith(prefix):
            return pattern
    raise ValueError(f"backbone {backbone_name!r}: no rule for its multi-scale features; "
                     f"Mask R-CNN supports {sorted(FEATURE_LAYERS)}")


def backbone_levels(backbone: keras.Model, image_size: tuple[int, int], pattern: str) -> dict[int, keras.layers.Layer]:
    """{level: the last layer matching `pattern` with stride 2**level}, for the levels 2..5 found."""
    height, width = image_size
    found = {}
    for layer in backbone.layers:
        if not re.search(pattern, layer.name):
            continue
        shape = getattr(layer.output, "shape", None)
        if shape is None or len(shape) != 4:
            continue
        for level in range(2, 6):
            if tuple(shape[1:3]) == (height // 2**level, width // 2**level):
                found[level] = layer  # later layers overwrite: the last one wins
    return found


def build_pyramid(backbone_name: str, image_size: tuple[int, int], channels: int, weights,
                  cfg: MaskRCNNConfig) -> tuple[keras.Model, keras.Model]:
    """(pyramid, backbone): pyramid maps a normalised image to [P_min, ..., P_max].

    The backbone is returned too; its multi-output view inside the pyramid is also named
    "backbone", the name staged training and export look up.
    """
    stride = 2**cfg.max_level
    if image_size[0] % stride or image_size[1] % stride:
        raise ValueError(f"image_size {image_size}: both sides must be multiples of 2**max_level = {stride}")
    pattern = feature_pattern(backbone_name)
    backbone = build_backbone(backbone_name, (*image_size, channels), weights)
    found = backbone_levels(backbone, image_size, pattern)
    if cfg.min_level not in found:
        raise ValueError(f"backbone {backbone_name!r} has no stride-{2**cfg.min_level} features for "
                         f"P{cfg.min_level}")
    top = max(level for level in found if level <= cfg.max_level)
    levels = list(range(cfg.min_level, top + 1))
    features = keras.Model(backbone.inputs, [found[level].output for level in levels], name="backbone")

    image = keras.Input((*image_size, channels), name="normalized_image")
    c = dict(zip(levels, features(image), strict=True))
    lateral = {level: keras.layers.Conv2D(cfg.fpn_filters, 1, name=f"fpn_lateral{level}")(c[level])
               for level in levels}
    merged = {top: lateral[top]}
    for level in reversed(levels[:-1]):
        upsampled = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"fpn_up{level}")(merged[level + 1])
        merged[level] = keras.layers.Add(name=f"fpn_add{level}")([lateral[level], upsampled])
    # The 3x3 output convolutions remove the aliasing of nearest upsampling (FPN paper).
    pyramid = {level: keras.layers.Conv2D(cfg.fpn_filters, 3, padding="same", name=f"fpn_out{level}")(merged[level])
               for level in levels}
    for level in range(top + 1, cfg.max_level + 1):
        pyramid[level] = keras.layers.MaxPooling2D(1, strides=2, name=f"fpn_subsample{level}")(pyramid[level - 1])
    outputs = [pyramid[level] for level in range(cfg.min_level, cfg.max_level + 1)]
    return keras.Model(image, outputs, name="pyramid"), backbone
