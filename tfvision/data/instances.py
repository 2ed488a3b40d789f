"""Instance masks inside tf.data: COCO RLE runs in, padded [H, W, M] mask channels out.

Why runs and not decoded masks: a Sartorius image has hundreds of cells, and
[N, H, W] booleans for a whole dataset do not fit in memory, nor in a tf.data
column. Each image's instances ride the pipeline as ragged run lengths (COCO's
uncompressed RLE: column-major, background first), and are decoded in the
graph, only for the ``M`` instances that overlap the crop window most.

Decoded, the instances are channels of one ``mask`` [S, S, M], so the joint
geometric augmentations (flips, affine, elastic; `tfvision.data.augment`) move
them with the image exactly as they move a segmentation mask. At batch level,
`instance_targets` derives the boxes from the transformed masks and marks
instances left empty (cropped or warped away) and padding with class -1, which
the model ignores.

>>> columns = instance_columns(records)           # host, once: ragged runs per image
>>> element = decode_instances(element, window, (256, 256), max_instances=100)   # per image
>>> targets = instance_targets(batch["mask"], batch["instance_classes"])         # per batch
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from pycocotools import mask as coco_mask

from tfvision.data.rle import coco_counts

COLUMNS = ("instance_runs", "instance_classes", "instance_boxes", "instance_size")


def instance_features(record) -> dict[str, np.ndarray]:
    """One image's instances as the TFRecord ``instance/*`` features (`tfvision.data.features`)."""
    from tfvision.data import features as F

    runs = [coco_counts(rle) for rle in record.rles]
    # toBbox reads the runs, no decode: [x, y, w, h] -> [x0, y0, x1, y1].
    xywh = coco_mask.toBbox(record.rles).reshape(-1, 4) if record.rles else np.zeros((0, 4))
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    return {F.INSTANCE_RUNS: np.concatenate(runs).astype(np.int64) if runs else np.zeros(0, np.int64),
            F.INSTANCE_RUN_LENGTHS: np.array([len(r) for r in runs], np.int64),
            F.INSTANCE_CLASSES: np.asarray(record.classes, np.int64),
            F.INSTANCE_BOXES: boxes.ravel()}


def instance_columns(records) -> dict[str, tf.RaggedTensor | np.ndarray]:
    """Pipeline columns for a list of `ImageInstances`, one entry per image.

    Returns ``instance_runs`` [N, (n), (runs)] int32, ``instance_classes`` [N, (n)],
    ``instance_boxes`` [N, (n), 4] float32 (x0, y0, x1, y1) and ``instance_size`` [N, 2] (H, W).
    """
    from tfvision.data import features as F

    parts = [instance_features(r) for r in records]
    per_image = np.array([len(p[F.INSTANCE_CLASSES]) for p in parts], np.int64)

    def joined(key, dtype, shape=(-1,)):
        values = [p[key] for p in parts]
        return (np.concatenate(values) if values else np.zeros(0)).astype(dtype).reshape(shape)

    return {
        "instance_runs": tf.RaggedTensor.from_nested_row_lengths(
            joined(F.INSTANCE_RUNS, np.int32), [per_image, joined(F.INSTANCE_RUN_LENGTHS, np.int64)]),
        "instance_classes": tf.RaggedTensor.from_row_lengths(joined(F.INSTANCE_CLASSES, np.int32), per_image),
        "instance_boxes": tf.RaggedTensor.from_row_lengths(joined(F.INSTANCE_BOXES, np.float32, (-1, 4)),
                                                           per_image),
        "instance_size": np.array([[r.height, r.width] for r in records], np.int32).reshape(-1, 2),
    }


def parsed_instances(parsed: dict) -> dict[str, tf.Tensor | tf.RaggedTensor]:
    """The pipeline columns of one parsed record (`features.parse_spec(has_instances=True)`)."""
    from tfvision.data import features as F

    dense = {k: tf.sparse.to_dense(parsed[k]) for k in F.INSTANCE_KEYS}
    return {
        "instance_runs": tf.RaggedTensor.from_row_lengths(tf.cast(dense[F.INSTANCE_RUNS], tf.int32),
                                                          dense[F.INSTANCE_RUN_LENGTHS]),
        "instance_classes": tf.cast(dense[F.INSTANCE_CLASSES], tf.int32),
        "instance_boxes": tf.reshape(dense[F.INSTANCE_BOXES], [-1, 4]),
        "instance_size": tf.cast(tf.stack([parsed[F.HEIGHT], parsed[F.WIDTH]]), tf.int32),
    }


