"""Instances through the shared pipeline: sources, in-graph RLE decode, joint augmentation, targets.

Oracles: the instance masks themselves (decoded by pycocotools when the records
are read, compared here with what the graph decodes from the runs), exact crops
and 2x nearest upscales (np.repeat), `boxes_from_masks` for the derived boxes,
and, for the augmentations, the image: each shape is drawn in the image in its
own colour, so a mask that drifted from its image shows up as colour mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tests import layouts
from tfvision.config import AugmentParams
from tfvision.config_loader import config_from_dict
from tfvision.data.instance_annotations import ImageInstances, boxes_from_masks
from tfvision.data.instances import decode_instances, instance_columns, instance_targets
from tfvision.data.pipeline import PipelineSpec, Samples, build_dataset
from tfvision.data.rle import coco_rles


def _records(seeds, size=(48, 64)):
    records, truth = [], []
    for seed in seeds:
        _, masks, classes = layouts.shapes_image(seed, size)
        record = ImageInstances(f"img{seed}", *size)
        for k, rle in zip(classes, coco_rles(masks), strict=True):
            record.add(int(k), rle)
        records.append(record)
        truth.append((masks, classes))
    return records, truth


def _decoded(record_columns, index, window, size, max_instances):
    element = {k: v[index] for k, v in record_columns.items()}
    out = decode_instances(element, window, size, max_instances)
    return out["mask"].numpy(), out["instance_classes"].numpy()


def _as_set(masks, classes):
    """Instances as a sorted list of (class, mask bytes): order-free comparison."""
    return sorted((int(k), m.astype(bool).tobytes()) for m, k in zip(masks, classes, strict=True))


def test_runs_decode_to_every_instance_with_its_class_and_padding():
    records, truth = _records([0, 1, 2])
    columns = instance_columns(records)
    for i, (masks, classes) in enumerate(truth):
        decoded, kept = _decoded(columns, i, None, (48, 64), max_instances=6)
        n = len(masks)
        assert decoded.shape == (48, 64, 6) and decoded.dtype == np.uint8
        assert _as_set(np.moveaxis(decoded, -1, 0)[:n], kept[:n]) == _as_set(masks, classes)
        assert (kept[n:] == -1).all() and not decoded[..., n:].any()


def test_window_crops_exactly_and_upscales_by_replication():
    records, truth = _records([3])
    columns = instance_columns(records)
    masks, classes = truth[0]
    window = tf.constant([5, 9, 20, 30])  # y, x, h, w
    cut = masks[:, 5:25, 9:39]
    decoded, kept = _decoded(columns, 0, window, (20, 30), max_instances=8)
    visible = cut.any(axis=(1, 2))
    got = np.moveaxis(decoded, -1, 0)
    assert _as_set(got[got.any(axis=(1, 2))], kept[got.any(axis=(1, 2))]) == _as_set(cut[visible], classes[visible])
    doubled, _ = _decoded(columns, 0, window, (40, 60), max_instances=8)
    np.testing.assert_array_equal(doubled, decoded.repeat(2, axis=0).repeat(2, axis=1))


def test_max_instances_keeps_those_overlapping_the_window_most():
    size = (40, 40)
    masks = np.zeros((3, *size), bool)
    masks[0, 0:10, 0:10] = True  # 100 px inside the window below
    masks[1, 30:40, 30:40] = True  # outside it
    masks[2, 0:20, 0:20] = True  # 400 px inside
    record = ImageInstances("x", *size)
    for k, rle in enumerate(coco_rles(masks)):
        record.add(k, rle)
    columns = instance_columns([record])
    decoded, kept = _decoded(columns, 0, tf.constant([0, 0, 25, 25]), (25, 25), max_instances=2)
    assert kept.tolist() == [2, 0]
    np.testing.assert_array_equal(decoded[..., 0], masks[2, :25, :25])


def test_targets_derive_boxes_from_the_masks_and_drop_empty_instances():
    records, truth = _records([4, 5])
    columns = instance_columns(records)
    batch = [_decoded(columns, i, None, (48, 64), max_instances=6) for i in range(2)]
    masks = np.stack([b[0] for b in batch])
    masks[0, ..., 0] = 0  # an instance the augmentations left empty
    targets = {k: v.numpy() for k, v in instance_targets(masks, np.stack([b[1] for b in batch])).items()}
    for b in range(2):
        per_instance = np.moveaxis(masks[b], -1, 0)
        np.testing.assert_array_equal(targets["boxes"][b], boxes_from_masks(per_instance))
        present = per_instance.any(axis=(1, 2))
        np.testing.assert_array_equal(targets["classes"][b] >= 0, present)
        np.testing.assert_array_equal(targets["masks"][b], per_instance)
    assert targets["classes"][0, 0] == -1


def _colour_samples(n=6, size=(48, 48)):
    """Images whose only content is their shapes, each shape in a colour of its own class."""
    paths, records = [], []
    import tempfile
    from pathlib import Path

    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="instances-"))
    for seed in range(n):
        _, masks, classes = layouts.shapes_image(10 + seed, size, count=(2, 3))
        image = np.zeros((*size, 3), np.uint8)
        for mask, k in zip(masks, classes, strict=True):
            image[mask, k] = 255  # class k lights channel k
        path = folder / f"{seed}.png"
        Image.fromarray(image).save(path)
        record = ImageInstances(path.name, *size)
        for k, rle in zip(classes, coco_rles(masks), strict=True):
            record.add(int(k), rle)
        paths.append(str(path))
        records.append(record)
    return np.array(paths), records


def test_geometric_augmentations_move_every_instance_with_its_image():
    paths, records = _colour_samples()
    # Colour and noise off: each class must keep its own channel.
    params = AugmentParams(hflip=1.0, vflip=0.5, affine_p=1.0, rotate=20.0, scale=0.2, color_p=0.0,
                           noise_p=0.0, crop_scale=[0.5, 1.0])
    spec = PipelineSpec(image_size=(48, 48), channels=3, batch_size=3, tiers=[params], shuffle_buffer=8)

    def decode_targets(element, window, size):
        return decode_instances(element, window, size, max_instances=4)

    samples = Samples(paths, np.zeros((len(paths), 1), np.float32), extra=instance_columns(records))
    ds = build_dataset(samples, spec, training=True, decode_targets=decode_targets,
                       format_batch=lambda b: (b["image"], instance_targets(b["mask"], b["instance_classes"])))
    checked = 0
    for images, targets in ds.take(4):
        for b in range(len(images)):
            for m in range(4):
                k = int(targets["classes"][b, m])
                if k < 0:
                    continue
                mask = targets["masks"][b, m].numpy() > 0
                lit = images[b, ..., k].numpy() > 127
                # The mask is nearest-sampled and the image bilinear: they may differ on the rim only.
                assert (mask & lit).sum() / mask.sum() > 0.8, (b, m)
                checked += 1
    assert checked >= 10


def _config(root, **data):
    return {"task": "instance_segmentation", "data": {"root": str(root), "image_size": [64, 96], **data},
            "model": {"backbone": "small_cnn", "weights": None},
            "instance_segmentation": {"maskrcnn": {"max_level": 4}}}


def test_sartorius_source_reports_bad_rows_and_keeps_their_images(tmp_path):
    from tfvision.data.sources import load_samples

    layout = layouts.sartorius(tmp_path, n_images=4)
    table = pd.read_csv(layout.root / "train.csv")
    first = table["id"].iloc[0]
    table.loc[0, "annotation"] = "1 5 3"  # an odd number of values
    table.loc[1, "annotation"] = f"{64 * 96 - 2} 9"  # runs past the image
    table.to_csv(layout.root / "train.csv", index=False)
    cfg = config_from_dict(_config(layout.root, source="sartorius", csv="train.csv", label_column="cell_type"))
    samples = load_samples(cfg.data)
    rows = sorted(r["row"] for r in samples.missing)
    assert rows == [0, 1] and all("reason" in r for r in samples.missing)
    assert str(layout.root / "train" / f"{first}.png") in set(samples.frame["path"])


def test_coco_source_uses_the_second_json_as_validation(tmp_path):
    from tfvision.data.sources import load_samples

    layout = layouts.coco_instances(tmp_path, n_train=4, n_val=2)
    cfg = config_from_dict(_config(layout.root, source="coco", annotations="annotations/instances_train2017.json",
                                   val_annotations="annotations/instances_val2017.json",
                                   image_dirs=["train2017", "val2017"]))
    frame = load_samples(cfg.data).frame
    assert frame["split"].tolist() == ["train"] * 4 + ["val"] * 2
    assert [Path(p).parent.name for p in frame["path"]] == ["train2017"] * 4 + ["val2017"] * 2


def test_an_image_whose_size_differs_from_its_annotations_is_left_out(tmp_path):
    from PIL import Image

    from tfvision.data.sources import load_samples

    layout = layouts.coco_instances(tmp_path, n_train=3, n_val=1)
    Image.new("RGB", (32, 32)).save(layout.root / "train2017" / "000000000001.jpg")
    cfg = config_from_dict(_config(layout.root, source="coco", annotations="annotations/instances_train2017.json",
                                   image_dirs=["train2017"]))
    table = load_samples(cfg.data)
    assert len(table.frame) == 2
    (reason,) = [r["reason"] for r in table.missing]
    assert "32x32" in reason and "64x64" in reason


@pytest.mark.parametrize("section, message", [
    ({"maskrcnn": {"rpn_sampels": 64}}, "did you mean 'rpn_samples'"),
    ({"maskrcnn": {"max_level": 6}}, "multiples of 64"),
])
def test_config_rules_name_the_key(tmp_path, section, message):
    from tfvision.errors import ConfigError

    layout = layouts.coco_instances(tmp_path, n_train=2, n_val=1)
    raw = _config(layout.root, source="coco", annotations="annotations/instances_train2017.json")
    raw["instance_segmentation"] = section
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def _by_image(dataset) -> dict[bytes, tuple]:
    """Each image's ground truth, keyed by its pixels: (sorted (class, box, mask bytes) of its instances)."""
    out = {}
    for images, targets in dataset:
        for b in range(len(images)):
            present = targets["classes"][b].numpy() >= 0
            items = sorted((int(k), tuple(box), m.tobytes()) for k, box, m in zip(
                targets["classes"][b].numpy()[present], targets["boxes"][b].numpy()[present],
                targets["masks"][b].numpy()[present], strict=True))
            out[images[b].numpy().tobytes()] = items
    return out


