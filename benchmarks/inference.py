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

Wall time swings with whatever else runs on the machine: after one untimed
first call each, the engines are timed in ``--rounds`` interleaved rounds (a
burst of load hits one round of every engine, not all rounds of one), and the
best and median rounds are reported, with the CPU time per image of the best
(steadier on a shared machine). The extract command runs ``--rounds`` times
per engine, alternating.
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
PREDICT = "Keras model.predict(x, batch_size=32)"
TF_FUNCTION = "compiled tf.function(model), per batch"
ORT = "exported ONNX in ONNX Runtime (uint8)"


def load_images(paths, size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: decoded and resized once, shared by every engine."""
    import tensorflow as tf

    from tfvision.data.decode import decode_resized

    return np.stack([np.clip(np.round(decode_resized(tf.io.read_file(p), 3, (size, size)).numpy()), 0, 255).astype(np.uint8)
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


def interleaved(contenders: dict, n: int, rounds: int, first_calls: dict | None = None) -> list[dict]:
    """Each contender's first call (with any tracing), then `rounds` rounds over all contenders in
    turn, so that a burst of load from other jobs hits one round of each rather than one contender;
    the best round of each is kept (with its CPU time per image) and the median is reported too."""
    first = {}
    for name, run_all in (first_calls or contenders).items():
        t0 = time.perf_counter()
        run_all()
        first[name] = time.perf_counter() - t0
    seen = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run_all in contenders.items():
            cpu0, t0 = common.cpu_seconds(), time.perf_counter()
            run_all()
            seen[name].append((time.perf_counter() - t0, common.cpu_seconds() - cpu0, common.loadavg()))
    out = []
    for name, rows in seen.items():
        wall, cpu, load = min(rows)
        r = {"name": name, "images": n, "first_call_s": round(first[name], 2), "seconds": wall, "cpu_seconds": cpu,
             "images_per_s": n / wall, "median_images_per_s": n / float(np.median([w for w, _, _ in rows])),
             "cpu_ms_per_image": 1000 * cpu / n, "load": load, "rounds": [n / w for w, _, _ in rows]}
        print(f"  {name:48s} {r['images_per_s']:7.1f} img/s (median {r['median_images_per_s']:5.1f})  "
              f"{r['cpu_ms_per_image']:5.1f} CPU-ms/img  first call {r['first_call_s']:4.1f} s  load {load:.1f}",
              flush=True)
        out.append(r)
    return out


def engines(run: Path, x_uint8: np.ndarray, rounds: int, passes: int = 1) -> list[dict]:
    """Every engine over the decoded images, `passes` times per timed round (as many images as
    extract reads, so that both sides are timed over runs of the same length)."""
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
    contenders = {
        PREDICT: lambda: model.predict(x, batch_size=BATCH, verbose=0),
        TF_FUNCTION: lambda: [fn(x[s]).numpy() for s in batches],
        "exported SavedModel serving_default (uint8)":
            lambda: [sm(image=tf.constant(x_uint8[s]))["probabilities"].numpy() for s in batches],
        ORT: lambda: [session.run(["probabilities"], {"image": x_uint8[s]}) for s in batches],
    }
    repeated = {name: (lambda once=once: [once() for _ in range(passes)]) for name, once in contenders.items()}
    return interleaved(repeated, n * passes, rounds, first_calls=contenders)


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
    traces = f"{traces} then {model.predict_function.experimental_get_tracing_count()}"
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
    steady = interleaved({
        "predict(numpy array)": lambda: model.predict(x, batch_size=BATCH, verbose=0),
        "predict(cached tf.data of batches)": lambda: model.predict(ds, verbose=0),
        "predict_on_batch, per batch": lambda: [model.predict_on_batch(b) for b in batches],
        "model.predict_function, per batch": lambda: [model.predict_function([(b,)]).numpy() for b in batches],
        "tf.function(model), per batch": lambda: [fn(b).numpy() for b in batches],
    }, n, rounds)
    one = x[:BATCH]
    one_t = tf.constant(one)
    small = interleaved({
        "predict(one batch of 32 as numpy)": lambda: model.predict(one, batch_size=BATCH, verbose=0),
        "predict_on_batch(the same 32)": lambda: model.predict_on_batch(one_t),
        "tf.function(model)(the same 32)": lambda: fn(one_t).numpy(),
    }, BATCH, rounds)
    return rows + steady + small


def _bare_loop(listed, size: int, model, engines: dict, engine: str) -> tuple[float, float]:
    """(img/s, CPU-ms/img) of the engine fed by extract's own pipeline from the JPEG files, writing nothing."""
    import tfvision.extract as ex

    listing = ex.Listing(range(len(listed)), listed)
    ds = ex.feature_dataset(ex._elements_from_listing(listing), len(listing), size, 3, BATCH)
    cpu0, t0 = common.cpu_seconds(), time.perf_counter()
    for _ in ex.in_order(engines[engine], ds):
        pass
    wall, cpu = time.perf_counter() - t0, common.cpu_seconds() - cpu0
    return len(listed) / wall, 1000 * cpu / len(listed)


def _arrays_loop(x: np.ndarray, engine, passes: int) -> tuple[float, float]:
    """(img/s, CPU-ms/img) of an extract engine on decoded float arrays, batches of 32, as extract calls it."""
    import tfvision.extract as ex

    batches = [{"image": x[i : i + BATCH]} for i in range(0, len(x), BATCH)] * passes
    cpu0, t0 = common.cpu_seconds(), time.perf_counter()
    for _ in ex.in_order(engine, batches):
        pass
    wall, cpu = time.perf_counter() - t0, common.cpu_seconds() - cpu0
    return len(x) * passes / wall, 1000 * cpu / (len(x) * passes)


def extract_runs(paths, size: int, backbone: str, workdir: Path, repeat: int, rounds: int,
                 x: np.ndarray) -> list[dict]:
    """The extract command over the same JPEGs, listed `repeat` times (so that the start-up of the
    pipeline, about one batch, weighs as little as the engines' untimed warm-up pass), and the bare
    loop under it (the same pipeline and engine, nothing written); `rounds` runs of each, alternating,
    the best kept. img/s is what the command reports: the extraction loop (read, decode, resize,
    model, checks, writing), after the model is built and traced."""
    import keras
    import pandas as pd

    import tfvision.extract as ex

    csv = workdir / "images.csv"
    listed = list(paths) * repeat
    pd.DataFrame({"path": listed, "id": range(len(listed))}).to_csv(csv, index=False)
    keras.utils.set_random_seed(0)
    model = ex.feature_model(backbone, None, size, 3)
    engines = {"keras": ex.keras_engine(model), "onnx": ex.onnx_engine(model)}
    for run in engines.values():
        run(np.zeros((1, size, size, 3), np.float32))
    seen = {}
    for _ in range(rounds):
        for engine in engines:
            dest = workdir / f"features_{engine}"
            code = ex.main(["--backbone", backbone, "--weights", "null", "--image-size", str(size), "--input",
                            str(csv), "--id-column", "id", "--output", str(dest), "--engine", engine,
                            "--batch-size", str(BATCH)])
            if code != 0:
                raise SystemExit(f"extract --engine {engine} failed ({code})")
            meta = json.loads((dest / "metadata.json").read_text())
            seen.setdefault(f"python -m tfvision.extract --engine {engine} (JPEG files)", []).append(
                (meta["images_per_s"], meta["cpu_ms_per_image"], common.loadavg()))
            speed, cpu_ms = _bare_loop(listed, size, model, engines, engine)
            seen.setdefault(f"{engine} engine fed by the same pipeline, no writing", []).append(
                (speed, cpu_ms, common.loadavg()))
            speed, cpu_ms = _arrays_loop(x, engines[engine], repeat)
            seen.setdefault(f"{engine} engine of extract on decoded arrays", []).append(
                (speed, cpu_ms, common.loadavg()))
    out = []
    for name, rows in seen.items():
        best, cpu_ms, load = max(rows)
        r = {"name": name, "images": len(listed), "images_per_s": best, "cpu_ms_per_image": cpu_ms,
             "median_images_per_s": float(np.median([x for x, _, _ in rows])), "load": load,
             "rounds": [x for x, _, _ in rows]}
        print(f"  {name:52s} {best:7.1f} img/s (median {r['median_images_per_s']:5.1f})  {cpu_ms:5.1f} CPU-ms/img"
              f"  load {load:.1f}", flush=True)
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
    ap.add_argument("--extract-repeat", type=int, default=8,
                    help="extract reads the image list this many times over (default 8: 2048 images)")
    ap.add_argument("--engine-passes", type=int, default=8,
                    help="passes over the images per timed engine round (default 8: as many images as "
                         "extract reads with the default --extract-repeat)")
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
        print(f"engines, batch {BATCH}, {len(x)} images x {args.engine_passes} passes, best of {args.rounds}:",
              flush=True)
        results = {"machine": info, "args": vars(args),
                   "engines": engines(run, x, args.rounds, args.engine_passes)}
        if not args.no_extract:
            results["extract"] = extract_runs(paths, args.size, args.backbone, tmp, args.extract_repeat,
                                              args.rounds, x.astype(np.float32))
        if not args.no_ablation:
            print("predict, taken apart:", flush=True)
            results["ablation"] = predict_ablation(run, x, args.rounds)

    eng = {r["name"]: r for r in results["engines"]}
    rows = [[r["name"], f"{r['images_per_s']:.1f}", f"{r['median_images_per_s']:.1f}",
             f"{r['cpu_ms_per_image']:.1f}", f"{r['first_call_s']:.1f}"] for r in results["engines"]]
    rows += [[r["name"], f"{r['images_per_s']:.1f}", f"{r['median_images_per_s']:.1f}",
              f"{r['cpu_ms_per_image']:.1f}", ""] for r in results.get("extract", [])]
    print()
    print(common.markdown_table(rows, ["engine", "img/s (best)", "img/s (median)", "CPU-ms/img", "first call (s)"]))
    predict = eng[PREDICT]["images_per_s"]
    ort_speed = eng[ORT]["images_per_s"]
    fastest = max(results["engines"], key=lambda r: r["images_per_s"])
    frugal = min(results["engines"], key=lambda r: r["cpu_ms_per_image"])
    by_cpu = lambda a, b: f"{b['cpu_ms_per_image'] / a['cpu_ms_per_image']:.2f}x"  # noqa: E731  (a vs b)
    ratios = [["ONNX Runtime / Keras predict", f"{ort_speed / predict:.2f}x", by_cpu(eng[ORT], eng[PREDICT]),
               ">= 1.2x"],
              ["tf.function / Keras predict", f"{eng[TF_FUNCTION]['images_per_s'] / predict:.2f}x",
               by_cpu(eng[TF_FUNCTION], eng[PREDICT]), ""]]
    ext = {r["name"]: r for r in results.get("extract", [])}
    for engine in ("keras", "onnx") if ext else ():
        cmd = ext[f"python -m tfvision.extract --engine {engine} (JPEG files)"]
        bare = ext[f"{engine} engine fed by the same pipeline, no writing"]
        ratios.append([f"extract --engine {engine} / fastest engine on decoded arrays ({fastest['name']}; "
                       f"by CPU: {frugal['name']})", f"{cmd['images_per_s'] / fastest['images_per_s']:.2f}x",
                       by_cpu(cmd, frugal), ">= 0.9x"])
        ratios.append([f"extract --engine {engine} / its engine fed from the same JPEGs",
                       f"{cmd['images_per_s'] / bare['images_per_s']:.2f}x", by_cpu(cmd, bare), ""])
        own = ext[f"{engine} engine of extract on decoded arrays"]
        ratios.append([f"extract --engine {engine} / its own engine on decoded arrays (what reading and "
                       "decoding cost)", f"{cmd['images_per_s'] / own['images_per_s']:.2f}x", by_cpu(cmd, own), ""])
    print()
    print(common.markdown_table(ratios, ["ratio", "by img/s", "by CPU time per image", "target"]))
    results["ratios"] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
