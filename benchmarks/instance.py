"""Mask R-CNN on the CPU (issue 15): inference, a training step, and where the time goes.

For each model case (`--cases`), in one run on the same cores, random-initialised weights:

1. **Inference**, images/s at `--size` (512), batch `--batch`, `--repeats` rounds after a
   warm-up call, interleaved so that a burst of load from other jobs hits one round of each:
   - the Keras model in a `tf.function` (what predict and evaluate call): boxes, scores,
     classes and 28 x 28 masks in their boxes;
   - the same plus predict's post-processing (`Detections.detections`, per image: the masks
     pasted at the image's size, thresholded, overlaps removed in NumPy);
   - the exported SavedModel's ``serving_default`` (uint8 in; resize, model, paste and
     overlap removal all in the graph), written by ``python -m tfvision.export`` from a run
     folder around the model; if that export fails, a plain `tf.saved_model.save` of a
     `tf.function` around the model, and the table says which.
2. **Training**, seconds per image of `model.fit` on the same images with synthetic padded
   targets (ellipses: boxes [B, M, 4], classes [B, M] with -1 padding, uint8 masks
   [B, M, H, W]), SGD; the first step (tracing) is left out, the median step is reported.
3. **Stages**: the model's pieces, each in its own compiled `tf.function` fed the previous
   piece's outputs, warm-up excluded, median of `--repeats` interleaved rounds:
   backbone + FPN, RPN head, proposals (per-level top-k + NMS), ROI-Align 7x7, box head,
   detection NMS, ROI-Align 14x14, mask head, mask paste (`detect.paste_masks`, compiled and
   eager as predict calls it) and overlap removal (`instance_metrics.remove_overlaps`,
   NumPy per image). Their sum is printed beside the whole model call.
4. **Overlap removal against the number of detections** D (10, 25, 50, 100): it loops over
   the detections in Python, one whole-image array step each, so it is O(D x H x W).

Detections: a random-weight box head gives every class about 1/(C + 1) of the softmax, so
at Model Garden's ``detection_score`` 0.05 nothing is detected and the mask stages would
have nothing to do. The model is therefore built with ``--detection-score`` 0 by default
(every one of the ``max_detections`` slots filled: the worst case for pasting and overlap
removal); detection NMS is timed at both 0 and 0.05.

    python benchmarks/instance.py                                   # ~15 min on 2 busy cores
    python benchmarks/instance.py --cases small                     # ~6 min
    python benchmarks/instance.py --size 128 --cases small --repeats 2 --train-steps 2 --no-export
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmarks import common  # noqa: E402

# name -> (backbone, MaskRCNNConfig overrides). "default" is Model Garden's maskrcnn config on
# ResNet50; "small" narrows every stage after the backbone and keeps fewer proposals.
CASES = {
    "default": ("resnet50", {}),
    "small": ("efficientnetv2_b0", {"fpn_filters": 128, "box_fc_dims": 512, "mask_filters": 128, "mask_convs": 2,
                                    "rpn_pre_nms_top_k_test": 500, "rpn_post_nms_top_k_test": 300,
                                    "rpn_pre_nms_top_k_train": 1000, "rpn_post_nms_top_k_train": 500,
                                    "roi_samples": 256, "max_mask_rois": 64, "max_detections": 50}),
}


def images_and_targets(n: int, size: int, instances: int, num_classes: int, seed: int = 0):
    """`n` real photo crops (`common.jpeg_folder`) as float32 [n, size, size, 3], and padded targets
    with 2..`instances` random ellipses each (a few of them overlapping, as cells and objects do)."""
    from PIL import Image

    from tfvision.data.instance_annotations import boxes_from_masks

    paths = common.jpeg_folder(Path(tempfile.gettempdir()) / "tfvision-bench" / f"jpeg{size}", n=max(n, 8),
                               size=size)[:n]
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    boxes = np.zeros((n, instances, 4), np.float32)
    classes = np.full((n, instances), -1, np.int32)
    masks = np.zeros((n, instances, size, size), np.uint8)
    for b in range(n):
        count = int(rng.integers(2, instances + 1))
        for m in range(count):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.03, 0.25, 2) * size
            masks[b, m] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        boxes[b, :count] = boxes_from_masks(masks[b, :count].astype(bool))
        classes[b, :count] = rng.integers(0, num_classes, count)
    return images, {"boxes": boxes, "classes": classes, "masks": masks}


def build(case: str, args):
    import keras

    from tfvision.models.maskrcnn.model import MaskRCNN

    backbone, overrides = CASES[case]
    keras.utils.set_random_seed(0)
    return MaskRCNN(args.num_classes, (args.size, args.size), backbone=args.backbone or backbone, weights=None,
                    config={**overrides, "detection_score": args.detection_score}, seed=0, name="maskrcnn")


def rounds(contenders: dict, repeats: int) -> dict[str, dict]:
    """One untimed call of each contender (tracing, warm-up), then `repeats` rounds over all of them
    in turn; per contender the median and best wall seconds and the median CPU seconds of a call."""
    first = {}
    for name, call in contenders.items():
        t0 = time.perf_counter()
        call()
        first[name] = time.perf_counter() - t0
    seen = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, call in contenders.items():
            cpu0, t0 = common.cpu_seconds(), time.perf_counter()
            call()
            seen[name].append((time.perf_counter() - t0, common.cpu_seconds() - cpu0))
    return {name: {"median_s": statistics.median(w for w, _ in rows), "best_s": min(w for w, _ in rows),
                   "cpu_s": statistics.median(c for _, c in rows), "first_s": first[name], "load": common.loadavg()}
            for name, rows in seen.items()}


# --------------------------------------------------------------------------- SavedModel


def savedmodel(model, args, root: Path):
    """(serving function on uint8 images, what it is): the export command's SavedModel when it
    exports instance runs, else a plain `tf.saved_model.save` of the model in a `tf.function`."""
    import tensorflow as tf

    from tfvision.export import main as export

    (root / "checkpoints").mkdir(parents=True)
    model.save(root / "checkpoints" / "best.keras")
    (root / "run.json").write_text(json.dumps({
        "task": "instance_segmentation", "activation": "detections",
        "class_names": [f"c{i}" for i in range(args.num_classes)], "image_size": [args.size] * 2, "channels": 3}))
    try:
        code = export(["--run", str(root), "--format", "savedmodel", "--output", str(root / "export")])
        reason = f"export exited {code}"
    except Exception as e:  # noqa: BLE001  (an export still being written: say why, measure the fallback)
        code, reason = None, f"export raised {type(e).__name__}: {e}"
    if code == 0:
        served = tf.saved_model.load(str(root / "export" / "savedmodel")).signatures["serving_default"]
        return (lambda x: served(image=x)["masks"].numpy()), "python -m tfvision.export (paste + overlaps in graph)"
    print(f"  ({reason}; timing tf.saved_model.save of tf.function(model) instead)", flush=True)

    class Plain(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, args.size, args.size, 3], tf.uint8)])
        def serve(self, image):
            return self.model(tf.cast(image, tf.float32), training=False)

    tf.saved_model.save(Plain(), str(root / "plain"))
    served = tf.saved_model.load(str(root / "plain"))
    return (lambda x: served.serve(x)["masks"].numpy()), "tf.saved_model.save of tf.function(model) (no paste)"


# --------------------------------------------------------------------------- the three measurements


def inference(model, x: np.ndarray, args, work: Path) -> list[dict]:
    import tensorflow as tf

    from tfvision.tasks.detections import Detections

    batch = tf.constant(x)
    detect = tf.function(lambda b: model(b, training=False))
    output = Detections(mask_threshold=0.5, min_area=0)

    def with_post():
        found = {k: v.numpy() for k, v in detect(batch).items()}
        return [output.detections(found, b, x.shape[1:3]) for b in range(len(x))]

    contenders = {"Keras model, tf.function(model(x))": lambda: detect(batch)["masks"].numpy(),
                  "  + predict's paste and overlap removal (NumPy, per image)": with_post}
    if not args.no_export:
        serve, what = savedmodel(model, args, work / "run")
        as_uint8 = tf.constant(x.astype(np.uint8))
        contenders[f"SavedModel: {what}"] = lambda: serve(as_uint8)
    found = rounds(contenders, args.repeats)
    counts = detect(batch)["num_detections"].numpy()
    return [{"name": name, "images_per_s": len(x) / r["median_s"], "best_images_per_s": len(x) / r["best_s"],
             "cpu_ms_per_image": 1000 * r["cpu_s"] / len(x), "first_call_s": r["first_s"], "load": r["load"],
             "detections_per_image": float(counts.mean())} for name, r in found.items()]


def training(model, x: np.ndarray, targets: dict, args) -> dict:
    import keras
    import tensorflow as tf

    steps: list[float] = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            steps.append(time.perf_counter() - self.t0)

    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    data = tf.data.Dataset.from_tensors((tf.constant(x), {k: tf.constant(v) for k, v in targets.items()})).repeat()
    cpu0 = common.cpu_seconds()
    history = model.fit(data, steps_per_epoch=1 + args.train_steps, epochs=1, verbose=0, shuffle=False,
                        callbacks=[Steps()])
    cpu = common.cpu_seconds() - cpu0
    timed = steps[1:]
    loss = history.history["loss"][-1]
    return {"first_step_s": steps[0], "median_step_s": statistics.median(timed), "s_per_image":
            statistics.median(timed) / len(x), "images_per_s": len(x) / statistics.median(timed),
            "cpu_s_per_image_incl_first": cpu / (len(x) * len(steps)), "steps": timed, "loss": float(loss),
            "load": common.loadavg()}


def stages(model, x: np.ndarray, args) -> list[dict]:
    """Each piece of `MaskRCNN.call` in its own compiled function, fed the previous piece's outputs."""
    import dataclasses

    import tensorflow as tf
    from keras import ops

    from tfvision.instance_metrics import remove_overlaps
    from tfvision.models.maskrcnn import detect, roi, rpn
    from tfvision.models.maskrcnn.heads import class_masks

    cfg, size = model.cfg, model.image_size
    at_005 = dataclasses.replace(cfg, detection_score=0.05)
    fn = {
        "backbone + FPN": tf.function(lambda b: model.pyramid(model.normalize(b), training=False)),
        "RPN head": tf.function(lambda levels: model.rpn_head(levels)),
        "proposals: per-level top-k + NMS": tf.function(lambda s, d: rpn.proposals(
            s, d, model.anchors, model.level_counts, size, cfg, training=False)),
        "ROI-Align 7x7 (proposals)": tf.function(lambda levels, rois: roi.roi_align(levels, rois, cfg, cfg.box_crop)),
        "box head": tf.function(lambda crops: model.box_head(crops)),
        f"detection NMS (score >= {cfg.detection_score:g})": tf.function(
            lambda r, v, c, d: detect.detections(r, v, c, d, size, cfg)),
        "detection NMS (score >= 0.05)": tf.function(lambda r, v, c, d: detect.detections(r, v, c, d, size, at_005)),
        "ROI-Align 14x14 (detections)": tf.function(
            lambda levels, boxes: roi.roi_align(levels, boxes, cfg, cfg.mask_crop)),
        "mask head": tf.function(lambda crops, classes: ops.sigmoid(
            class_masks(model.mask_head(crops), ops.maximum(classes, 0)))),
        "mask paste, compiled (all slots)": tf.function(lambda m, b: detect.paste_masks(m, b, size)),
    }
    whole = tf.function(lambda b: model(b, training=False))
    batch = tf.constant(x)
    levels = fn["backbone + FPN"](batch)
    scores, deltas = fn["RPN head"](levels)
    rois, valid = fn["proposals: per-level top-k + NMS"](scores, deltas)
    crops = fn["ROI-Align 7x7 (proposals)"](levels, rois)
    logits, box_deltas = fn["box head"](crops)
    nms0 = f"detection NMS (score >= {cfg.detection_score:g})"
    found = fn[nms0](rois, valid, logits, box_deltas)
    mask_crops = fn["ROI-Align 14x14 (detections)"](levels, found["boxes"])
    masks = fn["mask head"](mask_crops, found["classes"])
    pasted = fn["mask paste, compiled (all slots)"](masks, found["boxes"]).numpy()
    counts, scores_np = found["num_detections"].numpy(), found["scores"].numpy()
    masks_np, boxes_np = masks.numpy(), found["boxes"].numpy()

    def eager_paste():  # as `Detections.detections` calls it: per image, filled slots only, eagerly
        return [detect.paste_masks(masks_np[b:b + 1, :n], boxes_np[b:b + 1, :n], size) for b, n in enumerate(counts)]

    def overlaps():
        return [remove_overlaps(pasted[b, :n] > 0.5, scores_np[b, :n]) for b, n in enumerate(counts)]

    calls = {
        "backbone + FPN": lambda: fn["backbone + FPN"](batch),
        "RPN head": lambda: fn["RPN head"](levels),
        "proposals: per-level top-k + NMS": lambda: fn["proposals: per-level top-k + NMS"](scores, deltas),
        "ROI-Align 7x7 (proposals)": lambda: fn["ROI-Align 7x7 (proposals)"](levels, rois),
        "box head": lambda: fn["box head"](crops),
        nms0: lambda: fn[nms0](rois, valid, logits, box_deltas),
        "detection NMS (score >= 0.05)": lambda: fn["detection NMS (score >= 0.05)"](rois, valid, logits, box_deltas),
        "ROI-Align 14x14 (detections)": lambda: fn["ROI-Align 14x14 (detections)"](levels, found["boxes"]),
        "mask head": lambda: fn["mask head"](mask_crops, found["classes"]),
        "mask paste, compiled (all slots)": lambda: fn["mask paste, compiled (all slots)"](masks, found["boxes"]),
        "mask paste, eager per image (predict's)": eager_paste,
        "overlap removal, NumPy per image": overlaps,
        "whole model call (for the sum)": lambda: whole(batch),
    }
    if nms0 == "detection NMS (score >= 0.05)":  # --detection-score 0.05: one row
        del calls["detection NMS (score >= 0.05)"]
    timed = rounds(calls, args.repeats)
    n = len(x)
    out = [{"name": name, "ms_per_image": 1000 * r["median_s"] / n, "cpu_ms_per_image": 1000 * r["cpu_s"] / n,
            "load": r["load"]} for name, r in timed.items()]
    model_stages = ("backbone + FPN", "RPN head", "proposals: per-level top-k + NMS", "ROI-Align 7x7 (proposals)",
                    "box head", nms0, "ROI-Align 14x14 (detections)", "mask head")
    in_model = [r for r in out if r["name"] in model_stages]
    out.append({"name": "sum of the model's stages", "ms_per_image": sum(r["ms_per_image"] for r in in_model),
                "cpu_ms_per_image": sum(r["cpu_ms_per_image"] for r in in_model), "load": common.loadavg()})
    out.append({"name": f"(detections per image: {counts.mean():.0f} of {cfg.max_detections} slots)",
                "ms_per_image": float("nan"), "cpu_ms_per_image": float("nan"), "load": common.loadavg()})
    return out, (pasted, scores_np, counts)


