"""Region proposal network: the shared head, its training targets, and the proposals.

Scores are one sigmoid logit per anchor (Model Garden's choice, not Faster
R-CNN's two-way softmax). Everything is batched over images and anchors.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from tfvision.models.maskrcnn import box_coding, sampling
from tfvision.models.maskrcnn.config import MaskRCNNConfig


@keras.saving.register_keras_serializable(package="tfvision")
class RPNHead(keras.layers.Layer):
    """3x3 conv + ReLU shared by all levels, then 1x1 convs to A logits and 4A deltas.

    Call on the list of pyramid levels; returns scores [B, N] and deltas [B, N, 4]
    (float32), levels concatenated in the anchors' order.
    """

    def __init__(self, filters: int, anchors_per_location: int, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.anchors_per_location = filters, anchors_per_location
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name="rpn_conv")
        self.score = keras.layers.Conv2D(anchors_per_location, 1, name="rpn_score",
                                         kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))
        self.delta = keras.layers.Conv2D(4 * anchors_per_location, 1, name="rpn_delta",
                                         kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))

    def build(self, input_shapes):
        first = input_shapes[0]
        self.conv.build(first)
        self.score.build((*first[:-1], self.filters))
        self.delta.build((*first[:-1], self.filters))

    def call(self, levels):
        scores, deltas = [], []
        for features in levels:  # a handful of pyramid levels, not ROIs
            hidden = self.conv(features)
            batch = ops.shape(features)[0]
            scores.append(ops.reshape(ops.cast(self.score(hidden), "float32"), (batch, -1)))
            deltas.append(ops.reshape(ops.cast(self.delta(hidden), "float32"), (batch, -1, 4)))
        return ops.concatenate(scores, axis=1), ops.concatenate(deltas, axis=1)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "anchors_per_location": self.anchors_per_location}


def rpn_targets(anchors, gt_boxes, gt_valid, cfg: MaskRCNNConfig, seed):
    """Training targets for every anchor.

    Args:
        anchors: [N, 4] xyxy.
        gt_boxes: [B, M, 4] xyxy; gt_valid: [B, M] bool, False for padding.
        seed: int or `keras.random.SeedGenerator` for the sampling.

    Returns:
        dict of [B, N] tensors: ``score`` (1 positive, 0 negative), ``score_weight``
        (1 on the sampled anchors), ``box_weight`` (1 on sampled positives), and
        ``box`` [B, N, 4] deltas (zero where ``box_weight`` is 0).
    """
    iou = box_coding.pairwise_iou(anchors, gt_boxes, gt_valid)
    matched, positive, negative = sampling.match(iou, cfg.rpn_positive_iou, cfg.rpn_negative_iou,
                                                 low_quality=True)
    chosen_positive, chosen_negative = sampling.balanced_sample(
        positive, negative, cfg.rpn_samples, cfg.rpn_positive_fraction,
        sampling.random_keys(ops.shape(positive), seed))
    matched_boxes = ops.take_along_axis(ops.cast(gt_boxes, "float32"), ops.expand_dims(matched, -1), axis=1)
    deltas = box_coding.encode(matched_boxes, anchors, cfg.rpn_box_weights)
    box_weight = ops.cast(chosen_positive, "float32")
    return {
        "score": ops.cast(positive, "float32"),
        "score_weight": ops.cast(chosen_positive | chosen_negative, "float32"),
        "box": ops.where(ops.expand_dims(chosen_positive, -1), deltas, 0.0),
        "box_weight": box_weight,
    }


def proposals(scores, deltas, anchors, level_counts: list[int], image_size, cfg: MaskRCNNConfig,
              training: bool):
    """Model Garden's multilevel proposals: per level top-k by score, NMS, top-k; then top-k overall.

    keras-cv 0.9's `ROIGenerator` runs the same steps, but its `NonMaxSuppression`
    fills unused slots by gathering index 0 (copies of the best box, with its
    score) and `ROIGenerator` drops ``num_detections``, so padding looks like real
    proposals; here each slot says whether it holds one.

    Args:
        scores: [B, N] logits; deltas: [B, N, 4]; anchors: [N, 4];
        level_counts: anchors per level (`anchors.anchor_counts`).

    Returns:
        rois [B, K, 4] xyxy clipped to the image, without gradient; valid [B, K] bool.
    """
    pre_k = cfg.rpn_pre_nms_top_k_train if training else cfg.rpn_pre_nms_top_k_test
    post_k = cfg.rpn_post_nms_top_k_train if training else cfg.rpn_post_nms_top_k_test
    boxes = ops.stop_gradient(box_coding.decode(deltas, anchors, cfg.rpn_box_weights, image_size))
    scores = ops.stop_gradient(scores)
    kept_boxes, kept_scores = [], []
    start = 0
    for count in level_counts:  # per pyramid level, as Model Garden: large levels cannot crowd out small
        level_scores, top = ops.top_k(scores[:, start:start + count], min(pre_k, count))
        level_boxes = ops.take_along_axis(boxes[:, start:start + count], ops.expand_dims(top, -1), axis=1)
        start += count
        keep = min(post_k, level_scores.shape[-1])
        # tf.image NMS reads (y0, x0, y1, x1); batched NMS needs padding to a fixed size.
        index, num_valid = tf.image.non_max_suppression_padded(
            ops.take(level_boxes, [1, 0, 3, 2], axis=-1), level_scores, keep,
            iou_threshold=cfg.rpn_nms_iou, pad_to_max_output_size=True, sorted_input=True)
        valid = ops.arange(keep)[None, :] < ops.expand_dims(num_valid, -1)
        kept_boxes.append(ops.take_along_axis(level_boxes, ops.expand_dims(index, -1), axis=1))
        kept_scores.append(ops.where(valid, ops.take_along_axis(level_scores, index, axis=1), -float("inf")))
    all_scores = ops.concatenate(kept_scores, axis=1)
    best, top = ops.top_k(all_scores, min(post_k, all_scores.shape[-1]))
    rois = ops.take_along_axis(ops.concatenate(kept_boxes, axis=1), ops.expand_dims(top, -1), axis=1)
    valid = best > -float("inf")
    return ops.where(ops.expand_dims(valid, -1), rois, 0.0), valid
