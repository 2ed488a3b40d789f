"""Export a trained run: ``python -m tfvision.export --run RUN_DIR --format all --verify``.

Every artifact serves the same graph (see `tfvision.serving`): uint8 images
[N, H, W, C] at any size in, resize and normalisation inside, probabilities
(softmax or sigmoid, fitted temperature applied) and predicted labels out; or
what the task's `Output` serves instead (instance segmentation: detections and
masks at the input's size, `tfvision.tasks.detections`). A format the task's
graph cannot be converted to (`Task.unsupported_formats`) is left out of
``--format all`` and listed with its reason under ``not_exported`` in the
report; asking for it by name is refused (exit 2).

    OUTPUT/                   (default RUN_DIR/export)
      savedmodel/             signatures serving_default (uint8 "image") and
                              serve_bytes (encoded JPEG/PNG "image_bytes");
                              assets/class_names.txt, assets/export.json
      model.onnx              metadata_props: class_names, activation, temperature, ...
      model.tflite
      model_float16.onnx  model_float16.tflite  model_dynamic.tflite   (--float16, --quantize)
      class_names.txt  export.json  export_report.json   (the report is written last)

An existing OUTPUT is replaced only when it is an earlier export (it holds
export_report.json); any other folder is refused (exit 2), never deleted.

``--verify`` runs each artifact with its own runtime (``tf.saved_model.load``,
ONNX Runtime, ``tf.lite.Interpreter``) on real images (the run's validation
split unless ``--images``), compares its answers with the Keras checkpoint's
(`Output.compare`; detections: identical classes, boxes within 1e-3 px, mask
IoU >= 0.99) and fails when an export differs by more than its threshold:

    float32 (every format)        max |p - p_keras| <= 1e-4
    float16 weights (ONNX/TFLite) max |p - p_keras| <= 1e-2
    TFLite dynamic range (int8)   max |p - p_keras| <= 0.15

Measured on 300 validation images of a small_cnn trained on digits: float16
4.5e-4, dynamic range 3.7e-3 (top-1 agreement 0.997). The random-initialised
test models, whose rescaled heads amplify tiny feature differences, are the
worst case seen: float16 up to 2.5e-3, dynamic range up to 0.10 (top-1
agreement 1.0). A broken conversion (normalisation or weights lost) moves
peaked probabilities by tenths to ones. Top-1 agreement is reported, not gated.

Everything is written to a temporary folder first. It replaces OUTPUT only
when verification passed (or was not asked for); a failed export is kept
next to it as OUTPUT.failed for inspection.

Exit codes: 0 success; 2 bad run folder or arguments (one line on stderr);
1 verification failed, or anything else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from tfvision import __version__
from tfvision.errors import DataError, UserError
from tfvision.fileio import (
    check_output_outside,
    claim_dir,
    replace_dir,
    temp_dir_beside,
    write_json,
    write_text,
)
from tfvision.run import read_run
from tfvision.tasks import get_task

REPORT = "export_report.json"  # written last: marks a folder as a finished export of ours
log = logging.getLogger("tfvision.export")

FORMATS = ("savedmodel", "onnx", "tflite")
THRESHOLDS = {"float32": 1e-4, "float16": 1e-2, "dynamic": 0.15}


# --------------------------------------------------------------------------- the run


def load_float32_model(run_dir: Path, custom_objects: dict | None = None):
    """The best checkpoint in float32 (see `tfvision.models.checkpoint`), main output only;
    `custom_objects`: the task's model classes (`Task.custom_objects`)."""
    import keras

    from tfvision.models.checkpoint import load_float32

    with keras.saving.CustomObjectScope(custom_objects or {}):
        model = load_float32(Path(run_dir) / "checkpoints" / "best.keras")
    # Deep supervision: serve the main output only. (A subclassed model, Mask R-CNN, has no `outputs`.)
    if len(getattr(model, "outputs", None) or ()) > 1:
        model = keras.Model(model.input, model.get_layer("logits").output, name=model.name)
    return model


def run_task(run_dir: Path, info: dict):
    """The run's task, configured by the run's config.json when it has one (an instance run's mask
    threshold and minimum area, which its `Output` applies, are task options)."""
    from tfvision.run import load_run_config

    cfg = load_run_config(run_dir) if (Path(run_dir) / "config.json").is_file() else None
    return get_task(info["task"], cfg)


