"""Semantic segmentation: one integer label per pixel, softmax over K classes.

Masks come through the shared pipeline with their images (cropped, flipped,
warped together, nearest-neighbour). Class weights are per *pixel* counts of
the training masks, counted once and cached in a JSON file, as the radiomics
notes learned the hard way. Validation scores are accumulated batch by batch
(per-class Dice and IoU), so no full-set logit tensor is ever held in memory.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from tfvision.errors import ConfigError
from tfvision.tasks.base import TASKS, Task, slug


@TASKS.register("segmentation")
class Segmentation(Task):
    name = "segmentation"
    losses = ("crossentropy", "focal", "dice", "ce_dice")
    sources = ("csv", "volumes", "tfrecord")
    backbones = ("unet",)  # the classic U-Net, no registered encoder
    label_layout = None  # a mask per image, no image label
    dense = True
    sample_class_weights = False  # weights live in the loss, per pixel

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.output_names = ["logits"]

    def check_config(self, cfg):
        super().check_config(cfg)
        d = cfg.data
        if d.source == "volumes" and (not d.mask_column or not d.csv):
            raise ConfigError("data.source: 'volumes' needs data.csv and data.mask_column")
        if not d.mask_column and d.source != "tfrecord":  # shards carry their masks
            raise ConfigError("data.mask_column: required for task 'segmentation'")
        if not d.class_names or len(d.class_names) < 2:
            raise ConfigError("data.class_names: segmentation needs the class names, background first "
                              '(e.g. ["background", "tumour"])')
        # MixUp blends two images at every pixel, and an integer mask has no label for a blend;
        # CutMix keeps one source per pixel, and tfvision.data.mix pastes the mask with the image.
        if cfg.augment.mix.mixup_alpha > 0:
            raise ConfigError("augment.mix.mixup_alpha: MixUp is not available for segmentation (a blended "
                              "pixel has no single mask label); set it to 0 and use augment.mix.cutmix_alpha: "
                              "CutMix pastes the mask with the image")

    def class_names(self, frame, cfg):
        return list(cfg.data.class_names)

    def targets(self, frame, class_names):
        return np.zeros((len(frame), 1), np.float32), None  # the mask is the target

    def mask_paths(self, frame: pd.DataFrame) -> np.ndarray:
        return frame["mask"].to_numpy()

    def tiers(self, targets, class_tier):
        return np.zeros(len(targets), np.int32)

    def build_model(self, cfg, num_classes, norm):
        from tfvision.models.unet import build_segmentation_model

        u = cfg.model.unet
        model = build_segmentation_model(
            "unet", cfg.model.backbone, cfg.data.channels, num_classes, norm, cfg.model.weights,
            base_filters=u.base_filters, depth=u.depth, decoder_filters=tuple(u.decoder_filters),
            upsampling=u.upsampling, attention=u.attention, deep_supervision=u.deep_supervision,
            norm_layer=u.norm, groups=u.groups, dropout=u.dropout,
        )
        self.output_names = list(model.output_names)
        return model

    def class_weights(self, cfg, inputs):
        from tfvision.seg_losses import load_or_compute_class_weights, pixel_class_counts

        mode = cfg.train.loss.class_weights
        if mode == "none":
            return None
        if getattr(inputs, "pixel_counts", None) is not None:  # shards: counted at conversion (manifest)
            from tfvision.seg_losses import segmentation_class_weights

            return segmentation_class_weights(inputs.pixel_counts, mode)
        masks = sorted(inputs.frames["train"]["mask"])
        key = hashlib.sha256("\n".join(masks).encode()).hexdigest()[:16]
        cache = cfg.train.loss.class_weights_file or str(cfg.data.derived_dir / "class_weights.json")

        def count():
            from PIL import Image

            return pixel_class_counts((np.asarray(Image.open(m)) for m in masks), len(inputs.class_names))

        return load_or_compute_class_weights(cache, count, mode, key=key)

    def loss(self, cfg, inputs=None):
        from tfvision import seg_losses as L

        k = len(inputs.class_names)
        w = self.class_weights(cfg, inputs)
        w = None if w is None else [float(x) for x in w]
        lc = cfg.train.loss
        if lc.name == "dice":
            return L.SoftDice(k)
        if lc.name == "ce_dice":
            return L.CEPlusDice(k, class_weights=w, dice_weight=lc.dice_weight)
        if lc.name == "focal":
            return L.SegmentationFocalLoss(k, gamma=lc.focal_gamma)
        return L.WeightedCrossEntropy(k, class_weights=w)

    def metrics(self, num_classes, class_names=None):
        from tfvision.seg_metrics import per_class_metrics

        return per_class_metrics(num_classes, [slug(c) for c in class_names or []] or None)

    def compile_args(self, cfg, inputs, model) -> dict:
        loss = self.loss(cfg, inputs)
        metrics = self.metrics(len(inputs.class_names), inputs.class_names)
        if len(self.output_names) == 1:
            return {"loss": loss, "metrics": metrics}
        from tfvision.seg_losses import deep_supervision_losses

        losses, weights = deep_supervision_losses(loss, self.output_names)
        return {"loss": losses, "loss_weights": weights, "metrics": {"logits": metrics}}

    def format_batch(self, batch):
        mask = batch["mask"]
        y = mask if len(self.output_names) == 1 else {n: mask for n in self.output_names}
        return batch["image"], y

    def score(self, model, dataset, inputs, split) -> dict:
        """Per-class Dice and IoU over the whole split, accumulated per batch (the training metrics)."""
        from tfvision.models.forward import compiled_forward
        from tfvision.seg_metrics import DiceScore, IoUScore, macro

        k = len(inputs.class_names)
        scores = [DiceScore(k), IoUScore(k)]
        forward = compiled_forward(model)  # the metrics' updates run eagerly: a few sums per batch
        for x, y in dataset:
            out, y = _logits(forward(x)), _logits(y)
            for m in scores:
                m.update_state(np.asarray(y), out)
        # NaN: the class is absent from truth and prediction, so it is not scored.
        dice, iou = ([None if np.isnan(v) else float(v) for v in np.asarray(m.per_class())] for m in scores)
        names = inputs.class_names
        return {"dice_macro": macro(dice), "dice_per_class": dict(zip(names, dice, strict=True)),
                "iou_macro": macro(iou), "iou_per_class": dict(zip(names, iou, strict=True))}

    def report_figures(self, model, dataset, class_names, out, n_images: int = 6):
        """The split's first slices: ground-truth classes beside the predicted ones (argmax), each
        class but the first (background) in its own colour, at the model's input size."""
        from tfvision.models.forward import compiled_forward
        from tfvision.plots import mask_overlays

        forward, rows = compiled_forward(model), []
        classes = np.arange(1, len(class_names))[:, None, None]
        for x, y in dataset:
            predicted, truth = (np.argmax(np.asarray(_logits(v)), axis=-1) for v in (forward(x), y))
            for b in range(min(len(predicted), n_images - len(rows))):
                rows.append((np.asarray(x[b]), [
                    (title, labels[b][None] == classes, [str(c) for c in class_names[1:]])
                    for title, labels in (("ground truth", truth), ("predicted", predicted))]))
            if len(rows) == n_images:
                break
        title = f"Predicted classes against ground truth: the first {len(rows)} slices, at the model's input size"
        return [(title, mask_overlays(rows, out / "overlays.png"))]

    def report_lines(self, metrics, class_names):
        rows = ["| class | Dice | IoU |", "|---|---|---|"] + [
            f"| {c} | {_fmt(metrics['dice_per_class'][c])} | {_fmt(metrics['iou_per_class'][c])} |"
            for c in class_names]
        return [f"Macro Dice {_fmt(metrics['dice_macro'])}, macro IoU {_fmt(metrics['iou_macro'])} "
                "(classes absent from both truth and prediction are left out of the means).", "", *rows]

    def headline(self, metrics):
        return f"dice_macro={_fmt(metrics['dice_macro'])} iou_macro={_fmt(metrics['iou_macro'])}"


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _logits(out):
    """The per-pixel class scores from a model's (or a batch's) output: a tensor, a list whose
    first entry it is, or a dict's "logits"."""
    return out[0] if isinstance(out, list | tuple) else out["logits"] if isinstance(out, dict) else out
