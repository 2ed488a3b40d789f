"""Predict with a trained run: ``python -m tfvision.predict --run RUN_DIR (--image PATH | --input-dir DIR)``.

Loads the model with its preprocessing (inside the model), the temperature from
calibration.json and the decision rule from thresholds.json (both written by
`tfvision.evaluate`; without them: temperature 1 and argmax / 0.5 per label).
One image: prints the top classes with their probabilities. A folder: writes a
CSV, atomically. An unreadable image gets its reason in the ``error`` column
(and on stderr); the others are still predicted.

CSV layouts (``--format``):
    default       path, pred, prob_<class>..., error
    kaggle-class  <id>, <label column>     (id = file name without extension)
    kaggle-probs  <id>, <class>...         (one probability column per class)
Kaggle layouts leave unreadable images out (a submission has no error column).

Instance segmentation runs write one row per detected instance, at each image's
own size, overlaps removed in score order (an image with none: one row with an
empty mask): ``<id>, <RLE>, path, class, score, x0, y0, x1, y1``, where the id
and RLE columns and the pixel order are the training layout's submission
(sartorius ``id, predicted`` row-major; airbus and coco ``ImageId``/``file_name,
EncodedPixels`` column-major); ``--format kaggle-instances`` keeps those two
columns only. ``--coco-json`` also writes COCO results.

Exit codes: 0 success (some images may be unreadable), 2 run/usage error or
nothing readable, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from tfvision.cli import run_command
from tfvision.errors import UserError

log = logging.getLogger("tfvision.predict")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tfvision.predict",
        description="Predict images with a trained run. Exit 0 ok, 2 run/usage error, 1 other.")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run folder, or its gs:// URL")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image: print its top classes")
    src.add_argument("--input-dir", help="a folder of images (searched recursively): write a CSV")
    src.add_argument("--volume", help="segmentation: a NIfTI volume or DICOM series folder; --output is "
                     "the NIfTI label volume to write (default ./<volume name>_mask.nii.gz)")
    p.add_argument("--output", help="CSV to write (default predictions.csv for --input-dir); an existing file "
                   "is replaced only if predict wrote it, and never inside the input folder")
    p.add_argument("--tta", default="1", help="N views (1 = none) or comma-separated view names")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="RUN_DIR", help="more runs to average with")
    p.add_argument("--gradcam", metavar="OUT_DIR", help="write a Grad-CAM overlay PNG per image here")
    p.add_argument("--gradcam-layer", help="backbone layer for Grad-CAM (default: its last 4-D output)")
    p.add_argument("--format", choices=["default", "kaggle-class", "kaggle-probs", "kaggle-instances"],
                   default="default", help="CSV layout (see the module doc); kaggle-instances: the instance "
                   "run's competition submission, one RLE per row")
    p.add_argument("--coco-json", metavar="FILE", help="instance segmentation: also write the detections as "
                   "COCO results JSON (image_id, category_id, segmentation RLE, bbox, score)")
    p.add_argument("--id-column", default="id", help="id column name of the Kaggle layouts")
    p.add_argument("--label-column", default="label", help="class column name of kaggle-class")
    p.add_argument("--top", type=int, default=5, help="classes printed for --image")
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_command(predict, parse_args, argv)


def list_images(folder) -> list[str]:
    """`--input-dir`'s image files (recursive, sorted; hidden files skipped)."""
    from tfvision.data.sources import IMAGE_SUFFIXES, image_files

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--input-dir: {root} is not a folder")
    files = image_files(root)
    if not files:
        raise UserError(f"--input-dir: no {'/'.join(sorted(IMAGE_SUFFIXES))} files under {root}")
    return [str(p) for p in files]


def predict(args) -> int:
    from tfvision.backend import use_tensorflow

    use_tensorflow("predict")  # before Keras is imported
    from tfvision.run import local_run, local_runs

    _check_outputs(args)  # before the model loads: a refusal should cost nothing
    # A gs:// run is read from a local copy, kept for the command's duration.
    with local_run(args.run) as run_dir, local_runs(args.ensemble) as ensemble:
        return _predict(args, run_dir, ensemble)


