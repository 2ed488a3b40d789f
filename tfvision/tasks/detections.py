"""Instance detections as answers: what predict, the serving graph and ``export --verify`` share.

A Mask R-CNN (`tfvision.models.maskrcnn.MaskRCNN`) answers with boxes, scores,
classes and 28 x 28 mask probabilities in their boxes, at its own input size.
An answer at an image's own size scales the boxes, pastes the masks on the
image (`detect.paste_masks`), thresholds them at ``mask_threshold`` and
removes their overlaps in score order (`instance_metrics.remove_overlaps`,
dropping masks left under ``min_area``). `Detections` does that twice, once
per consumer, from the same model outputs:

- `detections`: NumPy, for predict and evaluate (and so for ``--verify``'s
  Keras reference);
- `serve_images`: inside the exported graph, with the same paste and the same
  rules. Each image's kept detections come first, in score order, as predict
  lists them; the slots after ``num_detections`` hold class -1, score 0, a
  zero box and an empty mask.

``--verify`` compares the two per detection (`compare`): the same number of
detections, identical classes, boxes within `BOX_TOLERANCE` pixels and each
mask's IoU with Keras's at least `MIN_MASK_IOU`.
"""

from __future__ import annotations

import numpy as np

from tfvision.tasks.outputs import Output

BOX_TOLERANCE = 1e-3  # pixels, at the image's own size
MIN_MASK_IOU = 0.99
KEYS = ("boxes", "scores", "classes", "num_detections", "masks")


