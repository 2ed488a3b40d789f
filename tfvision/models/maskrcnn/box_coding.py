"""Box deltas and IoU for both stages, on `keras.utils.bounding_boxes`, always in float32.

Boxes are (x0, y0, x1, y1) pixel-edge coordinates everywhere in this package,
the convention of `tfvision.data.instance_annotations.boxes_from_masks`.
Deltas are Faster R-CNN's (dy, dx, log dh, log dw) times per-stage weights
(Model Garden's ``weights``; Keras calls their inverse ``variance``).

>>> anchors = np.array([[0.0, 0.0, 10.0, 20.0]])
>>> deltas = encode(np.array([[[1.0, 2.0, 9.0, 24.0]]]), anchors, (1, 1, 1, 1))
>>> np.allclose(decode(deltas, anchors, (1, 1, 1, 1)), [[[1.0, 2.0, 9.0, 24.0]]])
True
"""

from __future__ import annotations

import math

from keras import ops
from keras.utils import bounding_boxes

# Largest log-scale a delta may apply (Detectron's log(1000 / 16)): an untrained head's
# large outputs would otherwise overflow exp() and put inf boxes into NMS.
MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def _variance(weights) -> list[float]:
    return [1.0 / w for w in weights]


def encode(boxes, anchors, weights):
    """Deltas [..., 4] that turn `anchors` into `boxes` (both xyxy, broadcastable)."""
    return bounding_boxes.encode_box_to_deltas(
        ops.cast(anchors, "float32"), ops.cast(boxes, "float32"), anchor_format="xyxy",
        box_format="xyxy", variance=_variance(weights))


def decode(deltas, anchors, weights, image_size=None):
    """Boxes [..., 4] xyxy from deltas; scales clamped, and clipped to the image when given."""
    deltas = ops.cast(deltas, "float32")
    scale_cap = MAX_LOG_SCALE / ops.convert_to_tensor(_variance(weights)[2:], "float32")
    deltas = ops.concatenate([deltas[..., :2], ops.minimum(deltas[..., 2:], scale_cap)], axis=-1)
    boxes = bounding_boxes.decode_deltas_to_boxes(
        ops.cast(anchors, "float32"), deltas, anchor_format="xyxy", box_format="xyxy",
        variance=_variance(weights))
    if image_size is None:
        return boxes
    height, width = image_size
    upper = ops.convert_to_tensor([width, height, width, height], "float32")
    return ops.clip(boxes, 0.0, upper)


def pairwise_iou(boxes, gt_boxes, gt_valid):
    """IoU [B, N, M] of boxes [B, N, 4] (or [N, 4]) with gt [B, M, 4]; -1 for padded gt.

    The -1 keeps a padded column below every threshold and out of every argmax.
    """
    iou = bounding_boxes.compute_iou(ops.cast(boxes, "float32"), ops.cast(gt_boxes, "float32"), "xyxy")
    return ops.where(ops.expand_dims(gt_valid, 1), iou, -1.0)