def _metadata(run_dir: Path, info: dict, rule: dict, output) -> dict:
    return {
        "tfvision_version": __version__, "run": str(Path(run_dir).resolve()), "task": info.get("task"),
        "class_names": info["class_names"], "activation": info["activation"],
        "temperature": info["temperature"], "decision": rule,
        "image_size": info["image_size"], "channels": info["channels"],
        "inputs": {"image": "uint8 [N, H, W, C], any H and W; resized inside",
                   "image_bytes": "string [N], encoded JPEG/PNG (SavedModel serve_bytes only)"},
        "outputs": output.describe(),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- writing


def export(run_dir: Path, formats: list[str], tmp: Path, *, float16=False, quantize=None,
           opset: int | None = None) -> tuple[list[dict], object, dict]:
    """Write the requested artifacts into `tmp`; returns (report entries, float32 Keras model, run info
    with the task's configured ``output`` and the exported ``rule``)."""
    import tensorflow as tf

    from tfvision import serving

    info = read_run(run_dir)
    task = run_task(run_dir, info)
    model, output = load_float32_model(run_dir, task.custom_objects()), task.output
    module = serving.ServingModule(
        model, image_size=info["image_size"], channels=info["channels"], output=output,
        class_names=info["class_names"], temperature=info["temperature"], decision=info["decision"])
    info["rule"], info["output"] = module.rule.obj, output
    tuned = (info["decision"] or {}).get("kind")
    if tuned and tuned != info["rule"]["kind"]:  # e.g. class quotas, which need a whole batch
        log.warning("thresholds.json: the %r rule cannot run per request; exported labels use %r",
                    tuned, info["rule"]["kind"])
    meta = _metadata(run_dir, info, info["rule"], output)
    write_text(tmp / "class_names.txt", "\n".join(info["class_names"]) + "\n")
    write_json(tmp / "export.json", meta)
    entries = []
    if "savedmodel" in formats:
        log.info("writing SavedModel")
        module.class_names_file = tf.saved_model.Asset(str(tmp / "class_names.txt"))
        module.export_file = tf.saved_model.Asset(str(tmp / "export.json"))
        tf.saved_model.save(module, str(tmp / "savedmodel"), signatures={
            "serving_default": module.serve.get_concrete_function(),
            "serve_bytes": module.serve_bytes.get_concrete_function()})
        entries.append({"format": "savedmodel", "signature": "serving_default", "precision": "float32",
                        "path": "savedmodel"})
        entries.append({"format": "savedmodel", "signature": "serve_bytes", "precision": "float32",
                        "path": "savedmodel"})
    if "onnx" in formats or "tflite" in formats:
        frozen = serving.freeze(module.serve.get_concrete_function())
    if "onnx" in formats:
        log.info("converting to ONNX")
        onnx_model = serving.to_onnx(frozen, meta, opset or serving.ONNX_OPSET)
        _write_bytes(tmp / "model.onnx", onnx_model.SerializeToString())
        entries.append({"format": "onnx", "precision": "float32", "path": "model.onnx"})
        if float16:
            half = serving.onnx_float16_weights(onnx_model)
            _write_bytes(tmp / "model_float16.onnx", half.SerializeToString())
            entries.append({"format": "onnx", "precision": "float16", "path": "model_float16.onnx"})
    if "tflite" in formats:
        modes = ["float32"] + (["float16"] if float16 else []) + (["dynamic"] if quantize == "dynamic" else [])
        for mode in modes:
            log.info("converting to TFLite (%s)", mode)
            name = "model.tflite" if mode == "float32" else f"model_{mode}.tflite"
            _write_bytes(tmp / name, serving.to_tflite(frozen, mode))
            entries.append({"format": "tflite", "precision": mode, "path": name})
    for e in entries:
        e["threshold"] = THRESHOLDS[e["precision"]]
    return entries, model, info


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --------------------------------------------------------------------------- verification


def verification_images(run_dir: Path, images: str | None, n: int) -> list[str]:
    """Up to `n` readable image paths: a folder or CSV (`path` column), else the run's val split."""
    import pandas as pd

    if images:
        p = Path(images)
        if p.is_dir():
            from tfvision.data.sources import image_files

            paths = [str(f) for f in image_files(p)]
        elif p.suffix.lower() == ".csv":
            frame = pd.read_csv(p, dtype=str, keep_default_na=False)
            if "path" not in frame:
                raise UserError(f"{p}: --images CSV needs a 'path' column")
            paths = [str(p.parent / x) for x in frame["path"]]
        else:
            raise UserError(f"--images: {p} is neither a folder nor a CSV")
    else:
        paths = []
        for split in ("val", "test", "train"):
            f = Path(run_dir) / "splits" / f"{split}.csv"
            if f.is_file():
                paths += pd.read_csv(f, dtype=str, keep_default_na=False)["path"].tolist()
    paths = [x for x in paths if os.path.isfile(x)][:n]
    if not paths:
        raise DataError("--verify: no images found (the run's splits point nowhere?); pass --images DIR")
    return paths


def _load_images(paths: list[str], channels: int) -> tuple[list[np.ndarray], list[bytes], list[dict]]:
    """uint8 arrays at their own size (decoded the way training decodes), the raw bytes, and
    ``[{"path", "reason"}]`` for files that do not decode (left out of the comparison)."""
    import tensorflow as tf

    from tfvision.data.check import rejection_reason
    from tfvision.data.decode import decode

    arrays, raw, skipped = [], [], []
    for p in paths:
        reason = rejection_reason(p, channels)
        if reason:
            log.warning("--verify: skipped %s: %s", p, reason)
            skipped.append({"path": p, "reason": reason})
            continue
        data = Path(p).read_bytes()
        img = decode(tf.constant(data), channels).numpy()
        arrays.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
        raw.append(data)
    if paths and not arrays:
        raise DataError(f"--verify: none of the {len(paths)} images decodes (e.g. {skipped[0]['path']}: "
                        f"{skipped[0]['reason']})")
    return arrays, raw, skipped


def _same_size_batches(arrays: list[np.ndarray], batch: int = 16):
    """Indices grouped by image size (any size goes in, but a batch shares one)."""
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.shape, []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch):
            yield idx[s : s + batch]


