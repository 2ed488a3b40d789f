"""Frozen-backbone features: ``python -m tfvision.extract --backbone efficientnetv2_b0 --input X --output OUT``.

Runs a backbone with global average pooling, in inference mode, over every
image and writes, for downstream classifiers (the Rakuten preprocessing
document's feature-extraction step):

    OUT/features.npy   (N, D) float32 or float16, row i = image i of ids.csv
    OUT/labels.npy     (N,) class indices, or (N, K) multi-hot, when labels exist
    OUT/ids.csv        row, id, path, label
    OUT/metadata.json  backbone, weights, image size, feature dim, counts, class weights
                       (written last; an existing OUT is replaced only if it holds one)
                       (scikit-learn "balanced"), feature stats, speed, timestamp, rejected images
    OUT/tsne.png       with --tsne

Inputs: a CSV (``--path-column`` or ``--path-template``, optional
``--label-column`` and ``--id-column``), an image folder (class sub-folders
give labels), or a TFRecord shard folder made by ``python -m tfvision.convert``.
Images go through the evaluation pipeline (`tfvision.data.pipeline`): decode
by magic bytes, resize; normalisation is the backbone's ImageNet one (or the
run's, with ``--weights RUN/checkpoints/best.keras``). The model runs as a
compiled ``tf.function`` (``--engine keras``) or, converted, in ONNX Runtime
(``--engine onnx``); ``auto``, the default, takes ONNX Runtime when there is no GPU.

Memory stays flat whatever N: features and labels stream into ``.npy``
memory maps, ids.csv is appended batch by batch. Unreadable images are
skipped, listed in metadata.json, and leave no row. NaN or Inf in a batch
stops the command (exit 1; with ``--dtype float16`` it usually means values
beyond float16's range: use float32). Output appears atomically.

Exit codes: 0 success; 2 bad arguments or data (one line on stderr); 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime as dt
import logging
import os
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np

from tfvision import __version__
from tfvision.data.sources import IMAGE_SUFFIXES, image_files
from tfvision.errors import DataError, UserError
from tfvision.fileio import (
    atomic_path,
    check_output_outside,
    claim_dir,
    replace_dir,
    temp_dir_beside,
    write_json,
)

MARKER = "metadata.json"
log = logging.getLogger("tfvision.extract")

TSNE_MAX_POINTS = 5000
# ONNX Runtime engine: images per session call, as pixels (see `onnx_engine`).
ORT_PIXELS_PER_CALL = 4 * 224 * 224


class NonFiniteFeatures(RuntimeError):
    """A batch produced NaN or Inf features."""


# --------------------------------------------------------------------------- inputs


class Listing:
    """What to extract: N images with ids, and optional labels (class names)."""

    def __init__(self, ids, paths, labels=None, description=""):
        self.ids, self.paths, self.labels, self.description = list(ids), list(paths), labels, description
        self.class_names = sorted(set(labels)) if labels is not None else None

    def __len__(self):
        return len(self.paths)


def list_csv(path: Path, path_column: str, label_column: str | None, id_column: str | None,
             path_template: str | None, root: Path | None) -> Listing:
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    root = root or path.parent
    if path_template:
        fields = [f for _, f, _, _ in string.Formatter().parse(path_template) if f]
        absent = [f for f in fields if f not in frame]
        if absent:
            raise DataError(f"--path-template uses column(s) {absent} not in {path}")
        rel = [path_template.format(**row) for row in frame.to_dict("records")]
    elif path_column in frame:
        rel = frame[path_column].tolist()
    else:
        raise DataError(f"{path}: no column {path_column!r} (columns: {list(frame.columns)}); "
                        f"pass --path-column or --path-template")
    paths = [str(root / p) for p in rel]
    if id_column and id_column not in frame:
        raise DataError(f"{path}: no column {id_column!r} for --id-column")
    ids = frame[id_column].tolist() if id_column else rel
    labels = None
    if label_column and label_column in frame:
        labels = frame[label_column].tolist()
    return Listing(ids, paths, labels, f"csv {path}")


def list_folder(root: Path) -> Listing:
    """root/*.jpg (no labels) or root/<class>/**/*.jpg (labels: the folder names)."""
    top = image_files(root, recursive=False)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = [(c.name, image_files(c)) for c in classes]
    nested = [(c, files) for c, files in nested if files]
    if top and nested:
        raise DataError(f"{root}: images both at the top and in class folders; use one layout or a CSV")
    if top:
        return Listing([p.name for p in top], [str(p) for p in top], None, f"folder {root}")
    if not nested:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    files = [(c, f) for c, fs in nested for f in fs]
    return Listing([str(f.relative_to(root)) for _, f in files], [str(f) for _, f in files],
                   [c for c, _ in files], f"class folders {root}")


def is_tfrecord_dir(root: Path) -> bool:
    return root.is_dir() and ((root / "manifest.json").is_file() or any(root.glob("*.tfrecord*")))


# --------------------------------------------------------------------------- model and engines


def feature_model(backbone: str, weights: str | None, image_size: int, channels: int):
    """Input (0..255) -> normalisation -> frozen backbone -> global average pooling."""
    import keras

    from tfvision.models.layers import ImageNormalization

    shape = (image_size, image_size, channels)
    if weights and weights.endswith(".keras"):  # a tfvision checkpoint: its backbone and normalisation
        from tfvision.models.checkpoint import load_float32

        trained = load_float32(weights)  # a mixed-precision run's features too are computed in float32
        net, norm = trained.get_layer("backbone"), trained.get_layer("normalize")
        normalize = ImageNormalization(norm.mean, norm.std, norm.bgr, name="normalize")
    else:
        from tfvision.models.backbones import build_backbone
        from tfvision.models.heads import input_norm

        net = build_backbone(backbone, shape, weights)
        n = input_norm(backbone, "imagenet", channels)
        normalize = ImageNormalization(n.mean, n.std, n.bgr and channels >= 3, name="normalize")
    net.trainable = False
    inputs = keras.Input(shape, name="image")
    x = net(normalize(inputs), training=False)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="pool")(x), name="features")


class Engine:
    """`run(images) -> features`, and how many batches may run at once (run is thread-safe)."""

    def __init__(self, run, in_flight: int = 1):
        self.run, self.in_flight = run, in_flight

    def __call__(self, images):
        return self.run(images)


def keras_engine(model) -> Engine:
    """A compiled tf.function (about 2x `model.predict` per batch on CPU, see benchmarks/)."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="image")
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return Engine(lambda images: fn(images).numpy())


