"""Matching candidates to ground truth and drawing balanced samples, batched with static shapes.

Both stages use these: the RPN over anchors (IoU 0.7 / 0.3, 256 per image, half
positive) and the box head over proposals (IoU 0.5, 512 per image, a quarter
positive). keras-cv 0.9's `BoxMatcher` is not used: its force-match step takes,
for every ground-truth column, the argmax row, and a padded column (all IoUs
-1) then force-matches anchor 0 as a positive. `balanced_sample` in keras-cv
scatters ``one_hot(indices, N)`` of shape [B, k, N], which at 1024 px (260k
anchors) is a 67M-element tensor per image; the k-th-largest threshold below
does the same selection with one top_k.
"""

from __future__ import annotations

from keras import ops, random


def match(iou, positive_iou: float, negative_iou: float, low_quality: bool):
    """Each candidate's best ground truth and whether it is positive or negative.

    Args:
        iou: [B, N, M], -1 for padded ground truth (see `box_coding.pairwise_iou`).
        positive_iou: IoU at or above which a candidate is positive.
        negative_iou: IoU below which a candidate is negative; in between: ignored.
        low_quality: also make positive, for every ground truth, the candidates that
            overlap it most (Faster R-CNN's rule, so no object is left without an anchor).

    Returns:
        matched [B, N] int32 (column of the best ground truth), positive [B, N] bool,
        negative [B, N] bool.
    """
    best = ops.max(iou, axis=-1)
    matched = ops.cast(ops.argmax(iou, axis=-1), "int32")
    positive = best >= positive_iou
    negative = (best >= 0.0) & (best < negative_iou)
    if low_quality:
        best_per_gt = ops.max(iou, axis=1, keepdims=True)  # [B, 1, M]; padded columns stay -1
        is_best = (iou == best_per_gt) & (best_per_gt > 0.0)
        positive = positive | ops.any(is_best, axis=-1)
        negative = negative & ~positive
    return matched, positive, negative


def random_keys(shape, seed):
    """Uniform [0, 1) ranking keys for `balanced_sample`."""
    return random.uniform(shape, seed=seed)


def balanced_sample(positive, negative, num_samples: int, positive_fraction: float, key):
    """Chosen candidates: up to ``num_samples * positive_fraction`` positives, negatives for the rest.

    `key` [B, N] ranks the candidates within each kind (random keys from
    `random_keys`; a constant above 1 makes a candidate always win, e.g. a
    ground-truth box among proposals). The k-th-largest key is the threshold,
    so no index is scattered.

    Returns:
        chosen_positive [B, N] bool, chosen_negative [B, N] bool.
    """
    num_candidates = positive.shape[-1]
    max_positives = int(num_samples * positive_fraction)

    def top(mask, count):
        """mask & (key among the `count` largest keys within mask); count [B] int32."""
        scores = ops.where(mask, key, -1.0)
        k = min(num_samples, num_candidates)
        largest, _ = ops.top_k(scores, k)
        index = ops.clip(count - 1, 0, k - 1)
        threshold = ops.take_along_axis(largest, ops.expand_dims(index, -1), axis=-1)
        return mask & (scores >= threshold) & ops.expand_dims(count > 0, -1)

    batch = ops.shape(positive)[0]
    chosen_positive = top(positive, ops.full((batch,), max_positives, "int32"))
    num_positive = ops.sum(ops.cast(chosen_positive, "int32"), axis=-1)
    chosen_negative = top(negative, num_samples - num_positive)
    return chosen_positive, chosen_negative