def _run_all(call, arrays) -> list:
    """`call(uint8 batch)`'s per-image answers for every image, in input order (dense outputs have
    each image's own size, so this is a list)."""
    out = [None] * len(arrays)
    for idx in _same_size_batches(arrays):
        for i, item in zip(idx, call(np.stack([arrays[i] for i in idx])), strict=True):
            out[i] = item
    return out


def reference(model, info: dict, output, arrays, raw) -> tuple[list, list]:
    """Keras's answers (`Output.reference`) for the uint8 images and for the decoded bytes."""
    import tensorflow as tf

    from tfvision.data.decode import decode_resized

    size = tuple(info["image_size"])

    def keras(batch):
        return output.reference(model, batch, size, info["temperature"], info["rule"])

    from_uint8 = _run_all(keras, arrays)
    decoded = np.stack([decode_resized(tf.constant(d), info["channels"], size).numpy() for d in raw])
    from_bytes = [p for s in range(0, len(decoded), 16) for p in keras(decoded[s : s + 16])]
    return from_uint8, from_bytes


def runner(entry: dict, root: Path):
    """A callable batch -> the artifact's named outputs as NumPy, run with its own runtime."""
    path = root / entry["path"]
    if entry["format"] == "savedmodel":
        import tensorflow as tf

        sig = tf.saved_model.load(str(path)).signatures[entry["signature"]]
        name = "image_bytes" if entry["signature"] == "serve_bytes" else "image"
        return lambda b: {k: v.numpy() for k, v in sig(**{name: tf.constant(b)}).items()}
    if entry["format"] == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda b: dict(zip(names, session.run(names, {"image": b}), strict=True))
    from tfvision.serving import tflite_interpreter

    _, run = tflite_interpreter(path)
    return lambda b: run(image=b)


