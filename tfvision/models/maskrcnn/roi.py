"""Second-stage ROIs: sampling them against ground truth, ROI-Align, and mask targets.

ROI-Align is written here: keras-cv 0.9's `multilevel_crop_and_resize` (behind
its private `_ROIAligner`) gathers with ``ops.take(features, indices)`` and no
axis, which Keras 3 reads as NumPy's take on the flattened array, so it fails
("Input to reshape is a tensor with 12544 values, but the requested shape has
200704") for any feature depth above 1. Sampling follows Model Garden: the
ground-truth boxes join the proposals, IoU >= 0.5 is foreground and [0, 0.5)
background, 512 per image of which at most a quarter foreground, listed
foreground first.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from tfvision.models.maskrcnn import box_coding, sampling
from tfvision.models.maskrcnn.config import MaskRCNNConfig


def sample_rois(rois, roi_valid, gt_boxes, gt_classes, gt_valid, cfg: MaskRCNNConfig, seed):
    """Sample `cfg.roi_samples` ROIs per image and their box-head targets.

    Args:
        rois: [B, R, 4] proposals; roi_valid: [B, R] bool.
        gt_boxes: [B, M, 4]; gt_classes: [B, M] int, 0-based; gt_valid: [B, M] bool.

    Returns:
        dict: ``rois`` [B, S, 4]; ``class`` [B, S] int32 (0 background, c + 1 for
        class c); ``class_weight`` [B, S] (1 where sampled); ``box`` [B, S, 4]
        deltas and ``box_weight`` [B, S] (1 on foreground); ``matched`` [B, S] the
        ground-truth column of each ROI. Foreground ROIs come first.
    """
    candidates = ops.concatenate([ops.cast(rois, "float32"), ops.cast(gt_boxes, "float32")], axis=1)
    candidate_valid = ops.concatenate([roi_valid, gt_valid], axis=1)
    iou = box_coding.pairwise_iou(candidates, gt_boxes, gt_valid)
    iou = ops.where(ops.expand_dims(candidate_valid, -1), iou, -1.0)
    matched, positive, negative = sampling.match(iou, cfg.roi_positive_iou, cfg.roi_positive_iou,
                                                 low_quality=False)
    # Random keys for the proposals only. Ground-truth boxes rank above every proposal, in
    # their given order (keys 3, 2.5, 2.33, ...), so the draw does not depend on how much
    # padding follows them and ties cannot admit more positives than asked for.
    batch, num_rois, num_gt = ops.shape(rois)[0], rois.shape[1], gt_boxes.shape[1]
    gt_key = 2.0 + 1.0 / (1.0 + ops.arange(num_gt, dtype="float32"))
    key = ops.concatenate([sampling.random_keys((batch, num_rois), seed),
                           ops.broadcast_to(gt_key[None], (batch, num_gt))], axis=1)
    chosen_positive, chosen_negative = sampling.balanced_sample(
        positive, negative, cfg.roi_samples, cfg.roi_positive_fraction, key)
    # top_k keeps the lower index first among equal values: foreground, then background.
    order = ops.cast(chosen_positive, "float32") * 2.0 + ops.cast(chosen_negative, "float32")
    rank, index = ops.top_k(order, min(cfg.roi_samples, candidates.shape[1]))

    def pick(values):
        if len(values.shape) == 3:
            return ops.take_along_axis(values, ops.expand_dims(index, -1), axis=1)
        return ops.take_along_axis(values, index, axis=1)

    sampled_rois, sampled_matched = pick(candidates), pick(matched)
    foreground = rank == 2.0
    gt_for_roi = ops.take_along_axis(ops.cast(gt_boxes, "float32"), ops.expand_dims(sampled_matched, -1), axis=1)
    deltas = box_coding.encode(gt_for_roi, sampled_rois, cfg.roi_box_weights)
    classes = ops.take_along_axis(ops.cast(gt_classes, "int32"), sampled_matched, axis=1) + 1
    return {
        "rois": sampled_rois,
        "class": ops.where(foreground, classes, 0),
        "class_weight": ops.cast(rank > 0.0, "float32"),
        "box": ops.where(ops.expand_dims(foreground, -1), deltas, 0.0),
        "box_weight": ops.cast(foreground, "float32"),
        "matched": sampled_matched,
    }


def roi_align(levels: list, boxes, cfg: MaskRCNNConfig, crop: int):
    """[B, K, crop, crop, F] features of boxes [B, K, 4] xyxy, from the pyramid `levels`
    (the list from P{min_level}).

    Each box reads one level, FPN's ``floor(4 + log2(sqrt(area) / 224))`` clamped to
    `cfg.crop_levels`, and averages 2 x 2 bilinear samples per bin (the Mask R-CNN
    paper's ROIAlign), with feature cell j centred on pixel (j + 0.5) * stride.
    Every box is cropped on every level and the wrong levels are masked out: four
    small crops cost less than a gather by level, and keep the shapes static.

    A one-cell edge-replicated border makes samples within a cell of the map's edge
    read the edge value, as Detectron's ROIAlign does; `crop_and_resize` alone would
    read 0 for any sample outside the outer cell centres (16 px at P5).
    """
    boxes = ops.cast(boxes, "float32")
    num_rois = boxes.shape[1]
    flat = ops.reshape(boxes, (-1, 4))
    area = (flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1])
    level = ops.floor(4.0 + ops.log2(ops.sqrt(ops.maximum(area, 1e-6)) / 224.0))
    level = ops.clip(level, cfg.crop_levels[0], cfg.crop_levels[-1])
    image_of_box = ops.repeat(ops.arange(ops.shape(boxes)[0], dtype="int32"), num_rois)
    crops = 0.0
    for lv in cfg.crop_levels:  # three or four pyramid levels, not ROIs
        features = levels[lv - cfg.min_level]
        bordered = ops.pad(features, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="symmetric")
        samples = tf.image.crop_and_resize(
            bordered, crop_boxes(flat / 2.0**lv + 1.0, tuple(bordered.shape[1:3]), 2 * crop), image_of_box,
            (2 * crop, 2 * crop))
        pooled = ops.average_pool(samples, 2, strides=2)
        crops = crops + ops.where((level == lv)[:, None, None, None], pooled, 0.0)
    crops = ops.cast(crops, levels[0].dtype)
    return ops.reshape(crops, (-1, num_rois, crop, crop, crops.shape[-1]))


def crop_boxes(boxes, source_size, crop_size: int | tuple[int, int]):
    """`tf.image.crop_and_resize` boxes that sample the centres of a crop's cells.

    crop_and_resize puts its first and last samples *on* the box's normalised
    corners; a pixel-edge box [x0, x1) split into n cells wants them at the
    centres of the first and last cells, in index coordinates (centre of pixel j
    at j). Returns [..., 4] (y0, x0, y1, x1) normalised by (size - 1).

    Args:
        boxes: [..., 4] xyxy in the source's pixel-edge coordinates.
        source_size: (height, width) of the source.
        crop_size: cells per side, or (rows, columns).
    """
    rows, cols = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    height, width = source_size

    def ends(start, stop, cells, size):
        step = (stop - start) / cells
        return ((start + 0.5 * step - 0.5) / max(size - 1, 1), (stop - 0.5 * step - 0.5) / max(size - 1, 1))

    (top, bottom), (left, right) = ends(y0, y1, rows, height), ends(x0, x1, cols, width)
    return ops.stack([top, left, bottom, right], axis=-1)


def mask_targets(gt_masks, boxes, matched, image_size, mask_size: int):
    """Binary [B, K, mask_size, mask_size] targets: each ROI's matched instance mask cropped to the ROI.

    Args:
        gt_masks: [B, M, h, w] instance masks covering the whole image (any resolution).
        boxes: [B, K, 4] ROIs in image pixels; matched: [B, K] ground-truth columns.
    """
    _, num_gt, mask_h, mask_w = gt_masks.shape  # the batch may be unknown inside fit()
    scale = ops.convert_to_tensor([mask_w / image_size[1], mask_h / image_size[0]] * 2, "float32")
    crops = crop_boxes(ops.reshape(ops.cast(boxes, "float32") * scale, (-1, 4)), (mask_h, mask_w), mask_size)
    first_instance = ops.arange(ops.shape(boxes)[0], dtype="int32")[:, None] * num_gt
    instance = ops.reshape(ops.cast(matched, "int32") + first_instance, (-1,))
    # crop_and_resize reads integer images (not bool): the pipeline's uint8 masks go in as they are,
    # since a float32 copy of every [B, M, H, W] mask was 4x the batch's largest tensor.
    masks = ops.cast(gt_masks, "uint8") if str(gt_masks.dtype) == "bool" else gt_masks
    flat = ops.reshape(masks, (-1, mask_h, mask_w, 1))
    resized = tf.image.crop_and_resize(flat, crops, instance, (mask_size, mask_size))
    return ops.reshape(ops.cast(resized >= 0.5, "float32"), (-1, boxes.shape[1], mask_size, mask_size))