def onnx_engine(model) -> Engine:
    """The same graph through tf2onnx and ONNX Runtime (see `tfvision.serving` for the fixes).

    Two batches run at once, each on a single-threaded session (one per core on 2 cores),
    while the input pipeline decodes on the same cores, and each batch goes through the
    session in slices of about `ORT_PIXELS_PER_CALL` pixels (4 images at 224 px).

    Why slices: ONNX Runtime 1.31's CPU kernels run layer by layer over the whole input, so
    a batch of 32 at 224 px streams activations of tens of MB per layer through memory, where
    4 images keep them near the 2 MB per-core L2. Measured on 2 cores with EfficientNetV2-B0:
    150-158 img/s in slices of 1 to 8 images against 131-137 at batch 32, at 12.5-13.6
    against 14.5-15.2 CPU-ms per image (benchmarks/README.md). TensorFlow's kernels go the
    other way (107 img/s at 32, 64 at 4), so the Keras engine keeps whole batches.
    """
    import onnxruntime as ort
    import tensorflow as tf

    from tfvision import serving

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="image")
    fn = tf.function(lambda image: {"features": model(image, training=False)}, input_signature=[spec])
    onnx_model = serving.to_onnx(serving.freeze(fn.get_concrete_function()))
    in_flight = 2
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, (os.cpu_count() or 2) // in_flight)
    session = ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    height, width = model.input_shape[1:3]
    step = max(1, ORT_PIXELS_PER_CALL // (height * width))

    def run(images):
        x = np.asarray(images, np.float32)
        return np.concatenate([session.run(["features"], {"image": x[i : i + step]})[0]
                               for i in range(0, len(x), step)])

    return Engine(run, in_flight)


def choose_engine(model, name: str) -> tuple[Engine, str]:
    """(engine, its name) for ``--engine keras|onnx|auto``.

    ``auto`` (the default) takes ONNX Runtime when TensorFlow sees no GPU: on CPU it ran about 1.5x
    the Keras engine (benchmarks/README.md), for a conversion of a few seconds. With a GPU,
    or when the conversion fails (the reason is logged), it takes the Keras engine.
    """
    if name == "keras":
        return keras_engine(model), "keras"
    if name == "onnx":
        return onnx_engine(model), "onnx"
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return keras_engine(model), "keras"
    try:
        return onnx_engine(model), "onnx"
    except Exception as e:  # a converter gap must not stop an extraction the Keras engine can do
        log.warning("--engine auto: ONNX conversion failed (%s: %s); using the Keras engine",
                    type(e).__name__, e)
        return keras_engine(model), "keras"


def in_order(engine: Engine, dataset):
    """(batch, features) in dataset order, with up to `engine.in_flight` batches running at once."""
    if engine.in_flight <= 1:
        for batch in dataset:
            yield batch, engine(batch["image"])
        return
    from concurrent.futures import ThreadPoolExecutor

    pending = collections.deque()
    with ThreadPoolExecutor(engine.in_flight, thread_name_prefix="extract") as pool:
        for batch in dataset:
            pending.append((batch, pool.submit(engine, batch["image"])))
            if len(pending) >= engine.in_flight:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


# --------------------------------------------------------------------------- datasets


def _elements_from_listing(listing: Listing):
    import tensorflow as tf

    n = len(listing)
    return tf.data.Dataset.from_tensor_slices({
        "path": np.asarray(listing.paths, dtype=str), "row": np.arange(n, dtype=np.int64),
        "target": np.zeros((n, 1), np.float32), "tier": np.zeros(n, np.int32)})


def _elements_from_records(root: Path, splits: list[str]):
    """(elements, n, class_names, task) from a shard folder; every record carries its id."""
    import tensorflow as tf

    from tfvision.data import features as F
    from tfvision.data.tfrecord import check_shards, read_manifest, shard_records

    manifest = read_manifest(str(root))
    check_shards(str(root), manifest)
    shards = [s for s in manifest["shards"] if s["name"].split("-", 1)[0] in splits]
    n = sum(int(manifest["counts"].get(s, 0)) for s in splits)
    if not shards:
        raise DataError(f"{root}: no {'/'.join(splits)} shards")
    spec = F.parse_spec(manifest["num_classes"], has_known=manifest["has_known"], has_eval=manifest["has_eval"],
                        has_mask=manifest["has_mask"], keys=(F.ENCODED, F.ID, F.TARGET))
    # cycle_length=1: shard after shard, the order `convert` wrote (and ids.csv lists).
    records = shard_records(str(root), manifest, shards, cycle_length=1)

    def element(row, record):
        p = tf.io.parse_single_example(record, spec)
        return {"bytes": p[F.ENCODED], "id": p[F.ID], "label": p[F.TARGET], "row": row,
                "target": tf.zeros([1]), "tier": tf.constant(0, tf.int32)}

    return records.enumerate().map(element), n, list(manifest["class_names"]), manifest.get("task")


def feature_dataset(elements, n: int, image_size: int, channels: int, batch_size: int):
    """The evaluation pipeline (decode by magic bytes, resize, batch) over extraction elements."""
    import tensorflow as tf

    from tfvision.config import AugmentParams
    from tfvision.data.pipeline import PipelineSpec, from_elements

    spec = PipelineSpec(image_size=(image_size, image_size), channels=channels, batch_size=batch_size,
                        tiers=[AugmentParams()], augment=False)
    dataset = from_elements(elements, spec, training=False, format_batch=lambda b: b, size_hint=n)
    options = tf.data.Options()
    # TF 2.21: with tf.data autotuning on, leaving the `for batch in dataset` loop stalled for
    # seconds after the last batch whenever the model was slower than the pipeline (8 s after
    # 1024 images at 224 px on 2 cores, 40% of the run). Without it, AUTOTUNE parallelism falls
    # back to one call per core, which measured as fast for this decode-and-resize pipeline.
    options.autotune.enabled = False
    return dataset.with_options(options)


# --------------------------------------------------------------------------- extraction


def extract(args) -> dict:
    """Run the extraction into args.output; returns metadata.json's content."""
    import tensorflow as tf
    from tqdm import tqdm

    from tfvision.losses import class_weights
    from tfvision.tasks import get_task

    source = Path(args.input)
    if is_tfrecord_dir(source):
        elements, n, class_names, task_name = _elements_from_records(source, args.split)
        listing, task = None, get_task(task_name)
        description = f"tfrecord {source} ({', '.join(args.split)})"
    else:
        listing = (list_folder(source) if source.is_dir() else
                   list_csv(source, args.path_column, args.label_column, args.id_column, args.path_template,
                            Path(args.root) if args.root else None))
        elements, n, class_names, task = (_elements_from_listing(listing), len(listing), listing.class_names,
                                          None)
        description = listing.description
        index = {c: i for i, c in enumerate(class_names or [])}
    if n == 0:
        raise DataError(f"{source}: no images")
    has_labels = class_names is not None and (listing.labels is not None if listing is not None
                                              else task.label_layout is not None)

    import keras

    keras.utils.set_random_seed(args.seed)  # --weights null: the same random backbone every run
    model = feature_model(args.backbone, args.weights, args.image_size, args.channels)
    dim = int(model.output_shape[-1])
    engine, engine_name = choose_engine(model, args.engine)
    dataset = feature_dataset(elements, n, args.image_size, args.channels, args.batch_size)
    # Trace, and let the runtime size its buffers for a full batch, before the clock starts.
    engine(np.zeros((min(args.batch_size, n), args.image_size, args.image_size, args.channels), np.float32))

    out = Path(args.output)
    dtype = np.dtype(args.dtype)
    feats = np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=dtype, shape=(n, dim))
    multi_hot = task is not None and task.label_layout == "multi_hot"
    label_shape = (n, len(class_names)) if multi_hot else (n,)
    labels = (np.lib.format.open_memmap(out / "labels.npy", mode="w+", dtype=np.int64, shape=label_shape)
              if has_labels else None)
    total, total_sq, rows = np.zeros(dim), np.zeros(dim), 0
    done = np.zeros(n, bool)  # 1 byte per input image: which ones produced a row
    start, cpu_start = time.perf_counter(), time.process_time()
    with open(out / "ids.csv", "w", newline="") as f, tqdm(total=n, unit="img", desc="extracting") as bar:
        writer = csv.writer(f)
        writer.writerow(["row", "id", "path", "label"])
        for batch, x in in_order(engine, dataset):
            idx = batch["row"].numpy()
            with np.errstate(over="ignore"):  # float16 overflow becomes Inf, reported just below
                stored = np.asarray(x, np.float32).astype(dtype, copy=False)
            bad = ~np.isfinite(stored).all(axis=1)
            if bad.any():
                which = [_id_of(listing, batch, i, idx) for i in np.flatnonzero(bad)[:5]]
                hint = " (float16 overflow? use --dtype float32)" if dtype == np.float16 and np.isfinite(x).all() else ""
                raise NonFiniteFeatures(f"NaN/Inf features for {which}{hint}")
            b = len(idx)
            feats[rows : rows + b] = stored
            total += stored.sum(0, dtype=np.float64)
            total_sq += np.square(stored, dtype=np.float64).sum(0)
            for j, i in enumerate(idx):
                row_id, path, label = _row(listing, batch, j, i, class_names, task)
                writer.writerow([rows + j, row_id, path, label])
            if labels is not None:
                if listing is not None:
                    labels[rows : rows + b] = [index[listing.labels[i]] for i in idx]
                else:
                    labels[rows : rows + b] = task.image_labels(batch["label"].numpy())
            rows += b
            done[idx] = True
            bar.update(b)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    kept = rows
    del feats, labels  # flushes the memory maps
    if kept < n:  # unreadable images were skipped: shrink the files to the rows written
        _truncate(out / "features.npy", kept)
        if has_labels:
            _truncate(out / "labels.npy", kept)
    rejected = _rejected(done, listing)
    for r in rejected[:10]:
        log.warning("skipped unreadable image %s", r.get("path", r.get("record")))
    mean = total / max(kept, 1)
    std = np.sqrt(np.maximum(total_sq / max(kept, 1) - mean**2, 0.0))
    meta = {
        "backbone": args.backbone, "weights": args.weights, "image_size": [args.image_size, args.image_size],
        "channels": args.channels, "feature_dim": dim, "dtype": args.dtype, "engine": engine_name,
        "pooling": "global_average", "input": description, "n_images": kept, "n_input": n,
        "n_rejected": n - kept, "rejected": rejected,
        "tfvision_version": __version__, "tensorflow_version": tf.__version__,
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 3), "images_per_s": round(kept / elapsed, 2) if elapsed > 0 else None,
        "cpu_ms_per_image": round(1000 * cpu / max(kept, 1), 2),  # all threads of the process
        "feature_stats": {"mean": float(mean.mean()), "std": float(np.sqrt((std**2 + (mean - mean.mean())**2).mean())),
                          "mean_dim_std": float(std.mean())},
    }
    if has_labels:
        lab = np.load(out / "labels.npy", mmap_mode="r")
        counts = (np.asarray(lab).sum(0) if multi_hot else np.bincount(lab, minlength=len(class_names))).astype(int)
        meta.update(class_names=class_names, label_encoder={c: i for i, c in enumerate(class_names)},
                    num_classes=len(class_names), labels="multi-hot" if multi_hot else "index",
                    class_counts={c: int(k) for c, k in zip(class_names, counts, strict=True)},
                    # = sklearn compute_class_weight("balanced"): N / (K * n_k)
                    class_weights=[round(float(w), 6) for w in class_weights(counts, "inverse")])
    log.info("%d images, %d features each, %.1f img/s (%s engine)", kept, dim, meta["images_per_s"] or 0, engine_name)
    return meta