def test_shards_carry_the_instances_that_the_files_give(tmp_path):
    """Convert -> verify -> read: every validation image from the shards has exactly the instances
    (classes, boxes, masks) the loose files give, and the manifest counts instances per class."""
    from tfvision.convert import main as convert
    from tfvision.data.conversion import read_table
    from tfvision.data.inputs import FileInputs
    from tfvision.data.tfrecord import RecordInputs
    from tfvision.tasks import get_task

    layout = layouts.sartorius(tmp_path, n_images=8)
    raw = _config(layout.root, source="sartorius", csv="train.csv", label_column="cell_type",
                  split={"method": "random", "val_fraction": 0.25})
    raw["augment"] = {"enabled": False}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    shards = tmp_path / "shards"
    assert convert(["--config", str(path), "--output", str(shards)]) == 0
    assert convert(["--verify", str(shards)]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["has_instances"] and manifest["class_counts_unit"] == "instances"
    table = pd.read_csv(layout.root / "train.csv")
    assert sum(sum(c.values()) for c in manifest["class_counts"].values()) == len(table)

    cfg = config_from_dict(raw)
    task = get_task(cfg.task, cfg)
    frame = read_table(cfg)[0]
    spec = PipelineSpec.from_config(cfg)
    files = FileInputs(cfg, task, frame).dataset("val", spec, training=False, format_batch=task.format_batch)
    on_shards = config_from_dict({**raw, "data": {**raw["data"], "source": "tfrecord", "root": str(shards)}})
    records = RecordInputs(on_shards, get_task(cfg.task, on_shards)).dataset(
        "val", spec, training=False, format_batch=task.format_batch)
    expected, got = _by_image(files), _by_image(records)
    assert len(expected) == 2 and got == expected


# small_cnn with P2-P4 and narrow heads (tests/test_maskrcnn_model.py's SMALL): CPU minutes.
SMALL_MASKRCNN = {"max_level": 4, "fpn_filters": 64, "box_fc_dims": 256, "mask_filters": 64, "mask_convs": 2,
                  "roi_samples": 128, "max_mask_rois": 32, "rpn_pre_nms_top_k_train": 1000,
                  "rpn_post_nms_top_k_train": 300, "rpn_post_nms_top_k_test": 300}


@pytest.mark.slow
def test_learns_overlapping_shapes_through_the_pipeline(tmp_path):
    """Sources -> in-graph instance decode -> flips and crops -> padded targets -> fit -> the task's
    own score, on images it never saw: three classes of translucent, overlapping shapes.
    Measured: held-out segm AP50 0.83, bbox AP50 0.93 after 40 epochs (about 7 min on 2 loaded cores)."""
    import keras

    from tfvision.data.conversion import read_table
    from tfvision.data.inputs import FileInputs
    from tfvision.data.pipeline import steps_for
    from tfvision.tasks import get_task

    layout = layouts.sartorius(tmp_path, n_images=64, size=(64, 64))
    raw = {"task": "instance_segmentation", "seed": 0,
           "data": {"source": "sartorius", "root": str(layout.root), "csv": "train.csv",
                    "label_column": "cell_type", "image_size": [64, 64],
                    "split": {"method": "random", "val_fraction": 0.25}},
           "model": {"backbone": "small_cnn", "weights": None},
           "augment": {"params": {"crop_scale": [0.8, 1.0], "hflip": 0.5, "vflip": 0.5, "affine_p": 0.0,
                                  "color_p": 0.0, "noise_p": 0.0}},
           "instance_segmentation": {"max_instances": 6, "max_detections": 30, "maskrcnn": SMALL_MASKRCNN},
           "train": {"batch_size": 8}}
    cfg = config_from_dict(raw)
    task = get_task(cfg.task, cfg)
    inputs = FileInputs(cfg, task, read_table(cfg)[0])
    spec = PipelineSpec.from_config(cfg)
    keras.utils.set_random_seed(0)
    model = task.build_model(cfg, len(inputs.class_names), None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(inputs.dataset("train", spec, training=True, repeat=True, format_batch=task.format_batch),
              steps_per_epoch=steps_for(inputs.sizes["train"], 8, True), epochs=40, verbose=0)
    scores = task.score(model, inputs.dataset("val", spec, training=False, format_batch=task.format_batch),
                        inputs, "val")
    assert scores["segm_ap50"] >= 0.7 and scores["bbox_ap50"] >= 0.8, scores


def _boxes_as_detections(dataset):
    """A stand-in detector for scoring tests: for each batch of `dataset`, in order, its ground-truth
    boxes (model size) as detections, each with a full 28 x 28 mask, so the pasted masks are the
    boxes. A tf.Variable steps through the batches, as the score's tf.function calls it once a batch."""
    batches = []
    for _, targets in dataset:
        classes = targets["classes"].numpy()
        order = np.argsort(classes < 0, axis=1, kind="stable")  # present instances first
        present = np.take_along_axis(classes >= 0, order, 1)
        boxes = np.take_along_axis(targets["boxes"].numpy(), order[..., None], 1)
        # Scores from the boxes themselves: COCO's AP breaks ties by image order, and the shards
        # hold the images in another order than the files.
        x0, y0, x1, y1 = np.moveaxis(boxes, -1, 0)
        area = (x1 - x0) * (y1 - y0) / (64 * 64)
        batches.append({"boxes": boxes, "classes": np.maximum(np.take_along_axis(classes, order, 1), 0),
                        "scores": np.where(present, 0.5 + 0.4 * area + 1e-3 * x0 + 1e-5 * y0, 0.0),
                        "num_detections": present.sum(1).astype(np.int32),
                        "masks": np.ones(classes.shape + (28, 28), np.float32)})
    stacked = {k: tf.constant(np.stack([b[k] for b in batches])) for k in batches[0]}
    step = tf.Variable(0)

    def detector(images, training=False):
        i = step.assign_add(1) - 1
        return {k: v[i] for k, v in stacked.items()}
    return detector


def test_scores_at_each_images_own_size_from_files_and_shards(tmp_path):
    """Validation is scored at each image's own size (64 x 96 here) while the model sees 64 x 64:
    the task's score equals pycocotools and the NumPy sweeps fed the annotations' own masks and the
    detections pasted back at 64 x 96, image by image; and shards score exactly as the files do."""
    from tfvision.convert import main as convert
    from tfvision.data.conversion import read_table
    from tfvision.data.inputs import FileInputs
    from tfvision.data.rle import from_coco
    from tfvision.data.tfrecord import RecordInputs
    from tfvision.instance_metrics import airbus_f2, coco_ap, kaggle_iou_sweep
    from tfvision.tasks import get_task

    layout = layouts.sartorius(tmp_path, n_images=12, size=(64, 96))
    raw = _config(layout.root, source="sartorius", csv="train.csv", label_column="cell_type",
                  split={"method": "random", "val_fraction": 0.34})
    raw["data"]["image_size"] = [64, 64]
    raw["augment"] = {"enabled": False}
    raw["train"] = {"batch_size": 2}
    cfg = config_from_dict(raw)
    task = get_task(cfg.task, cfg)
    spec = PipelineSpec.from_config(cfg)
    files = FileInputs(cfg, task, read_table(cfg)[0])

    def val(inputs):
        return inputs.dataset("val", spec, training=False, format_batch=task.format_batch)

    scores = task.score(_boxes_as_detections(val(files)), val(files), files, "val")

    truth = [task._instances()[p] for p in files.frames["val"]["path"]]
    assert len(truth) == 4 and all((t.height, t.width) == (64, 96) for t in truth)
    gt_masks = [np.array([from_coco(r) for r in t.rles]) for t in truth]
    detector, predicted = _boxes_as_detections(val(files)), []
    for images, _ in val(files):
        found = {k: v.numpy() for k, v in detector(images).items()}
        predicted += [task.output.detections(found, b, (64, 96), (64, 64)) for b in range(len(images))]
    assert all(p[0].shape[1:] == (64, 96) for p in predicted)
    masks, classes, confidence, boxes = (list(x) for x in zip(*predicted, strict=True))
    expected = {k.lower(): v for k, v in coco_ap(gt_masks, [t.classes for t in truth], masks, classes, confidence,
                                                 boxes, max_detections=100).items()}
    expected.update(iou_sweep=kaggle_iou_sweep(gt_masks, masks, confidence),
                    f2_sweep=airbus_f2(gt_masks, masks, confidence))
    assert scores == pytest.approx(expected, abs=1e-12)
    # Boxes for shapes: right boxes and classes, masks only roughly (a disc fills 79% of its box).
    assert scores["bbox_ap50"] > 0.9 and 0.1 < scores["segm_ap50"] < 1

    (title, png), = task.report_figures(_boxes_as_detections(val(files)), val(files), files.class_names, tmp_path)
    with Image.open(png) as im:  # one row per image: ground truth | detections
        assert "first 4 images" in title and im.size == (700, 4 * 330)
        drawn = np.asarray(im.convert("RGB"))
    left, right = drawn[:, :350], drawn[:, 350:]
    assert (left != right).any()  # the detections (boxes) are not the ground truth (shapes)

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    shards = tmp_path / "shards"
    assert convert(["--config", str(path), "--output", str(shards)]) == 0
    on_shards = config_from_dict({**raw, "data": {**raw["data"], "source": "tfrecord", "root": str(shards)}})
    records = RecordInputs(on_shards, get_task(cfg.task, on_shards))
    assert task.score(_boxes_as_detections(val(records)), val(records), records, "val") == pytest.approx(
        scores, abs=1e-12)