def _predict(args, run_dir: Path, ensemble: list[Path]) -> int:
    from tfvision import inference

    ens = inference.Ensemble([inference.load_run(d) for d in [run_dir, *ensemble]], inference.tta_views(args.tta))
    run = ens.main
    task = run.task
    if args.volume or task.dense:
        return predict_volume(run, args)
    if task.predict_table is not None:
        return predict_with_table(ens, args)
    _check_tuning(ens)
    paths = [args.image] if args.image else list_images(args.input_dir)
    probs, errors = inference.predict_files(ens, paths, args.batch_size)
    ok = np.array([not e for e in errors])
    preds = [""] * len(paths)
    if ok.any():
        decided = task.output.decide(probs[ok], run.decision, run.class_names)
        for j, d in zip(np.flatnonzero(ok), decided, strict=True):
            preds[j] = task.output.label(d, run.class_names)
    for path, err in zip(paths, errors, strict=True):
        if err:
            print(f"error: {path}: {err}", file=sys.stderr)
    if args.image:
        _print_top(paths[0], task.output.columns(probs[:1], run.class_names), preds[0], args.top, ok[0])
    output = _csv_output(args)
    if output:
        frame = table(paths, preds, task.output.columns(probs, run.class_names), errors, args.format,
                      args.id_column, args.label_column)
        from tfvision.fileio import owned_output

        with owned_output(output, "--output") as tmp:
            tmp.write_text(frame.to_csv(index=False))
        log.info("wrote %d predictions to %s (%d unreadable)", int(ok.sum()), output, int((~ok).sum()))
    if args.gradcam and ok.any():
        n = write_gradcams(run, [p for p, good in zip(paths, ok, strict=True) if good], args.gradcam,
                           probs[ok], args.gradcam_layer, args.batch_size)
        log.info("wrote %d Grad-CAM overlays to %s", n, args.gradcam)
    return 0 if ok.any() else 2


def predict_with_table(ens, args) -> int:
    """A task that tabulates its own predictions (instance segmentation: one row per instance)."""
    import json

    from tfvision.fileio import owned_output

    run = ens.main
    if len(ens.runs) > 1 or ens.views != ["identity"] or args.gradcam:
        raise UserError(f"predict: --ensemble, --tta and --gradcam are not available for {run.task_name} runs")
    paths = [args.image] if args.image else list_images(args.input_dir)
    frame, errors, coco_results = run.task.predict_table(run, paths, args.batch_size, args.format)
    for path, err in zip(paths, errors, strict=True):
        if err:
            print(f"error: {path}: {err}", file=sys.stderr)
    output = _csv_output(args)
    if output:
        with owned_output(output, "--output") as tmp:
            tmp.write_text(frame.to_csv(index=False))
    if args.coco_json:
        with owned_output(args.coco_json, "--coco-json") as tmp:
            tmp.write_text(json.dumps(coco_results))
    readable = sum(not e for e in errors)
    log.info("wrote %d rows for %d images (%d unreadable)", len(frame), readable, len(paths) - readable)
    if args.image and readable:
        print(frame.to_string(index=False))
    return 0 if readable else 2


def predict_volume(run, args) -> int:
    """Segment a whole volume into a NIfTI label volume with the input's shape and affine."""
    from pathlib import Path

    from tfvision.medical.volume_inference import predict_volume as segment

    if not run.task.dense or not args.volume:
        raise UserError(f"predict: --volume goes with a per-pixel (segmentation) run, and such a run needs "
                        f"--volume; {args.run} is a {run.task_name} run")
    if not run.info.get("medical"):
        raise UserError(f"{args.run}: trained on 2D images, not volumes; there is no slicing recipe to apply")
    src = Path(args.volume)
    if not src.exists():
        raise UserError(f"--volume: {src} does not exist")
    out = _volume_output(args)
    segment(run.model, run.info, src, out, batch_size=args.batch_size)
    print(f"wrote {out}")
    return 0


