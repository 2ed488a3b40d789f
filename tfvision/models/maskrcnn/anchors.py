"""Anchors for every pyramid level, fixed at build time by the static image size.

keras-cv 0.9's `AnchorGenerator` lays them out as Model Garden does: centres at
``(i + 0.5) * stride``, and per level in (row, column, anchor) order, which is
the order the RPN head's ``[B, h, w, A * k]`` outputs flatten to.

>>> anchor_counts((64, 64), MaskRCNNConfig(max_level=4))
[768, 192, 48]
"""

from __future__ import annotations

import math

import numpy as np

from tfvision.models.maskrcnn.config import MaskRCNNConfig


def anchor_counts(image_size: tuple[int, int], cfg: MaskRCNNConfig) -> list[int]:
    """Anchors per level, from P{min_level} up: ceil(H / s) * ceil(W / s) * A, s = 2 ** level."""
    height, width = image_size
    return [math.ceil(height / 2**level) * math.ceil(width / 2**level) * cfg.anchors_per_location
            for level in range(cfg.min_level, cfg.max_level + 1)]


def anchor_boxes(image_size: tuple[int, int], cfg: MaskRCNNConfig) -> np.ndarray:
    """[N, 4] float32 (x0, y0, x1, y1) pixel-edge anchors, levels concatenated from the lowest."""
    import keras_cv  # heavy import (about 2 s): only where anchors are built

    strides = {f"P{level}": 2**level for level in range(cfg.min_level, cfg.max_level + 1)}
    generator = keras_cv.layers.AnchorGenerator(
        bounding_box_format="xyxy",
        sizes={name: cfg.anchor_size * stride for name, stride in strides.items()},
        scales=[2 ** (i / cfg.num_scales) for i in range(cfg.num_scales)],
        aspect_ratios=list(cfg.aspect_ratios),
        strides=strides,
        clip_boxes=False,  # Model Garden keeps anchors whole; matching by IoU handles the border
    )
    per_level = generator(image_shape=(*image_size, 3))
    return np.concatenate([np.asarray(per_level[name], np.float32) for name in strides], axis=0)
