"""Inference throughput: Keras predict vs tf.function vs SavedModel vs ONNX Runtime, and extract.

Batch 32 at 224x224, one model (EfficientNetV2-B0 by default, random weights:
the speed is the same as with ImageNet's), the same images for everyone, all
in one run:

- Keras ``model.predict(x, batch_size=32)`` on a float32 array;
- a compiled ``tf.function`` calling the model, batch by batch;
- the exported SavedModel's ``serving_default`` (uint8 in; resize, softmax inside);
- the exported ONNX model in ONNX Runtime (same graph, same uint8 input);
- ``python -m tfvision.extract`` over the JPEG files themselves (decode and
  resize included), with its Keras and its ONNX engine, against the fastest engine.

It also takes ``predict`` apart (``--no-ablation`` skips it): the first call
(tracing), the number of traces, and ``predict`` on a tf.data dataset, on
single batches and through its own ``predict_function``.

    python benchmarks/inference.py                  # ~6 min on 2 busy cores
    python benchmarks/inference.py --n-images 128 --rounds 2 --no-ablation
    python benchmarks/inference.py --json inference.json

Wall time swings with whatever else runs on the machine: each engine is timed
``--rounds`` times in turn and the best round is reported, with the CPU time
per image of that round (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402

BATCH = 32


def load_images(paths, size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: decoded and resized once, shared by every engine."""
    import tensorflow as tf

    from tfvision.data.decode import decode

    return np.stack([np.clip(np.round(tf.image.resize(decode(tf.io.read_file(p), 3, target=(size, size)),
                                                      (size, size)).numpy()), 0, 255).astype(np.uint8)
                     for p in paths])


def make_run(root: Path, backbone: str, size: int, paths) -> Path:
    """A run folder around a random-initialised model, exported to SavedModel and ONNX."""
    import keras

    from tfvision.config import HeadConfig
    from tfvision.export import main as export
    from tfvision.models.heads import build_image_model, input_norm

    keras.utils.set_random_seed(0)
    model = build_image_model(backbone, 3, 10, None, HeadConfig(), input_norm(backbone, "imagenet", 3))
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    model.save(root / "checkpoints" / "best.keras")
    (root / "run.json").write_text(json.dumps({
        "task": "classification", "activation": "softmax", "class_names": [str(i) for i in range(10)],
        "image_size": [size, size], "channels": 3}))
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / "val.csv").write_text("path,label,group\n" + "".join(f"{p},0,{p}\n" for p in paths[:8]))
    for fmt in ("savedmodel", "onnx"):
        if export(["--run", str(root), "--format", fmt, "--output", str(root / f"export_{fmt}"), "--verify",
                   "--n-images", "8"]) != 0:
            raise SystemExit(f"export to {fmt} failed its verification")
    return root


def timed(name, run_all, n: int, rounds: int) -> dict:
    """First call (with any tracing), then the best of `rounds` full passes."""
    cpu0, t0 = common.cpu_seconds(), time.perf_counter()
    run_all()
    first = time.perf_counter() - t0
    best = None
    for _ in range(rounds):
        cpu0, t0 = common.cpu_seconds(), time.perf_counter()
        run_all()
        wall, cpu = time.perf_counter() - t0, common.cpu_seconds() - cpu0
        if best is None or wall < best["seconds"]:
            best = {"seconds": wall, "cpu_seconds": cpu}
    out = {"name": name, "images": n, "first_call_s": round(first, 2), **best,
           "images_per_s": n / best["seconds"], "cpu_ms_per_image": 1000 * best["cpu_seconds"] / n,
           "load": common.loadavg()}
    print(f"  {name:48s} {out['images_per_s']:7.1f} img/s  {out['cpu_ms_per_image']:6.1f} CPU-ms/img  "
          f"first call {first:5.1f} s  load {out['load']:.1f}", flush=True)
    return out