def _id_of(listing, batch, j, idx):
    return listing.ids[idx[j]] if listing is not None else batch["id"][j].numpy().decode()


def _row(listing, batch, j, i, class_names, task):
    if listing is not None:
        return listing.ids[i], listing.paths[i], listing.labels[i] if listing.labels is not None else ""
    label = task.output.label(task.image_labels(batch["label"][j : j + 1].numpy())[0], class_names)
    return batch["id"][j].numpy().decode(), "", label


def _rejected(done: np.ndarray, listing) -> list[dict]:
    """Input rows that produced no feature row (the pipeline skipped them as unreadable)."""
    missing = np.flatnonzero(~done)
    if listing is None:
        return [{"record": int(i), "reason": "could not be decoded"} for i in missing]
    return [{"id": listing.ids[i], "path": listing.paths[i], "reason": "unreadable image"} for i in missing]


def _truncate(path: Path, rows: int, chunk: int = 4096) -> None:
    """Rewrite an .npy memmap with only its first `rows` rows, chunk by chunk (flat memory)."""
    src = np.load(path, mmap_mode="r")
    tmp = path.with_name(path.name + ".tmp")
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(rows, *src.shape[1:]))
    for s in range(0, rows, chunk):
        dst[s : s + chunk] = src[s : min(s + chunk, rows)]
    dst.flush()
    del dst, src
    os.replace(tmp, path)


