"""Mask R-CNN as one `keras.Model`: pyramid, RPN, box head and mask head, with its own train step.

    image [B, H, W, C] (0..255) -> normalise -> backbone + FPN (P2..P6)
      -> RPN -> proposals -> ROI-Align 7x7 -> box head -> per-class NMS      (inference)
                                         \\-> ROI-Align 14x14 on detections -> mask head
      training: proposals + ground truth -> ROI sampling -> both heads on the samples

Ground truth comes padded to a fixed ``M`` instances: ``{"boxes": [B, M, 4]
(x0, y0, x1, y1) pixels, "classes": [B, M] int (-1 for padding), "masks":
[B, M, h, w]}`` (masks over the whole image at any resolution). The image size
is fixed when the model is built: anchors, crops and every tensor between them
have static shapes.

>>> model = MaskRCNN(num_classes=1, image_size=(64, 64), config={"max_level": 4})
>>> sorted(model(np.zeros((1, 64, 64, 3))))
['boxes', 'classes', 'masks', 'num_detections', 'scores']
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from tfvision.models.heads import input_norm
from tfvision.models.layers import ImageNormalization
from tfvision.models.maskrcnn import losses, roi, rpn
from tfvision.models.maskrcnn.anchors import anchor_boxes, anchor_counts
from tfvision.models.maskrcnn.config import MaskRCNNConfig
from tfvision.models.maskrcnn.detect import detections
from tfvision.models.maskrcnn.fpn import build_pyramid
from tfvision.models.maskrcnn.heads import BoxHead, MaskHead, class_masks

LOSS_NAMES = ("rpn_score", "rpn_box", "frcnn_class", "frcnn_box", "mask")


@keras.saving.register_keras_serializable(package="tfvision")
class MaskRCNN(keras.Model):
    """Mask R-CNN with static shapes, trained by `fit` on (images, padded ground truth).

    Args:
        num_classes: foreground classes (the background is added internally).
        image_size: (height, width), multiples of 2 ** max_level.
        backbone: a registered backbone name.
        channels: image channels.
        weights: backbone weights (``None``, ``"imagenet"`` or a file).
        config: a `MaskRCNNConfig` or a dict of its fields to override.
        seed: seed of the anchor and ROI sampling.
    """

    def __init__(self, num_classes: int, image_size, backbone: str = "small_cnn", channels: int = 3,
                 weights=None, config=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        cfg = config if isinstance(config, MaskRCNNConfig) else MaskRCNNConfig(**(config or {}))
        self.cfg, self.num_classes, self.image_size = cfg, num_classes, tuple(image_size)
        self.backbone_name, self.channels, self.seed = backbone, channels, seed
        norm = input_norm(backbone, "imagenet", channels)
        self.normalize = ImageNormalization(norm.mean, norm.std, norm.bgr and channels >= 3, name="normalize")
        self.pyramid, _ = build_pyramid(backbone, self.image_size, channels, weights, cfg)
        self.anchors = ops.convert_to_tensor(anchor_boxes(self.image_size, cfg))
        self.level_counts = anchor_counts(self.image_size, cfg)
        self.rpn_head = rpn.RPNHead(cfg.fpn_filters, cfg.anchors_per_location, name="rpn_head")
        self.box_head = BoxHead(num_classes, cfg.box_num_fcs, cfg.box_fc_dims, name="box_head")
        self.mask_head = MaskHead(num_classes, cfg.mask_convs, cfg.mask_filters, name="mask_head")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", *LOSS_NAMES)}
        self._build_heads()

    def _build_heads(self):
        """Create every weight now, so that `fit`, `summary` and checkpoints see a built model."""
        levels = [tuple(shape) for shape in (t.shape for t in self.pyramid.outputs)]
        self.normalize.build((None, *self.image_size, self.channels))
        self.rpn_head.build(levels)
        filters = self.cfg.fpn_filters
        self.box_head.build((None, None, self.cfg.box_crop, self.cfg.box_crop, filters))
        self.mask_head.build((None, None, self.cfg.mask_crop, self.cfg.mask_crop, filters))
        self.built = True

    @property
    def backbone(self) -> keras.Model:
        return self.pyramid.get_layer("backbone")

    def _levels(self, images, training):
        return self.pyramid(self.normalize(images), training=training)

    def call(self, images, training=False):
        """Detections: ``boxes`` [B, D, 4], ``scores`` [B, D], ``classes`` [B, D] (-1 empty),
        ``num_detections`` [B] and ``masks`` [B, D, 28, 28] probabilities inside each box
        (`detect.paste_masks` puts them on the image)."""
        cfg = self.cfg
        levels = self._levels(images, training)
        scores, deltas = self.rpn_head(levels)
        rois, valid = rpn.proposals(scores, deltas, self.anchors, self.level_counts, self.image_size, cfg,
                                    training=False)
        class_logits, box_deltas = self.box_head(roi.roi_align(levels, rois, cfg, cfg.box_crop))
        found = detections(rois, valid, class_logits, box_deltas, self.image_size, cfg)
        mask_logits = self.mask_head(roi.roi_align(levels, found["boxes"], cfg, cfg.mask_crop))
        found["masks"] = ops.sigmoid(class_masks(mask_logits, ops.maximum(found["classes"], 0)))
        return found

    def forward_train(self, images, targets, seed=None, training=True) -> dict:
        """Everything the losses need, for one batch.

        `seed`: an int makes the anchor and ROI sampling repeatable (tests);
        None draws from the model's seed generator.
        """
        cfg = self.cfg
        gt_boxes = ops.cast(targets["boxes"], "float32")
        gt_classes = ops.cast(targets["classes"], "int32")
        gt_valid = gt_classes >= 0
        rpn_seed, roi_seed = (self.seed_generator,) * 2 if seed is None else (seed, seed + 1)
        levels = self._levels(images, training)
        scores, deltas = self.rpn_head(levels)
        rpn_targets = rpn.rpn_targets(self.anchors, gt_boxes, gt_valid, cfg, rpn_seed)
        rois, valid = rpn.proposals(scores, deltas, self.anchors, self.level_counts, self.image_size, cfg,
                                    training=True)
        sampled = roi.sample_rois(rois, valid, gt_boxes, gt_classes, gt_valid, cfg, roi_seed)
        class_logits, box_deltas = self.box_head(roi.roi_align(levels, sampled["rois"], cfg, cfg.box_crop))
        # Foreground ROIs come first in the sample, so the first max_mask_rois hold them all
        # (up to 512 * 0.25 = 128 by default).
        count = min(cfg.max_mask_rois, sampled["rois"].shape[1])
        mask_rois = sampled["rois"][:, :count]
        mask_logits = self.mask_head(roi.roi_align(levels, mask_rois, cfg, cfg.mask_crop))
        return {
            "rpn_scores": scores, "rpn_deltas": deltas, "rpn_targets": rpn_targets,
            "roi_targets": sampled, "class_logits": class_logits, "box_deltas": box_deltas,
            "mask_logits": class_masks(mask_logits, sampled["class"][:, :count] - 1),
            "mask_targets": roi.mask_targets(targets["masks"], mask_rois, sampled["matched"][:, :count],
                                             self.image_size, cfg.mask_size),
            "mask_weight": sampled["box_weight"][:, :count],
        }

    def compute_losses(self, images, targets, seed=None, training=True) -> dict:
        """The five weighted-in losses and their weighted sum ``loss``, float32 scalars."""
        out = self.forward_train(images, targets, seed, training)
        parts = {**losses.rpn_losses(out["rpn_scores"], out["rpn_deltas"], out["rpn_targets"], self.cfg),
                 **losses.frcnn_losses(out["class_logits"], out["box_deltas"], out["roi_targets"], self.cfg),
                 **losses.mask_loss(out["mask_logits"], out["mask_targets"], out["mask_weight"])}
        return {**parts, "loss": losses.total_loss(parts, self.cfg)}

    def train_step(self, data):
        images, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            parts = self.compute_losses(images, targets, training=True)
            scaled = self.optimizer.scale_loss(parts["loss"])  # loss scaling under mixed_float16
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._track(parts)

    def test_step(self, data):
        images, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._track(self.compute_losses(images, targets, training=False))

    def _track(self, parts: dict) -> dict:
        for name, value in parts.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def get_config(self):
        return {"num_classes": self.num_classes, "image_size": list(self.image_size),
                "backbone": self.backbone_name, "channels": self.channels,
                "config": self.cfg.to_dict(), "seed": self.seed, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["config"] = MaskRCNNConfig.from_dict(config["config"])
        return cls(**config)