def engines(run: Path, x_uint8: np.ndarray, rounds: int) -> list[dict]:
    import keras
    import onnxruntime as ort
    import tensorflow as tf

    import tfvision.models.layers  # noqa: F401  (registers ImageNormalization)

    n = len(x_uint8)
    x = x_uint8.astype(np.float32)
    batches = [slice(i, i + BATCH) for i in range(0, n, BATCH)]
    model = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    fn = tf.function(lambda b: model(b, training=False),
                     input_signature=[tf.TensorSpec([None, *x.shape[1:]], tf.float32)])
    sm = tf.saved_model.load(str(run / "export_savedmodel" / "savedmodel")).signatures["serving_default"]
    session = ort.InferenceSession(str(run / "export_onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    results = [
        timed("Keras model.predict(x, batch_size=32)", lambda: model.predict(x, batch_size=BATCH, verbose=0),
              n, rounds),
        timed("compiled tf.function(model), per batch", lambda: [fn(x[s]).numpy() for s in batches], n, rounds),
        timed("exported SavedModel serving_default (uint8)",
              lambda: [sm(image=tf.constant(x_uint8[s]))["probabilities"].numpy() for s in batches], n, rounds),
        timed("exported ONNX in ONNX Runtime (uint8)",
              lambda: [session.run(["probabilities"], {"image": x_uint8[s]}) for s in batches], n, rounds),
    ]
    return results


def predict_ablation(run: Path, x_uint8: np.ndarray, rounds: int) -> list[dict]:
    """Where predict's time goes: tracing, the data adapter, the step function."""
    import keras
    import tensorflow as tf

    n = len(x_uint8)
    x = x_uint8.astype(np.float32)
    odd = x[: n - BATCH // 2]  # a last, partial batch: what real data sets have
    rows = []

    def fresh():
        return keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)

    model = fresh()
    t0 = time.perf_counter()
    model.predict(odd, batch_size=BATCH, verbose=0)
    first = time.perf_counter() - t0
    traces = model.predict_function.experimental_get_tracing_count()
    t0 = time.perf_counter()
    model.predict(odd, batch_size=BATCH, verbose=0)
    second = time.perf_counter() - t0
    rows.append({"name": "predict, fresh model: 1st call / 2nd call (s), traces", "first": first,
                 "second": second, "traces": traces, "images": len(odd)})
    other = fresh()
    fn = tf.function(lambda b: other(b, training=False),
                     input_signature=[tf.TensorSpec([None, *x.shape[1:]], tf.float32)])
    t0 = time.perf_counter()
    [fn(odd[i : i + BATCH]).numpy() for i in range(0, len(odd), BATCH)]
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    [fn(odd[i : i + BATCH]).numpy() for i in range(0, len(odd), BATCH)]
    rows.append({"name": "tf.function, fresh model: 1st call / 2nd call (s), traces", "first": first,
                 "second": time.perf_counter() - t0, "traces": fn.experimental_get_tracing_count(),
                 "images": len(odd)})
    for r in rows:
        print(f"  {r['name']:58s} {r['first']:6.2f} / {r['second']:6.2f} s, {r['traces']} trace(s), "
              f"{r['images']} images", flush=True)

    ds = tf.data.Dataset.from_tensor_slices(x).batch(BATCH).cache()
    list(ds)  # fill the cache: batches are ready tensors
    batches = [tf.constant(x[i : i + BATCH]) for i in range(0, n, BATCH)]
    model.make_predict_function()
    steady = [
        timed("predict(numpy array)", lambda: model.predict(x, batch_size=BATCH, verbose=0), n, rounds),
        timed("predict(cached tf.data of batches)", lambda: model.predict(ds, verbose=0), n, rounds),
        timed("predict_on_batch, per batch", lambda: [model.predict_on_batch(b) for b in batches], n, rounds),
        timed("model.predict_function, per batch",
              lambda: [model.predict_function([(b,)]).numpy() for b in batches], n, rounds),
        timed("tf.function(model), per batch", lambda: [fn(b).numpy() for b in batches], n, rounds),
    ]
    return rows + steady


def extract_runs(paths, size: int, backbone: str, workdir: Path) -> list[dict]:
    import pandas as pd

    from tfvision.extract import main as extract

    csv = workdir / "images.csv"
    pd.DataFrame({"path": paths}).to_csv(csv, index=False)
    out = []
    for engine in ("keras", "onnx"):
        dest = workdir / f"features_{engine}"
        cpu0 = common.cpu_seconds()
        code = extract(["--backbone", backbone, "--weights", "null", "--image-size", str(size), "--input", str(csv),
                        "--output", str(dest), "--engine", engine, "--batch-size", str(BATCH)])
        if code != 0:
            raise SystemExit(f"extract --engine {engine} failed ({code})")
        meta = json.loads((dest / "metadata.json").read_text())
        r = {"name": f"python -m tfvision.extract --engine {engine} (JPEG files)", "images": meta["n_images"],
             "images_per_s": meta["images_per_s"], "seconds": meta["elapsed_s"],
             "cpu_seconds_whole_command": common.cpu_seconds() - cpu0, "load": common.loadavg()}
        print(f"  {r['name']:48s} {r['images_per_s']:7.1f} img/s  (decode + resize + model; load {r['load']:.1f})",
              flush=True)
        out.append(r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "tfvision-bench", "jpeg500"))
    ap.add_argument("--n-images", type=int, default=256, help="images per timed pass (default 256 = 8 batches)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbone", default="efficientnetv2_b0")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per engine; the best is reported")
    ap.add_argument("--no-ablation", action="store_true", help="skip taking predict apart")
    ap.add_argument("--no-extract", action="store_true")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)

    info = common.machine_info()
    print("machine:", json.dumps(info))
    paths = common.jpeg_folder(args.data, n=max(args.n_images, 1000), size=500)[: args.n_images]
    with tempfile.TemporaryDirectory(prefix="tfvision-inference-") as tmp:
        tmp = Path(tmp)
        print(f"exporting {args.backbone} (random weights) at {args.size}px ...", flush=True)
        run = make_run(tmp / "run", args.backbone, args.size, paths)
        x = load_images(paths, args.size)
        print(f"engines, batch {BATCH}, {len(x)} images, best of {args.rounds}:", flush=True)
        results = {"machine": info, "args": vars(args), "engines": engines(run, x, args.rounds)}
        if not args.no_extract:
            results["extract"] = extract_runs(paths, args.size, args.backbone, tmp)
        if not args.no_ablation:
            print("predict, taken apart:", flush=True)
            results["ablation"] = predict_ablation(run, x, args.rounds)

    eng = {r["name"]: r for r in results["engines"]}
    rows = [[r["name"], f"{r['images_per_s']:.1f}", f"{r['cpu_ms_per_image']:.1f}", f"{r['first_call_s']:.1f}"]
            for r in results["engines"]]
    print()
    print(common.markdown_table(rows, ["engine", "img/s (best)", "CPU-ms/img", "first call (s)"]))
    predict = eng["Keras model.predict(x, batch_size=32)"]["images_per_s"]
    ort_speed = eng["exported ONNX in ONNX Runtime (uint8)"]["images_per_s"]
    fastest = max(results["engines"], key=lambda r: r["images_per_s"])
    ratios = [["ONNX Runtime / Keras predict", f"{ort_speed / predict:.2f}x", ">= 1.2x"],
              ["tf.function / Keras predict",
               f"{eng['compiled tf.function(model), per batch']['images_per_s'] / predict:.2f}x", ""]]
    for r in results.get("extract", []):
        ratios.append([f"{r['name']} / fastest engine ({fastest['name']})",
                       f"{r['images_per_s'] / fastest['images_per_s']:.2f}x", ">= 0.9x"])
    print()
    print(common.markdown_table(ratios, ["ratio", "value", "target"]))
    results["ratios"] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