def tsne_plot(out: Path, meta: dict, seed: int = 0) -> None:
    """2-D t-SNE of up to 5000 feature rows, coloured by label, to tsne.png."""
    from sklearn.manifold import TSNE

    from tfvision.plots import _pyplot

    feats = np.load(out / "features.npy", mmap_mode="r")
    n = len(feats)
    if n < 5:
        log.warning("--tsne: %d images are too few for a t-SNE plot; skipped", n)
        return
    take = np.sort(np.random.default_rng(seed).choice(n, min(n, TSNE_MAX_POINTS), replace=False))
    x = np.asarray(feats[take], np.float32)
    xy = TSNE(n_components=2, perplexity=min(30.0, (len(take) - 1) / 3), init="pca",
              random_state=seed).fit_transform(x)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 8))
    color = None
    if (out / "labels.npy").is_file() and meta.get("labels") == "index":
        color = np.load(out / "labels.npy", mmap_mode="r")[take]
    points = ax.scatter(xy[:, 0], xy[:, 1], c=color, cmap="tab20" if color is not None else None, s=6, alpha=0.7)
    if color is not None and len(meta["class_names"]) <= 20:
        handles, _ = points.legend_elements(num=list(range(len(meta["class_names"]))))
        ax.legend(handles, meta["class_names"], fontsize=7, loc="best", markerscale=0.8)
    ax.set_title(f"t-SNE of {meta['backbone']} features ({len(take)} of {n} images)")
    ax.set_xticks([])
    ax.set_yticks([])
    try:
        with atomic_path(out / "tsne.png", suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tfvision.extract",
        description="Extract frozen-backbone features to .npy. Exit 0 ok, 2 bad arguments or data, 1 other.")
    p.add_argument("--backbone", required=True, help="registered backbone, e.g. efficientnetv2_b0")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet, null (random), a backbone weights file, or a run's checkpoints/best.keras")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--input", required=True, help="CSV, image folder, or TFRecord shard folder")
    p.add_argument("--output", required=True, help="output folder (replaced atomically)")
    p.add_argument("--engine", choices=["auto", "keras", "onnx"], default="auto",
                   help="auto (default): ONNX Runtime on a machine without a GPU, else Keras")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="features.npy dtype")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tsne", action="store_true", help="also write tsne.png")
    p.add_argument("--seed", type=int, default=0, help="seed (random weights with --weights null, t-SNE)")
    p.add_argument("--path-column", default="path", help="CSV: image path column (relative to --root)")
    p.add_argument("--path-template", help="CSV: path from columns, e.g. image_{imageid}_product_{productid}.jpg")
    p.add_argument("--label-column", default="label", help="CSV: label column, used when present")
    p.add_argument("--id-column", help="CSV: id column (default: the path)")
    p.add_argument("--root", help="CSV: folder that relative paths start from (default: the CSV's folder)")
    p.add_argument("--split", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"],
                   help="TFRecord: which splits' shards to read")
    args = p.parse_args(argv)
    if args.weights in ("null", "none", "None"):
        args.weights = None
    return args