class Detections(Output):
    """Per-instance masks, classes, scores and boxes at the image's own size.

    >>> Detections(mask_threshold=0.5, min_area=10).rule(None, ["cell"])
    {'kind': 'instances', 'mask_threshold': 0.5, 'min_area': 10}

    Args:
        mask_threshold: a pixel is in a mask above this probability.
        min_area: after overlap removal, masks with fewer pixels are dropped.
    """

    activation = "detections"
    compared = "masks"

    def __init__(self, mask_threshold: float = 0.5, min_area: int = 0):
        self.mask_threshold, self.min_area = float(mask_threshold), int(min_area)

    def rule(self, decision, class_names):
        return {"kind": "instances", "mask_threshold": self.mask_threshold, "min_area": self.min_area}

    # ---- NumPy: predict and evaluate -------------------------------------------------------------
    def detections(self, found: dict, b: int, image_size, model_size=None):
        """Image `b`'s detections, pasted at `image_size` (boxes scaled from `model_size`, the model's
        input, when it differs), overlaps removed in score order: (masks [K, H, W] bool, classes,
        scores, boxes)."""
        from tfvision.instance_metrics import remove_overlaps
        from tfvision.models.maskrcnn.detect import paste_masks

        count = int(found["num_detections"][b])
        boxes = np.asarray(found["boxes"][b, :count], np.float32)
        if model_size is not None:
            boxes = boxes * np.array([image_size[1] / model_size[1], image_size[0] / model_size[0]] * 2, np.float32)
        probs = np.asarray(paste_masks(found["masks"][b:b + 1, :count], boxes[None], tuple(image_size)))[0]
        scores = np.asarray(found["scores"][b, :count])
        masks, kept = remove_overlaps(probs > self.mask_threshold, scores, self.min_area)
        return masks, np.asarray(found["classes"][b, :count])[kept], scores[kept], boxes[kept]

    # ---- the serving graph --------------------------------------------------------------------
    def serve_images(self, model, images, image_size, temperature, rule):
        """float32 images [N, H, W, C] (0..255) -> the model at `image_size` -> detections at H x W:
        ``boxes`` [N, D, 4] float32, ``scores`` [N, D], ``classes`` [N, D] int32, ``num_detections``
        [N] int32, ``masks`` [N, D, H, W] uint8 (0/1)."""
        import tensorflow as tf

        from tfvision.models.maskrcnn.detect import paste_masks
        from tfvision.serving import resized

        found = model(resized(images, image_size), training=False)
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        slots = found["boxes"].shape[1]
        scale = tf.stack([tf.cast(width, tf.float32) / image_size[1], tf.cast(height, tf.float32) / image_size[0]])
        boxes = tf.cast(found["boxes"], tf.float32) * tf.tile(scale, [2])
        filled = tf.range(slots)[None, :] < found["num_detections"][:, None]  # [N, D]
        masks = paste_masks(found["masks"], boxes, (height, width)) > rule["mask_threshold"]
        # remove_overlaps in the graph: slots in score order (NMS sorts them), each keeps the pixels no
        # kept slot above it has taken, and is dropped with fewer than max(min_area, 1) left. D steps of
        # whole-image ops, unrolled: no control flow for the converters.
        taken = tf.zeros_like(masks[:, 0])
        owned, kept = [], []
        for d in range(slots):
            own = masks[:, d] & ~taken
            area = tf.reduce_sum(tf.cast(own, tf.int32), axis=[1, 2])
            keep = filled[:, d] & (area >= max(rule["min_area"], 1))
            own = own & keep[:, None, None]
            taken = taken | own
            owned.append(own)
            kept.append(keep)
        kept = tf.stack(kept, axis=1)
        owned = tf.stack(owned, axis=1)
        # Kept slots first, in their order: the smallest keys of slot (kept) or slot + D (dropped).
        key = tf.where(kept, 0, slots) + tf.range(slots)[None, :]
        order = tf.math.top_k(-key, k=slots).indices
        count = tf.reduce_sum(tf.cast(kept, tf.int32), axis=1)
        valid = tf.range(slots)[None, :] < count[:, None]

        def pick(x, empty):
            picked = tf.gather(x, order, batch_dims=1)
            return tf.where(tf.reshape(valid, [-1, slots] + [1] * (x.shape.rank - 2)), picked, empty)

        return {"boxes": pick(boxes, 0.0), "scores": pick(tf.cast(found["scores"], tf.float32), 0.0),
                "classes": pick(tf.cast(found["classes"], tf.int32), -1), "num_detections": count,
                "masks": tf.cast(pick(owned, False), tf.uint8)}

    def describe(self):
        return {"boxes": "float32 [N, D, 4]: x0, y0, x1, y1 in the input's pixels (serve_bytes: the run's "
                         "image size)",
                "scores": "float32 [N, D], descending; 0 after num_detections",
                "classes": "int32 [N, D]: class index, -1 after num_detections",
                "num_detections": "int32 [N]: detections kept after overlap removal",
                "masks": "uint8 [N, D, H, W]: 1 inside the instance, at the input's H x W (serve_bytes: the "
                         "run's image size); thresholded at mask_threshold, each pixel owned by at most one "
                         "instance (the highest-scoring), instances under min_area dropped"}

    # ---- export --verify ----------------------------------------------------------------------
    def split(self, outputs: dict) -> list[dict]:
        """A batch of served outputs -> per image ``{"boxes", "classes", "scores", "masks"}``, the
        filled slots only."""
        items = []
        for b, n in enumerate(np.asarray(outputs["num_detections"]).reshape(-1)):
            items.append({"boxes": np.asarray(outputs["boxes"][b, :n], np.float32),
                          "classes": np.asarray(outputs["classes"][b, :n]).astype(np.int64),
                          "scores": np.asarray(outputs["scores"][b, :n], np.float32),
                          "masks": np.asarray(outputs["masks"][b, :n]).astype(bool)})
        return items

    def reference(self, model, images, image_size, temperature, rule) -> list[dict]:
        """Keras's answers as predict gives them (`detections`, NumPy), per image."""
        import tensorflow as tf

        from tfvision.serving import resized

        images = tf.cast(images, tf.float32)
        found = {k: v.numpy() for k, v in model(resized(images, image_size), training=False).items()}
        size = tuple(images.shape[1:3])
        items = []
        for b in range(len(images)):
            masks, classes, scores, boxes = self.detections(found, b, size, image_size)
            items.append({"boxes": boxes, "classes": classes.astype(np.int64), "scores": scores, "masks": masks})
        return items

    def compare(self, got: list[dict], ref: list[dict], threshold: float) -> dict:
        """Per detection: the same count and classes, boxes within `BOX_TOLERANCE`, mask IoU at least
        `MIN_MASK_IOU` (the float32 bar, whatever the artifact's precision)."""
        from tfvision.instance_metrics import mask_iou

        counts = [(len(g["classes"]), len(r["classes"])) for g, r in zip(got, ref, strict=True)]
        box, score, ious, same_classes, error = 0.0, 0.0, [], True, None
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            if len(g["classes"]) != len(r["classes"]) or g["masks"].shape[1:] != r["masks"].shape[1:]:
                error = error or (f"image {i}: {len(g['classes'])} detections of {g['masks'].shape[1:]}, "
                                  f"Keras gives {len(r['classes'])} of {r['masks'].shape[1:]}")
                continue
            if not len(r["classes"]):
                continue
            same_classes &= bool(np.array_equal(g["classes"], r["classes"]))
            box = max(box, float(np.abs(g["boxes"] - r["boxes"]).max()))
            score = max(score, float(np.abs(g["scores"] - r["scores"]).max()))
            ious += np.diagonal(mask_iou(g["masks"], r["masks"])).tolist()
        min_iou = min(ious) if ious else None
        passed = (error is None and same_classes and box <= BOX_TOLERANCE
                  and (min_iou is None or min_iou >= MIN_MASK_IOU))
        result = {"threshold": {"max_box_diff": BOX_TOLERANCE, "min_mask_iou": MIN_MASK_IOU, "classes": "identical"},
                  "n_detections": int(sum(r for _, r in counts)), "max_box_diff": box, "max_score_diff": score,
                  "min_mask_iou": min_iou, "mean_mask_iou": float(np.mean(ious)) if ious else None,
                  "classes_identical": same_classes, "passed": bool(passed)}
        if error:
            result["error"] = error
        return result

    def summary(self, result: dict) -> str:
        """One log line of `compare`'s result."""
        iou = result["min_mask_iou"]
        return (f"detections={result['n_detections']} max_box_diff={result['max_box_diff']:.3g} "
                f"min_mask_iou={'n/a' if iou is None else f'{iou:.4f}'} classes_identical={result['classes_identical']}")