def overlap_scaling(pasted, scores, repeats: int) -> list[dict]:
    """remove_overlaps on one image's first D pasted masks, for growing D."""
    from tfvision.instance_metrics import remove_overlaps

    probs, s = pasted[0], scores[0]
    rows = []
    for d in sorted({min(k, len(probs)) for k in (10, 25, 50, 100)}):
        masks = probs[:d] > 0.5
        r = rounds({d: lambda m=masks, sc=s[:d]: remove_overlaps(m, sc)}, max(repeats, 5))[d]
        rows.append({"detections": d, "ms": 1000 * r["median_s"], "ms_per_detection": 1000 * r["median_s"] / d,
                     "pixels": int(masks.shape[1] * masks.shape[2])})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="default,small", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--backbone", help="override every case's backbone (e.g. small_cnn for a quick look)")
    ap.add_argument("--size", type=int, default=512, help="image side, a multiple of 64")
    ap.add_argument("--batch", type=int, default=2, help="images per call and per training step")
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--instances", type=int, default=16, help="padded ground-truth instances per image (M)")
    ap.add_argument("--detection-score", type=float, default=0.0,
                    help="0: every detection slot filled (random weights detect nothing at 0.05)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per contender; the median is reported")
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps (after one untimed)")
    ap.add_argument("--no-export", action="store_true", help="skip the SavedModel")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)

    info = common.machine_info()
    print("machine:", json.dumps(info), f"load average {common.loadavg():.1f}", flush=True)
    x, targets = images_and_targets(args.batch, args.size, args.instances, args.num_classes)
    results = {"machine": info, "args": vars(args), "load_start": common.loadavg(), "cases": {}}
    for case in args.cases.split(","):
        t0 = time.perf_counter()
        model = build(case, args)
        print(f"\n== {case}: {model.backbone_name}, {model.count_params() / 1e6:.1f} M parameters, "
              f"{args.size}x{args.size}, batch {args.batch} (built in {time.perf_counter() - t0:.0f} s)", flush=True)
        res = results["cases"][case] = {"backbone": model.backbone_name, "params": model.count_params(),
                                        "config": CASES[case][1]}
        with tempfile.TemporaryDirectory(prefix="tfvision-instance-bench-") as tmp:
            res["inference"] = inference(model, x, args, Path(tmp))
        print(common.markdown_table(
            [[r["name"], f"{r['images_per_s']:.2f}", f"{r['best_images_per_s']:.2f}", f"{r['cpu_ms_per_image']:.0f}",
              f"{r['first_call_s']:.0f}", f"{r['load']:.1f}"] for r in res["inference"]],
            ["inference", "img/s (median)", "img/s (best)", "CPU-ms/img", "first call (s)", "load"]), flush=True)
        res["stages"], (pasted, scores, _) = stages(model, x, args)
        print(common.markdown_table(
            [[r["name"], f"{r['ms_per_image']:.1f}", f"{r['cpu_ms_per_image']:.1f}"] for r in res["stages"]],
            ["stage", "ms/img (median)", "CPU-ms/img"]), flush=True)
        res["overlaps"] = overlap_scaling(pasted, scores, args.repeats)
        print(common.markdown_table(
            [[r["detections"], f"{r['ms']:.2f}", f"{r['ms_per_detection']:.3f}"] for r in res["overlaps"]],
            [f"detections (masks of {args.size}x{args.size})", "remove_overlaps ms", "ms per detection"]),
            flush=True)
        if not args.no_train:
            fresh = build(case, args)  # not the one whose stages were traced: fit traces its own graph
            res["training"] = t = training(fresh, x, targets, args)
            print(f"training: {t['median_step_s']:.2f} s/step (median of {len(t['steps'])}), "
                  f"{t['s_per_image']:.2f} s/img, {t['images_per_s']:.2f} img/s; first step (tracing) "
                  f"{t['first_step_s']:.0f} s; loss {t['loss']:.2f}; load {t['load']:.1f}", flush=True)
    results["load_end"] = common.loadavg()
    print(f"\nload average: {results['load_start']:.1f} at the start, {results['load_end']:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