def _csv_output(args) -> str | None:
    return args.output or (None if args.image else "predictions.csv")


def _volume_output(args) -> Path:
    # In the working folder by default, not beside the volume: the input folder is the user's.
    return Path(args.output or Path(args.volume).name.split(".")[0] + "_mask.nii.gz")


def _check_outputs(args) -> None:
    """Refuse outputs that would replace a user's file or land in the input folder."""
    from tfvision.fileio import check_output_outside, check_replaceable

    inputs = [args.input_dir, args.volume if args.volume and Path(args.volume).is_dir() else None]
    output = _volume_output(args) if args.volume else _csv_output(args)
    if output:
        check_output_outside(output, inputs, "--output")
        check_replaceable(output, "--output")
    if args.coco_json:
        check_output_outside(args.coco_json, inputs, "--coco-json")
        check_replaceable(args.coco_json, "--coco-json")
    if args.gradcam:
        check_output_outside(args.gradcam, inputs, "--gradcam")


def _check_tuning(ens) -> None:
    """Warn when the saved temperature/thresholds were tuned under other TTA views or members."""
    d = ens.main.decision
    if not d:
        return
    others = [str(r.run_dir) for r in ens.runs[1:]]
    if d.get("tta") != ens.views or d.get("ensemble", []) != others:
        log.warning("note: thresholds.json was tuned with TTA %s and ensemble %s; predicting with %s and %s",
                    d.get("tta"), d.get("ensemble", []), ens.views, others)


def _print_top(path, columns, pred, top, ok) -> None:
    if not ok:
        return
    print(f"{path}: {pred or '(no label over its threshold)'}")
    names = list(columns)
    values = np.array([columns[c][0] for c in names])
    for j in np.argsort(-values, kind="stable")[:top]:
        print(f"  {names[j].removeprefix('prob_'):<24} {values[j]:.4f}")


def table(paths, preds, columns, errors, fmt="default", id_column="id", label_column="label"):
    """The output CSV as a DataFrame in the chosen layout; `columns` are the task's float columns
    (`Output.columns`: ``prob_<class>`` for classifiers)."""
    import pandas as pd

    if fmt == "default":
        return pd.DataFrame({"path": paths, "pred": preds, **columns, "error": errors})
    ok = np.array([not e for e in errors])
    ids = [Path(p).stem for p, good in zip(paths, ok, strict=True) if good]
    if fmt == "kaggle-class":
        return pd.DataFrame({id_column: ids, label_column: [p for p, good in zip(preds, ok, strict=True) if good]})
    if fmt == "kaggle-probs":
        return pd.DataFrame({id_column: ids, **{c.removeprefix("prob_"): v[ok] for c, v in columns.items()}})
    raise UserError(f"--format: unknown layout {fmt!r}")


def write_gradcams(run, paths, out_dir, probs, layer=None, batch_size: int = 32) -> int:
    """One ``<name>_gradcam.png`` per image, for its most probable class, over the original image.

    ``<name>`` is the image's path below the folder all images share, "/" written "__".
    """
    import tensorflow as tf

    from tfvision.data.decode import decode
    from tfvision.gradcam import GradCAM, save_overlay
    from tfvision.inference import image_dataset, image_spec

    cam = GradCAM(run.model, layer)
    out = Path(out_dir)
    classes = probs.argmax(axis=1).astype(np.int32)
    # Names relative to the folder the images share, so that a/x.png and b/x.png do not collide.
    root = Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
    n = 0
    for images, index in image_dataset(paths, image_spec(run, batch_size)):
        index = index.numpy()
        heat, _ = cam(images, classes[index])
        for h, j in zip(heat, index, strict=True):
            original = decode(tf.io.read_file(paths[j]), run.channels).numpy()
            name = "__".join(Path(paths[j]).relative_to(root).with_suffix("").parts)
            save_overlay(out / f"{name}_gradcam.png", original, h)
            n += 1
    return n


if __name__ == "__main__":
    sys.exit(main())
