"""Inference: final boxes from the box head, per-class NMS, and masks pasted at image size.

keras-cv 0.9's `MultiClassNonMaxSuppression` is not used: it gives every class
the same box ([B, N, 1, 4] into combined NMS), while Mask R-CNN's box head
regresses one box per class. `tf.image.combined_non_max_suppression` is called
directly with [B, K, C, 4] boxes.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from tfvision.models.maskrcnn import box_coding
from tfvision.models.maskrcnn.config import MaskRCNNConfig
from tfvision.models.maskrcnn.roi import crop_boxes


def detections(rois, roi_valid, class_logits, box_deltas, image_size, cfg: MaskRCNNConfig) -> dict:
    """Up to `cfg.max_detections` per image, all float32.

    Args:
        rois: [B, K, 4] proposals; roi_valid: [B, K] bool.
        class_logits: [B, K, C + 1]; box_deltas: [B, K, C + 1, 4].

    Returns:
        dict: ``boxes`` [B, D, 4] xyxy, ``scores`` [B, D], ``classes`` [B, D] int32
        (0-based, -1 in empty slots), ``num_detections`` [B] int32.
    """
    scores = ops.softmax(ops.cast(class_logits, "float32"), axis=-1)[..., 1:]
    scores = ops.where(ops.expand_dims(roi_valid, -1), scores, 0.0)  # padded proposals detect nothing
    boxes = box_coding.decode(box_deltas[:, :, 1:], ops.expand_dims(rois, 2), cfg.roi_box_weights, image_size)
    # combined NMS reads (y0, x0, y1, x1).
    nms_boxes, nms_scores, nms_classes, count = tf.image.combined_non_max_suppression(
        ops.take(boxes, [1, 0, 3, 2], axis=-1), scores,
        max_output_size_per_class=cfg.max_detections, max_total_size=cfg.max_detections,
        iou_threshold=cfg.detection_nms_iou, score_threshold=cfg.detection_score, clip_boxes=False)
    filled = ops.arange(cfg.max_detections)[None, :] < ops.expand_dims(count, -1)
    return {
        "boxes": ops.take(nms_boxes, [1, 0, 3, 2], axis=-1),
        "scores": nms_scores,
        "classes": ops.where(filled, ops.cast(nms_classes, "int32"), -1),
        "num_detections": ops.cast(count, "int32"),
    }


def paste_masks(masks, boxes, image_size):
    """[B, D, s, s] mask probabilities in their boxes -> [B, D, H, W] probabilities on the image.

    The crop in reverse: each image pixel samples the box's mask bilinearly at its
    own centre, and pixels outside the box get 0. One `crop_and_resize` for all
    detections; the "box" it crops is the image's extent in mask-cell coordinates.
    """
    batch, count, size = masks.shape[0] or ops.shape(masks)[0], masks.shape[1], masks.shape[2]
    height, width = image_size  # ints, or int32 scalars (the serving graph: each request's own size)
    h, w = ops.cast(height, "float32"), ops.cast(width, "float32")
    boxes = ops.reshape(ops.cast(boxes, "float32"), (-1, 4))
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    cells_x = size / ops.maximum(x1 - x0, 1e-3)
    cells_y = size / ops.maximum(y1 - y0, 1e-3)
    image_in_cells = ops.stack([-x0 * cells_x, -y0 * cells_y, (w - x0) * cells_x, (h - y0) * cells_y], axis=-1)
    crops = crop_boxes(image_in_cells, (size, size), (h, w))
    flat = ops.reshape(ops.cast(masks, "float32"), (-1, size, size, 1))
    pasted = tf.image.crop_and_resize(flat, crops, ops.arange(ops.shape(flat)[0], dtype="int32"),
                                      (height, width), extrapolation_value=0.0)
    return ops.reshape(pasted, (batch, count, height, width))
