"""The five Mask R-CNN losses, in float32, each averaged over what it is defined on.

Every loss is a weighted mean whose weights are zero on padding, on ignored
anchors and on unsampled ROIs, so padded ground truth counts for nothing. A
mean over zero items is 0 (a crop with no object still trains the
objectness and background class, and gives no box or mask gradient).

- rpn_score: sigmoid cross-entropy over the sampled anchors.
- rpn_box: Huber (delta 1/9) summed over the 4 deltas, mean over sampled positives.
- frcnn_class: softmax cross-entropy over the sampled ROIs.
- frcnn_box: Huber (delta 1) of the target class's deltas, mean over foreground ROIs.
- mask: per-pixel sigmoid cross-entropy of the target class's 28 x 28 mask, mean over
  foreground mask ROIs.
"""

from __future__ import annotations

from keras import ops

from tfvision.models.maskrcnn.config import MaskRCNNConfig


def weighted_mean(values, weights):
    """sum(values * weights) / sum(weights), 0 when every weight is 0."""
    values, weights = ops.cast(values, "float32"), ops.cast(weights, "float32")
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1.0)


def huber(targets, predictions, delta: float):
    """Huber loss summed over the last axis (the 4 box deltas)."""
    error = ops.abs(ops.cast(predictions, "float32") - ops.cast(targets, "float32"))
    quadratic = ops.minimum(error, delta)
    return ops.sum(0.5 * quadratic**2 + delta * (error - quadratic), axis=-1)


def sigmoid_cross_entropy(labels, logits):
    """Elementwise, from logits, stable for large |logits|."""
    logits, labels = ops.cast(logits, "float32"), ops.cast(labels, "float32")
    return ops.maximum(logits, 0.0) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits)))


def rpn_losses(scores, deltas, targets, cfg: MaskRCNNConfig) -> dict:
    score = weighted_mean(sigmoid_cross_entropy(targets["score"], scores), targets["score_weight"])
    box = weighted_mean(huber(targets["box"], deltas, cfg.rpn_huber_delta), targets["box_weight"])
    return {"rpn_score": score, "rpn_box": box}


def frcnn_losses(class_logits, box_deltas, targets, cfg: MaskRCNNConfig) -> dict:
    """class_logits [B, S, C + 1], box_deltas [B, S, C + 1, 4], targets from `roi.sample_rois`."""
    logits = ops.cast(class_logits, "float32")
    labels = ops.one_hot(targets["class"], logits.shape[-1])
    cross_entropy = -ops.sum(labels * ops.log_softmax(logits, axis=-1), axis=-1)
    own_deltas = ops.sum(ops.cast(box_deltas, "float32") * labels[..., None], axis=-2)  # the target class's
    return {
        "frcnn_class": weighted_mean(cross_entropy, targets["class_weight"]),
        "frcnn_box": weighted_mean(huber(targets["box"], own_deltas, cfg.box_huber_delta), targets["box_weight"]),
    }


def mask_loss(mask_logits, mask_targets, weights) -> dict:
    """mask_logits and mask_targets [B, K, s, s] (the target class's logits), weights [B, K]."""
    per_roi = ops.mean(sigmoid_cross_entropy(mask_targets, mask_logits), axis=(2, 3))
    return {"mask": weighted_mean(per_roi, weights)}


def total_loss(losses: dict, cfg: MaskRCNNConfig):
    weights = {"rpn_score": cfg.rpn_score_weight, "rpn_box": cfg.rpn_box_weight,
               "frcnn_class": cfg.frcnn_class_weight, "frcnn_box": cfg.frcnn_box_weight,
               "mask": cfg.mask_weight}
    return sum(weights[name] * value for name, value in losses.items())