def verify(entries: list[dict], root: Path, model, info: dict, paths: list[str]) -> tuple[bool, list[dict]]:
    """Fill each entry with the task's comparison (`Output.compare`: max_abs_diff and top1_agreement
    for probabilities), n_images and passed; returns whether all passed, and the images left out
    because they do not decode."""
    arrays, raw, skipped = _load_images(paths, info["channels"])
    output = info["output"]
    ref_uint8, ref_bytes = reference(model, info, output, arrays, raw)
    ok = True
    for e in entries:
        call = runner(e, root)
        if e.get("signature") == "serve_bytes":
            got = [p for s in range(0, len(raw), 16) for p in output.split(call(raw[s : s + 16]))]
            ref = ref_bytes
        else:
            got, ref = _run_all(lambda b, call=call: output.split(call(b)), arrays), ref_uint8
        e.update(output.compare(got, ref, e["threshold"]), n_images=len(arrays))
        ok &= e["passed"]
        if "error" in e:
            log.error("%-10s %-16s %-8s %s", e["format"], e.get("signature", ""), e["precision"], e["error"])
        else:
            log.info("%-10s %-16s %-8s %s %s", e["format"], e.get("signature", ""), e["precision"],
                     output.summary(e), "ok" if e["passed"] else "FAILED")
    return ok, skipped


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tfvision.export",
        description="Export a run to SavedModel / ONNX / TFLite with preprocessing inside. "
                    "Exit 0 ok, 1 verification failed, 2 bad run folder or arguments.")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder (checkpoints/best.keras, run.json), or its gs:// URL")
    p.add_argument("--format", default="all", choices=[*FORMATS, "all"])
    p.add_argument("--output", metavar="DIR", help="output folder (default RUN_DIR/export)")
    p.add_argument("--verify", action="store_true",
                   help="run every artifact with its own runtime and compare with the Keras model")
    p.add_argument("--images", metavar="DIR|CSV", help="images for --verify (default: the run's val split)")
    p.add_argument("--n-images", type=int, default=32, help="images used by --verify (default 32)")
    p.add_argument("--float16", action="store_true", help="also write float16-weight ONNX and TFLite models")
    p.add_argument("--quantize", choices=["dynamic"], help="also write a dynamic-range quantised TFLite model")
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from tfvision.cli import run_command

    return run_command(run, parse_args, argv)


def run(args) -> int:
    """The export command on parsed arguments (`UserError` -> exit 2 in `tfvision.cli`)."""
    from tfvision.backend import use_tensorflow

    use_tensorflow("export")  # before Keras is imported
    from tfvision.run import local_run

    # A gs:// run is exported from a local copy; the default output, its export/, goes back there.
    with local_run(args.run, publish=not args.output) as run_dir:
        return _export(args, run_dir)


def _export(args, run_dir: Path) -> int:
    output = Path(args.output) if args.output else run_dir / "export"
    formats = list(FORMATS) if args.format == "all" else [args.format]
    if (args.float16 or args.quantize) and formats == ["savedmodel"]:
        raise UserError("--float16 and --quantize apply to onnx and tflite exports")
    info = read_run(run_dir)  # fail fast, before TensorFlow loads
    from tfvision.tasks import get_task

    unsupported = get_task(info["task"]).unsupported_formats
    if args.format in unsupported:
        raise UserError(f"export: a {info['task']} run cannot be exported to {args.format}: "
                        f"{unsupported[args.format]}")
    left_out = [{"format": f, "reason": unsupported[f]} for f in formats if f in unsupported]
    formats = [f for f in formats if f not in unsupported]
    for f in left_out:
        log.warning("%s: not exported: %s", f["format"], f["reason"])
    if (args.float16 or args.quantize) and formats == ["savedmodel"]:
        raise UserError(f"--float16 and --quantize apply to onnx and tflite exports, which a {info['task']} "
                        "run cannot have")
    for folder in (output, output.with_name(output.name + ".failed")):
        claim_dir(folder, REPORT, _refusal(folder))
    if args.images:
        check_output_outside(output, [args.images], "--output")
    paths = verification_images(run_dir, args.images, args.n_images) if args.verify else []
    tmp = temp_dir_beside(output)
    try:
        entries, model, info = export(run_dir, formats, tmp, float16=args.float16, quantize=args.quantize,
                                      opset=args.opset)
        ok, skipped = verify(entries, tmp, model, info, paths) if args.verify else (True, [])
        final = output if ok else output.with_name(output.name + ".failed")
        for e in entries:
            e["path"] = str(final / e["path"])
        write_json(tmp / REPORT, {
            "run": str(run_dir.resolve()), "tfvision_version": __version__, "verified": bool(args.verify),
            "images": [p for p in paths if p not in {r["path"] for r in skipped}], "skipped_images": skipped,
            "thresholds": THRESHOLDS, "passed": ok, "exports": entries, "not_exported": left_out})
        replace_dir(tmp, final, REPORT, _refusal(final))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        bad = [f"{e['format']}/{e['precision']}" + (f"/{e['signature']}" if "signature" in e else "")
               for e in entries if not e["passed"]]
        print(f"error: verification failed for {', '.join(bad)}; see {final / REPORT}",
              file=sys.stderr)
        return 1
    log.info("export written to %s", final)
    return 0


def _refusal(folder: Path) -> str:
    return (f"--output: {folder} exists and is not an export (no {REPORT}); tfvision replaces only its own "
            f"exports, so give a new folder")


if __name__ == "__main__":
    sys.exit(main())