def main(argv=None) -> int:
    from tfvision.cli import run_command

    return run_command(run, parse_args, argv)


def run(args) -> int:
    """The extract command on parsed arguments (`UserError` -> exit 2 in `tfvision.cli`)."""
    from tfvision.backend import use_tensorflow

    use_tensorflow("extract")  # before Keras is imported
    out = Path(args.output)
    if not Path(args.input).exists():
        raise DataError(f"--input: {args.input} does not exist")
    if args.weights not in (None, "imagenet") and not Path(args.weights).is_file():
        raise UserError(f"--weights: {args.weights!r} is neither imagenet, null, nor an existing file")
    refusal = (f"--output: {out} exists and is not an earlier extraction (no {MARKER}); tfvision replaces "
               f"only its own output, so give a new folder")
    claim_dir(out, MARKER, refusal)
    check_output_outside(out, [args.input], "--output")
    tmp = temp_dir_beside(out)
    try:
        meta = extract(argparse.Namespace(**{**vars(args), "output": str(tmp)}))
        if args.tsne:
            tsne_plot(tmp, meta, args.seed)
        write_json(tmp / MARKER, meta)  # last: the folder is complete and ours
        replace_dir(tmp, out, MARKER, refusal)
    except UserError as e:  # backbone errors speak config keys; here they are flags
        raise UserError(str(e).replace("model.weights", "--weights").replace("model.backbone", "--backbone")) from None
    except NonFiniteFeatures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("features written to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