def runs_to_masks(runs: tf.RaggedTensor, height, width) -> tf.Tensor:
    """[H, W, n] uint8 masks from n rows of COCO run lengths (column-major, background first)."""
    parity = tf.ragged.range(runs.row_lengths()) % 2  # 0, 1, 0, ...: background, foreground, ...
    flat = tf.repeat(tf.cast(parity.flat_values, tf.uint8), tf.cast(runs.flat_values, tf.int64))
    return tf.transpose(tf.reshape(flat, [-1, width, height]), [2, 1, 0])


def decode_instances(element: dict, window, size, max_instances: int) -> dict:
    """Replace an element's instance columns by ``mask`` [S, S, M] uint8 and ``instance_classes`` [M].

    Keeps the `max_instances` instances that overlap `window` ([y, x, h, w]; None:
    the whole image) most, decodes only those, cuts the window out and resizes it
    to `size` (nearest neighbour, as the image's own crop and resize). Padding
    channels are empty with class -1.
    """
    element = dict(element)
    runs, classes = element.pop("instance_runs"), element.pop("instance_classes")
    boxes, hw = element.pop("instance_boxes"), element.pop("instance_size")
    classes = tf.cast(classes, tf.int32)
    if window is None:
        window = tf.concat([tf.zeros([2], tf.int32), hw], 0)
    y, x, h, w = (window[i] for i in range(4))
    wy, wx, wh, ww = (tf.cast(v, tf.float32) for v in (y, x, h, w))
    overlap_w = tf.nn.relu(tf.minimum(boxes[:, 2], wx + ww) - tf.maximum(boxes[:, 0], wx))
    overlap_h = tf.nn.relu(tf.minimum(boxes[:, 3], wy + wh) - tf.maximum(boxes[:, 1], wy))
    count = tf.minimum(tf.shape(classes)[0], max_instances)
    _, keep = tf.math.top_k(overlap_w * overlap_h, count)
    masks = runs_to_masks(tf.gather(runs, keep), hw[0], hw[1])
    pad = max_instances - count
    # Pad before resizing, so that the resize always sees M >= 1 channels and a static shape.
    masks = tf.pad(masks[y:y + h, x:x + w], [[0, 0], [0, 0], [0, pad]])
    masks = tf.image.resize(masks, size, method="nearest")
    masks.set_shape(tuple(size) + (max_instances,))
    kept = tf.pad(tf.gather(classes, keep), [[0, pad]], constant_values=-1)
    kept.set_shape([max_instances])
    return {**element, "mask": masks, "instance_classes": kept}


def instance_targets(masks, classes) -> dict[str, tf.Tensor]:
    """The model's ground truth from a batch: masks [B, S, S, M] -> ``boxes`` [B, M, 4] (x0, y0,
    x1, y1, pixel edges), ``classes`` [B, M] (-1 for padding and for instances left empty by the
    augmentations) and ``masks`` [B, M, S, S] uint8."""
    hits = tf.cast(masks, tf.bool)
    rows, cols = tf.reduce_any(hits, axis=2), tf.reduce_any(hits, axis=1)  # [B, H, M], [B, W, M]

    def span(along):
        length = tf.shape(along)[1]
        index = tf.range(length)[None, :, None]
        first = tf.reduce_min(tf.where(along, index, length), axis=1)
        last = tf.reduce_max(tf.where(along, index, -1), axis=1) + 1
        return first, last

    (y0, y1), (x0, x1) = span(rows), span(cols)
    present = tf.reduce_any(rows, axis=1)  # [B, M]
    boxes = tf.cast(tf.stack([x0, y0, x1, y1], axis=-1), tf.float32)
    boxes = tf.where(present[..., None], boxes, 0.0)
    return {"boxes": boxes, "classes": tf.where(present, tf.cast(classes, tf.int32), -1),
            "masks": tf.transpose(tf.cast(masks, tf.uint8), [0, 3, 1, 2])}
