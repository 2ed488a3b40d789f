"""Instance segmentation: Mask R-CNN on COCO JSON, Sartorius and Airbus CSV layouts.

Everything this task adds to the generic commands is here:

- data: the three sources (`tfvision.data.instance_sources`) give one row an
  image; this task hands the pipeline each image's instances as RLE runs
  (`element_columns`), decodes the ones in the crop window into mask channels
  that the joint augmentations move with the image (`decode_targets`), and
  turns a batch into the model's padded ground truth (`format_batch`: boxes
  from the transformed masks, class -1 for padding and for instances the
  augmentations left empty);
- model: `tfvision.models.maskrcnn.MaskRCNN`, which computes its five losses in
  its own train step (so `compile` gets no loss), with the hyper-parameters of
  the ``maskrcnn`` section over Model Garden's defaults;
- scores: COCO bbox/segm AP, AP50, AP75 (pycocotools) and the Kaggle IoU sweep
  (DSB 2018 / Sartorius) on the validation split, at the model's input size, with
  the predictions' overlaps removed in score order as a submission's are.

Config section ``instance_segmentation``: see `InstanceOptions`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfvision.config import opt
from tfvision.data import instance_sources  # noqa: F401  (registers the coco, sartorius, airbus sources)
from tfvision.errors import ConfigError, did_you_mean
from tfvision.tasks.base import TASKS, Task
from tfvision.tasks.detections import Detections


@dataclass(kw_only=True)
class InstanceOptions:
    max_instances: int = opt(100, min=1, help="instances per training image (the padded ground truth); an "
                             "image with more keeps those overlapping its crop most")
    score_threshold: float = opt(0.05, min=0.0, max=1.0, help="detections scoring below are dropped")
    nms_iou: float = opt(0.5, min=0.0, max=1.0, help="per-class NMS IoU of the detections")
    max_detections: int = opt(100, min=1, help="detections per image")
    mask_threshold: float = opt(0.5, min=0.0, max=1.0, help="a pixel is in a mask above this probability")
    min_area: int = opt(0, min=0, help="after overlap removal (each pixel to the highest-scoring mask), "
                        "masks with fewer pixels are dropped")
    maskrcnn: dict = opt(factory=dict, help="Mask R-CNN hyper-parameters over Model Garden's defaults, e.g. "
                         '{"rpn_samples": 256, "mask_weight": 1.0} (tfvision.models.maskrcnn.config)')


@TASKS.register("instance_segmentation")
class InstanceSegmentation(Task):
    name = "instance_segmentation"
    options = InstanceOptions
    losses = ("maskrcnn",)  # the model's own five losses (RPN score/box, box head class/box, mask)
    sources = ("coco", "sartorius", "airbus", "tfrecord")
    mix = False
    label_layout = None
    sample_class_weights = False
    unsupported_formats = {
        "onnx": "tf2onnx 1.17 cannot bind the If/While bodies of the batched proposal NMS "
                "(tf.image.non_max_suppression_padded: 'Parameter count mismatch while binding controlflow', "
                "with one class as with several), and converts CombinedNonMaxSuppression only with one box "
                "shared by every class (Mask R-CNN's box head regresses a box per class: [B, K, C, 4])",
        "tflite": "CombinedNonMaxSuppression and CropAndResize (ROI-Align, mask paste) are not TFLite builtin "
                  "ops ('neither a custom op nor a flex op'); with SELECT_TF_OPS the graph converts, but "
                  "tf.lite.Interpreter in TF 2.21's pip package has no Flex delegate to run it ('FlexCropAndResize "
                  "failed to prepare')",
    }

    @property
    def output(self) -> Detections:
        """Detections at each image's own size, with the run's mask threshold and minimum area: what
        predict, evaluate and the exported graph answer (`tfvision.tasks.detections`)."""
        o = self.cfg.task_options if self.cfg is not None else InstanceOptions()
        return Detections(o.mask_threshold, o.min_area)

    # ---- config -----------------------------------------------------------------------------
    def check_config(self, cfg):
        super().check_config(cfg)
        self.model_config(cfg)  # unknown or invalid hyper-parameters fail here, before TensorFlow
        a = cfg.augment
        if a.mix.mixup_alpha > 0 or a.mix.cutmix_alpha > 0:
            raise ConfigError("augment.mix: MixUp/CutMix are not available for instance segmentation (a blended "
                              "or pasted pixel has no instance); set mixup_alpha and cutmix_alpha to 0")
        if a.albumentations is not None:
            raise ConfigError("augment.albumentations: not available for instance segmentation; the built-in "
                              "ops move the instance masks with the image")
        if cfg.data.oversample.enabled:
            raise ConfigError("data.oversample: not available for instance segmentation (no per-image class)")
        height, width = cfg.data.size
        stride = 2 ** self.model_config(cfg).max_level
        if height % stride or width % stride:
            raise ConfigError(f"data.image_size: Mask R-CNN needs multiples of {stride} (2 ** max_level), got "
                              f"{cfg.data.size}")

    def model_config(self, cfg):
        from tfvision.models.maskrcnn.config import MaskRCNNConfig

        o = cfg.task_options
        fields = [f.name for f in dataclasses.fields(MaskRCNNConfig)]
        for key in o.maskrcnn:
            if key not in fields:
                raise ConfigError(f"instance_segmentation.maskrcnn.{key}: unknown hyper-parameter"
                                  f"{did_you_mean(key, fields)}")
        values = {"detection_score": o.score_threshold, "detection_nms_iou": o.nms_iou,
                  "max_detections": o.max_detections, **o.maskrcnn}
        try:
            return MaskRCNNConfig.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"instance_segmentation.maskrcnn: {e}") from None

    # ---- data -------------------------------------------------------------------------------
    def _instances(self):
        if not hasattr(self, "_by_path"):
            self._by_path, self._class_names = instance_sources.image_instances(self.cfg.data)
        return self._by_path

    def class_names(self, frame, cfg):
        self._instances()
        return self._class_names

    def targets(self, frame, class_names):
        """Instances per class of each image: the class counts data reports and manifests show
        (the instances themselves travel as `element_columns`)."""
        by_path = self._instances()
        counts = np.zeros((len(frame), len(class_names)), np.float32)
        for i, path in enumerate(frame["path"]):
            np.add.at(counts[i], by_path[path].classes, 1)
        return counts, None

    def tiers(self, targets, class_tier):
        return np.zeros(len(targets), np.int32)

    def element_columns(self, frame):
        from tfvision.data.instances import instance_columns

        by_path = self._instances()
        return instance_columns([by_path[p] for p in frame["path"]])

    def record_features(self, frame):
        from tfvision.data.instances import instance_features

        by_path = self._instances()
        return [instance_features(by_path[p]) for p in frame["path"]]

    def decode_targets(self, element, window, size):
        from tfvision.data.instances import decode_instances

        return decode_instances(element, window, size, self.cfg.task_options.max_instances)

    def format_batch(self, batch):
        from tfvision.data.instances import instance_targets

        return batch["image"], instance_targets(batch["mask"], batch["instance_classes"])

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg, num_classes, norm):
        from tfvision.models.maskrcnn.model import MaskRCNN

        return MaskRCNN(num_classes, cfg.data.size, backbone=cfg.model.backbone, channels=cfg.data.channels,
                        weights=cfg.model.weights, config=self.model_config(cfg), seed=cfg.seed, name="maskrcnn")

    def compile_args(self, cfg, inputs, model):
        return {}  # MaskRCNN.train_step computes and tracks its own losses

    def custom_objects(self):
        from tfvision.models.maskrcnn.model import MaskRCNN

        return {"MaskRCNN": MaskRCNN}

    # ---- detections (`Detections.detections`) ----------------------------------------------
    def predict_table(self, run, paths, batch_size, fmt):
        """Detections of image files at each file's own size: one CSV row per instance (an image with
        none gets one row with an empty mask), and the same as COCO results."""
        import pandas as pd
        import tensorflow as tf
        from PIL import Image

        from tfvision.data.instance_sources import SUBMISSION
        from tfvision.data.rle import encode, to_coco
        from tfvision.inference import image_dataset, image_spec
        from tfvision.run import load_run_config

        cfg = load_run_config(run.run_dir)
        output = type(self)(cfg).output
        id_column, rle_column, naming, order = SUBMISSION[cfg.data.source]
        detect = tf.function(lambda x: run.model(x, training=False), reduce_retracing=True)
        found_by_index = {}
        for images, index in image_dataset(paths, image_spec(run, batch_size)):
            found = {k: v.numpy() for k, v in detect(images).items()}
            for b, j in enumerate(index.numpy()):
                with Image.open(paths[j]) as im:
                    size = (im.height, im.width)
                found_by_index[int(j)] = output.detections(found, b, size, run.image_size)
        rows, results, errors = [], [], []
        for j, path in enumerate(paths):
            name = Path(path).stem if naming == "stem" else Path(path).name
            if j not in found_by_index:
                errors.append("unreadable image")
                rows.append({id_column: name, rle_column: "", "path": path, "error": "unreadable image"})
                continue
            errors.append("")
            masks, classes, scores, boxes = found_by_index[j]
            for m, k, score, box in zip(masks, classes, scores, boxes, strict=True):
                rows.append({id_column: name, rle_column: encode(m, order=order), "path": path,
                             "class": run.class_names[k], "score": float(score),
                             "x0": float(box[0]), "y0": float(box[1]), "x1": float(box[2]), "y1": float(box[3])})
                results.append({"image_id": _image_id(path, j), "file_name": Path(path).name,
                                "category_id": int(k) + 1, "score": float(score),
                                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                                "segmentation": to_coco(m)})
            if not len(masks):
                rows.append({id_column: name, rle_column: "", "path": path})
        table = pd.DataFrame(rows, columns=[id_column, rle_column, "path", "class", "score", "x0", "y0", "x1", "y1",
                                            "error"]).fillna({"error": ""})
        if fmt == "kaggle-instances":  # a submission: no unreadable rows, no extra columns
            table = table.loc[table["error"] == "", [id_column, rle_column]]
        return table, errors, results

    # ---- scores -----------------------------------------------------------------------------

    def score(self, model, dataset, inputs, split):
        """COCO AP and the Kaggle sweeps over the split at each image's own size, as the leaderboards
        score a submission: the detections pasted back as predict pastes them, against the
        annotations' own runs (never resized, never decoded to dense masks)."""
        import tensorflow as tf

        from tfvision.instance_metrics import InstanceScores

        detect = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        scores = InstanceScores(max_detections=self.cfg.task_options.max_detections)
        truth = inputs.task_columns(split).as_numpy_iterator()
        for images, _ in dataset:
            found = {k: v.numpy() for k, v in detect(images).items()}
            model_size = tuple(images.shape[1:3])
            for b in range(len(images)):
                row = next(truth)
                size = tuple(int(v) for v in row["instance_size"])
                masks, classes, confidence, boxes = self.output.detections(found, b, size, model_size)
                scores.add(_runs_to_rles(row["instance_runs"], size), row["instance_classes"],
                           masks, classes, confidence, boxes, size=size)
        if next(truth, None) is not None or len(scores.images) != inputs.sizes[split]:
            raise RuntimeError(f"{split}: {len(scores.images)} images scored, {inputs.sizes[split]} in the split")
        ap = {k.lower(): (None if np.isnan(v) else float(v)) for k, v in scores.coco_ap().items()}
        return {**ap, "iou_sweep": scores.sweep(), "f2_sweep": scores.sweep(beta=2.0)}

    def report_figures(self, model, dataset, class_names, out, n_images: int = 6):
        """The split's first images with their ground truth and the detections as scored (mask
        threshold, overlaps removed, min_area), at the model's input size."""
        from tfvision.plots import mask_overlays

        panels = []
        for images, targets in dataset:
            found = {k: v.numpy() for k, v in model(images, training=False).items()}
            for b in range(min(len(images), n_images - len(panels))):
                present = targets["classes"][b].numpy() >= 0
                masks, classes, confidence, _ = self.output.detections(found, b, tuple(images.shape[1:3]))
                truth = targets["masks"][b].numpy()[present] > 0
                panels.append((images[b].numpy(), [
                    (f"ground truth ({len(truth)})", truth, None),
                    (f"predicted ({len(masks)})", masks,
                     [f"{class_names[k]} {p:.2f}" for k, p in zip(classes, confidence, strict=True)])]))
            if len(panels) == n_images:
                break
        title = f"Detections against ground truth: the first {len(panels)} images, at the model's input size"
        return [(title, mask_overlays(panels, out / "overlays.png"))]

    def report_lines(self, metrics, class_names):
        rows = ["| | AP | AP50 | AP75 |", "|---|---|---|---|"] + [
            f"| {kind} | {_fmt(metrics[f'{kind}_ap'])} | {_fmt(metrics[f'{kind}_ap50'])} | "
            f"{_fmt(metrics[f'{kind}_ap75'])} |" for kind in ("segm", "bbox")]
        return [f"Kaggle IoU-sweep score {_fmt(metrics['iou_sweep'])} (mean over images of TP/(TP+FP+FN) over "
                f"IoU 0.5:0.05:0.95; Airbus' F2 variant {_fmt(metrics.get('f2_sweep'))}), COCO AP below "
                "(pycocotools), at each image's own size, predictions' overlaps removed in score order.",
                "", *rows]

    def headline(self, metrics):
        return (f"segm_ap={_fmt(metrics['segm_ap'])} segm_ap50={_fmt(metrics['segm_ap50'])} "
                f"iou_sweep={_fmt(metrics['iou_sweep'])}")


def _image_id(path: str, index: int) -> int:
    """COCO results need an integer image_id: a COCO file name's own number (000000000139.jpg -> 139),
    else the file's position in the list."""
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else index


def _runs_to_rles(runs, size) -> list[dict]:
    """COCO RLEs of one image's instances from their uncompressed runs (a ragged row, as
    `tf.data` gives it to NumPy), without decoding a mask."""
    from pycocotools import mask as coco_mask

    rows = runs.to_list() if hasattr(runs, "to_list") else [list(r) for r in runs]
    return [coco_mask.frPyObjects({"counts": [int(v) for v in r], "size": list(size)}, *size) for r in rows]


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
