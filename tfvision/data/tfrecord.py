"""TFRecord shards: write one shard, verify a shard folder, and read shards for training.

A shard folder holds ``{split}-{i:05d}-of-{n:05d}.tfrecord`` (``.tfrecord.gz``
with GZIP) and ``manifest.json`` (counts, classes, each shard's records, size
and sha256, rejected files). The record keys are in `tfvision.data.features`;
`tfvision.data.conversion` plans the shards. The local converter
(`tfvision.convert`) calls `write_shard` for each; the Beam pipeline
(`tfvision.data.beam`) calls `check_sample` for each sample and `write_records` for
each shard. Both encode with `encode_checked`.

Reading goes through ``tf.io.gfile``, so a ``gs://`` folder works (TPU). A
shard whose size differs from the manifest stops `RecordInputs` before
training; a shard that ends early while read (a corrupt record) is named in an
error: raised by `targets` and `--verify`, printed on stderr in training,
where the shared tail skips failing elements.

>>> inputs = RecordInputs(cfg, get_task("classification", cfg))   # cfg.data.root: the shard folder
>>> ds = inputs.dataset("train", PipelineSpec.from_config(cfg), training=True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import sys
from contextlib import contextmanager

import numpy as np
import tensorflow as tf

from tfvision.config import Config
from tfvision.data import features as F
from tfvision.data.check import probe, rejection_reason
from tfvision.data.decode import describe_error, image_shape, is_jpeg, is_png
from tfvision.data.inputs import Inputs, sample_weight
from tfvision.data.instances import parsed_instances
from tfvision.data.pipeline import PipelineSpec, dataset_stats, from_elements
from tfvision.data.sources import SPLIT_NAMES as SPLITS
from tfvision.errors import ConfigError, DataError
from tfvision.fileio import atomic_path, write_json

log = logging.getLogger("tfvision.data")

MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^(train|val|test)-(\d{5})-of-(\d{5})\.tfrecord(\.gz)?$")
CYCLE_LENGTH = 16  # shards read at once; also how far records of different shards mix
READ_BUFFER = 1 << 20  # bytes per open shard


def shard_name(split: str, index: int, count: int, gzip: bool = False) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord" + (".gz" if gzip else "")


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass
class ShardJob:
    """One shard to write: its rows are (path, image_id, group, label, target, known, eval, fold,
    mask path or None, instance features or None)."""

    directory: str
    name: str
    rows: list[tuple]
    channels: int
    gzip: bool = False
    threads: int | None = None  # decode threads (default: TF's choice, all cores)
    parent_pid: int | None = None  # a worker process stops when this process dies
    num_classes: int = 0  # segmentation: labels a mask may hold (0..K-1), counted per pixel


def checked_mask(path: str, hw, num_classes: int) -> tuple[bytes, np.ndarray]:
    """(the mask file's bytes, its pixels per class) for the image of size `hw`.

    Raises:
        DataError: not a PNG, unreadable, another size than its image, or a label >= K,
            each of which would otherwise train on misaligned or out-of-range targets.
    """
    from tfvision.data.decode import decode_mask

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except tf.errors.OpError as e:
        raise DataError(f"mask {path}: {describe_error(e)}") from None
    if F.image_format(data) != "png":
        raise DataError(f"mask {path}: not a PNG (label images must be lossless 8- or 16-bit PNG)")
    try:
        labels = decode_mask(tf.constant(data)).numpy()[..., 0]
    except tf.errors.InvalidArgumentError as e:
        raise DataError(f"mask {path}: {describe_error(e)}") from None
    if tuple(labels.shape) != tuple(int(v) for v in hw):
        raise DataError(f"mask {path}: {labels.shape[0]}x{labels.shape[1]}, its image is {hw[0]}x{hw[1]}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"mask {path}: label {int(labels.max())} outside 0..{num_classes - 1} "
                        f"(data.class_names has {num_classes})")
    return data, np.bincount(labels.ravel(), minlength=num_classes)


def _probe(data: tf.Tensor, channels: int):
    """The check pass's decode (`tfvision.data.check`) plus the header facts a record keeps:
    (decoded shape, [h, w], channels stored in the file). JPEGs decode at 1/8 scale; the
    whole entropy-coded stream, where truncation and corruption show, is still read."""
    checked = probe(data, channels)
    png_type = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 25, 1), tf.uint8)[0], tf.int32)
    native = tf.case(
        [(is_jpeg(data), lambda: tf.image.extract_jpeg_shape(data)[2]),
         # PNG colour type -> channels: gray, -, RGB, palette, gray+alpha, -, RGBA
         (is_png(data), lambda: tf.gather([1, 0, 3, 3, 2, 0, 4], tf.minimum(png_type, 6)))],
        default=lambda: tf.shape(tf.io.decode_image(data, channels=0, expand_animations=False))[2],
    )
    return checked, image_shape(data), native


_CHECKERS: dict[int, object] = {}


def _checker(channels: int):
    """read + `_probe` as one tf.function per channel count, traced once per process
    (a map function traced per shard cost about 0.3 s a shard)."""
    if channels not in _CHECKERS:

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def check(path):
            data = tf.io.read_file(path)
            _, hw, native = _probe(data, channels)  # probe asserts a non-empty image
            return data, hw, native

        _CHECKERS[channels] = check
    return _CHECKERS[channels]


def checked_images(paths: list[str], channels: int, threads: int | None = None) -> tf.data.Dataset:
    """(index, bytes, [h, w], channels) of every readable, decodable file in `paths`, in order.

    Read and decode-checked in a parallel map (no Python per image); a file that
    fails is left out, so a gap in the indices marks a rejected file.
    """
    check = _checker(channels)
    ds = tf.data.Dataset.from_tensor_slices(list(paths)).enumerate()
    ds = ds.map(lambda i, path: (i, *check(path)), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True).ignore_errors()
    options = tf.data.Options()
    if threads:
        options.threading.private_threadpool_size = threads
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


@contextmanager
def _record_writer(path, gzip: bool):
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        yield writer


def _reason(path: str, channels: int) -> str:
    return rejection_reason(path, channels) or "cannot be decoded"


def encode_checked(row: tuple, data: bytes, hw, native: int, num_classes: int) -> tuple[bytes, np.ndarray | None]:
    """The record of a `ShardJob` row whose image passed the check: (serialized tf.Example,
    its mask's pixels per class or None). Raises `checked_mask`'s DataError for a bad mask."""
    path, image_id, group, label, target, known, eval_target, fold, mask_path, instances = row
    mask = counts = None
    if mask_path is not None:
        mask, counts = checked_mask(mask_path, hw, num_classes)
    return F.encode_example(
        image=data, height=hw[0], width=hw[1], channels=native, image_id=image_id, group=group,
        label=label, target=target, fold=fold, known=known, eval_target=eval_target, mask=mask,
        instances=instances), counts


def check_sample(row: tuple, channels: int, num_classes: int = 0):
    """Read, check and encode one `ShardJob` row on its own, with `write_shard`'s checks and
    rejection reasons (the per-sample step of the Beam conversion, `tfvision.data.beam`).

    Returns:
        (record, pixel counts or None, None), or (None, None, {"path", "reason"}) for a rejected file.
    """
    try:
        data, hw, native = (t.numpy() for t in _checker(channels)(tf.constant(row[0])))
    except tf.errors.OpError:
        return None, None, {"path": row[0], "reason": _reason(row[0], channels)}
    try:
        record, counts = encode_checked(row, data, hw, native, num_classes)
    except DataError as e:  # the image is fine, its label image is not: the sample goes
        return None, None, {"path": row[0], "reason": str(e)}
    return record, counts, None


def write_records(final: str, records, gzip: bool) -> tuple[int, str]:
    """Write serialized `records` as the shard `final`, under a temporary name renamed when
    complete. Returns (size in bytes, sha256 hex)."""
    with atomic_path(final) as tmp:
        with _record_writer(tmp, gzip) as writer:
            for record in records:
                writer.write(record)
        return file_digest(str(tmp))


def write_shard(job: ShardJob) -> dict:
    """Check, encode and write one shard under a temporary name, then rename it.

    Each file is read once; its bytes are decode-checked and written as they are.
    Returns ``{"name", "records", "bytes", "sha256", "rejected", "pixel_counts"}``.
    """
    rows, rejected, expected, written = job.rows, [], 0, 0
    pixels = np.zeros(job.num_classes, np.int64)

    def reject(upto):
        for j in range(expected, upto):
            rejected.append({"path": rows[j][0], "reason": _reason(rows[j][0], job.channels)})

    def records():
        nonlocal expected, written
        stream = checked_images([r[0] for r in rows], job.channels, job.threads)
        for i, data, hw, native in stream.as_numpy_iterator():
            if job.parent_pid is not None and os.getppid() != job.parent_pid:
                raise RuntimeError("the converter process is gone")  # no rename: the shard is redone
            reject(i)
            expected = i + 1
            try:
                record, counts = encode_checked(rows[i], data, hw, native, job.num_classes)
            except DataError as e:  # the image is fine, its label image is not: the sample goes
                rejected.append({"path": rows[i][0], "reason": str(e)})
                continue
            if counts is not None:
                pixels[:] += counts
            written += 1
            yield record
        reject(len(rows))

    size, digest = write_records(os.path.join(job.directory, job.name), records(), job.gzip)
    return shard_result(job.name, written, size, digest, rejected, pixels)


def shard_result(name: str, records: int, size: int, digest: str, rejected: list, pixels) -> dict:
    """What `convert` keeps of a written shard (the state file, then the manifest)."""
    return {"name": name, "records": records, "bytes": size, "sha256": digest, "rejected": rejected,
            "pixel_counts": [int(v) for v in pixels]}


def file_digest(path: str, chunk: int = 4 << 20) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a local or gs:// file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


# --------------------------------------------------------------------------- manifest and verify


def read_manifest(root: str) -> dict:
    path = join(root, MANIFEST)
    if not tf.io.gfile.exists(path):
        raise DataError(f"{path}: not found; make shards with python -m tfvision.convert")
    import json

    with tf.io.gfile.GFile(path) as f:
        manifest = json.loads(f.read())
    version = manifest.get("schema_version")
    if version != F.SCHEMA_VERSION:
        raise DataError(f"{path}: record schema version {version}, this tfvision reads "
                        f"version {F.SCHEMA_VERSION}; convert the data again")
    return manifest


def _spec_of(manifest: dict, keys=None) -> dict:
    return F.parse_spec(manifest["num_classes"], has_known=manifest["has_known"],
                        has_eval=manifest["has_eval"], has_mask=manifest["has_mask"],
                        has_instances=manifest.get("has_instances", False), keys=keys)


def verify(root: str, progress: bool = True) -> tuple[list[str], int]:
    """Re-read every shard: size and sha256 against the manifest, every record's
    CRC and parse, and the record counts. Returns (problems, shards checked)."""
    from tqdm import tqdm

    manifest = read_manifest(root)
    problems = []
    listed = {s["name"] for s in manifest["shards"]}
    on_disk = {os.path.basename(p) for p in tf.io.gfile.listdir(root)}
    problems += [f"{n}: shard file not listed in {MANIFEST}" for n in sorted(on_disk - listed)
                 if SHARD_RE.match(n)]
    spec = _spec_of(manifest)
    per_split = dict.fromkeys(SPLITS, 0)
    for shard in tqdm(manifest["shards"], desc="verifying shards", unit="shard",
                      disable=None if progress else True):
        name, path = shard["name"], join(root, shard["name"])
        if name not in on_disk:
            problems.append(f"{name}: missing")
            continue
        per_split[SHARD_RE.match(name).group(1)] += shard["records"]
        size, digest = file_digest(path)
        if size != shard["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']} (truncated or replaced)")
        elif digest != shard["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (modified after conversion)")
        n, error, batch = 0, None, []
        try:
            for record in tf.data.TFRecordDataset(path, "GZIP" if name.endswith(".gz") else "", READ_BUFFER):
                n += 1
                batch.append(record)
                if len(batch) == 256:
                    tf.io.parse_example(tf.stack(batch), spec)
                    batch = []
            if batch:
                tf.io.parse_example(tf.stack(batch), spec)
        except tf.errors.DataLossError as e:
            error = f"unreadable after record {n}: {describe_error(e)}"
        except tf.errors.InvalidArgumentError as e:
            error = f"a record among records {n - len(batch) + 1}..{n} does not parse: {describe_error(e)}"
        if error:
            problems.append(f"{name}: {error}")
        elif n != shard["records"]:
            problems.append(f"{name}: {n} records, manifest says {shard['records']}")
    for split in SPLITS:
        want = manifest["counts"].get(split, 0)
        if per_split[split] != want and not problems:
            problems.append(f"{MANIFEST}: {split} shards hold {per_split[split]} records, counts say {want}")
    return problems, len(manifest["shards"])


# --------------------------------------------------------------------------- reading


def _shard_records(path: tf.Tensor, expected: tf.Tensor, compression: str) -> tf.data.Dataset:
    """Records of one shard, failing with the shard's name if it ends early or late.

    TFRecordDataset's own error ("corrupted record at 5097") does not name the
    file; `ignore_errors` here ends this shard at the bad record, and the count
    check at the end turns the shortfall into an error that does.
    """
    records = tf.data.TFRecordDataset(path, compression, READ_BUFFER).ignore_errors()
    end = tf.data.Dataset.from_tensors(tf.constant(b""))  # records are never empty

    def check(i, record):
        ok = tf.logical_or(tf.strings.length(record) > 0, tf.equal(i, expected))
        message = tf.strings.join([
            "shard ", path, " is corrupt or truncated: read ", tf.as_string(i), " of ",
            tf.as_string(expected), " records; run python -m tfvision.convert --verify on its folder"])
        # tf.print as well: the training pipeline skips failing elements (ignore_errors),
        # and TF's own warning is hidden under TF_CPP_MIN_LOG_LEVEL=2.
        def report():
            tf.print("ERROR:", message, output_stream=sys.stderr)
            return tf.constant(False)

        reported = tf.cond(ok, lambda: tf.constant(True), report)
        with tf.control_dependencies([reported, tf.debugging.Assert(ok, [message])]):
            return tf.identity(record)

    return (records.concatenate(end).enumerate().map(check)
            .filter(lambda r: tf.strings.length(r) > 0))


def check_shards(root: str, manifest: dict) -> None:
    """Every shard the manifest lists exists with its listed size (cheap: no shard is read).

    Raises:
        DataError: a shard is missing, truncated or replaced.
    """
    for shard in manifest["shards"]:
        path = join(root, shard["name"])
        try:
            size = tf.io.gfile.stat(path).length
        except tf.errors.NotFoundError:
            raise DataError(f"{path}: shard listed in {MANIFEST} is missing") from None
        if size != shard["bytes"]:
            raise DataError(f"{path}: {size} bytes, {MANIFEST} says {shard['bytes']} (truncated or "
                            f"replaced); run python -m tfvision.convert --verify {root}")


def shard_records(root: str, manifest: dict, shards: list[dict], *, shuffle_seed: int | None = None,
                  cycle_length: int = CYCLE_LENGTH, deterministic: bool = True) -> tf.data.Dataset:
    """The records of `shards` (manifest entries), each shard checked for its record count.

    Args:
        root: the shard folder.
        manifest: its `read_manifest`.
        shards: the manifest entries to read.
        shuffle_seed: shuffle the shard order with this seed (training); None keeps it.
        cycle_length: shards read at once, one record from each in turn; 1 reads them in order.
        deterministic: keep the interleaved order fixed.
    """
    files = [join(root, s["name"]) for s in shards]
    compression = "GZIP" if manifest.get("compression") == "GZIP" else ""
    ds = tf.data.Dataset.from_tensor_slices((files, [s["records"] for s in shards]))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.interleave(lambda f, n: _shard_records(f, tf.cast(n, tf.int64), compression),
                         cycle_length=max(1, min(len(files), cycle_length)), block_length=1,
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def worker_slice() -> tuple[int, int]:
    """(workers, this worker's index) of a multi-worker cluster in TF_CONFIG (chief first,
    as MultiWorkerMirroredStrategy numbers them); (1, 0) on one machine."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = resolver.cluster_spec().as_dict()
    tasks = [("chief", i) for i in range(len(spec.get("chief", [])))]
    tasks += [("worker", i) for i in range(len(spec.get("worker", [])))]
    if len(tasks) <= 1 or (resolver.task_type, resolver.task_id) not in tasks:
        return 1, 0
    return len(tasks), tasks.index((resolver.task_type, resolver.task_id))


class RecordInputs(Inputs):
    """Training inputs from a shard folder (``data.source: tfrecord``, ``data.root``: the folder).

    Same interface as `FileInputs`; elements go through the same
    `pipeline.from_elements` tail, so decode and augmentation are shared.
    """

    def __init__(self, cfg: Config, task):
        self.cfg, self.task, self.root = cfg, task, cfg.data.root
        m = self.manifest = read_manifest(self.root)
        if m["task"] != cfg.task:
            raise ConfigError(f"task: {cfg.task!r}, but the shards in {self.root} were made for {m['task']!r}")
        self.class_names = list(m["class_names"])
        if cfg.data.class_names is not None and list(cfg.data.class_names) != self.class_names:
            raise ConfigError(f"data.class_names: {cfg.data.class_names} differ from the shards' "
                              f"{self.class_names}; convert again or drop data.class_names")
        if m["config"]["data"]["split"] != dataclasses.asdict(cfg.data.split) or m["config"]["seed"] != cfg.seed:
            log.warning("data.split / seed differ from the conversion's; the shards' split is used")
        if cfg.data.oversample.enabled:
            raise ConfigError("data.oversample: not available with data.source 'tfrecord' yet; "
                              "train on the source files to oversample")
        self.counts = np.array([m["class_counts"]["train"][c] for c in self.class_names], np.float64)
        self.known_counts = np.array([m["known_counts"]["train"][c] for c in self.class_names], np.float64)
        # Segmentation: counts are pixels, and its class weights live in the loss, not per sample.
        self.pixel_counts = self.counts.astype(np.int64) if m.get("has_mask") else None
        self._class_tables(cfg, task)
        self.sizes = {s: int(m["counts"].get(s, 0)) for s in SPLITS}
        if not self.sizes["train"] or not self.sizes["val"]:
            raise DataError(f"{join(self.root, MANIFEST)}: the train or val split has no records")
        self.shards = {s: [sh for sh in m["shards"] if sh["name"].startswith(f"{s}-")] for s in SPLITS}
        check_shards(self.root, m)
        self._targets: dict[str, np.ndarray] = {}

    def _records(self, split: str, *, training: bool, deterministic: bool, seed: int = 0,
                 worker: tuple[int, int] = (1, 0)):
        count, index = worker
        shards = self.shards[split][index::count]
        if not self.shards[split]:
            raise DataError(f"{self.root}: no {split} shards")
        if not shards:
            raise DataError(f"{self.root}: {len(self.shards[split])} {split} shard(s) for {count} workers; "
                            f"convert with a smaller --shard-mb so that every worker gets one")
        return shard_records(self.root, self.manifest, shards, shuffle_seed=seed if training else None,
                             deterministic=deterministic or not training)

    def _elements(self, split: str, *, training: bool, deterministic: bool, seed: int = 0,
                  worker: tuple[int, int] = (1, 0)):
        spec = _spec_of(self.manifest, keys=(F.ENCODED, F.TARGET, F.KNOWN, F.MASK, F.HEIGHT, F.WIDTH,
                                             *F.INSTANCE_KEYS))
        train = split == "train"
        tier_of = tf.constant(self.tiers if train and self.tiers is not None else
                              np.zeros(len(self.class_names)), tf.int32)
        weigh = train and self.weights is not None

        def element(record):
            p = tf.io.parse_single_example(record, spec)
            target = p[F.TARGET]
            # The strongest tier among the record's positive classes: Task.tiers for one-hot (the
            # class's tier) and multi-hot targets (light when none), restated in TF because
            # calling the task's numpy rule per record (tf.numpy_function) costs 50-100 us of
            # Python each; tests pin the two to agree.
            out = {"bytes": p[F.ENCODED], "target": target,
                   "tier": tf.reduce_max(tf.where(target >= 0.5, tier_of, 0))}
            if F.KNOWN in p:
                out["known"] = p[F.KNOWN]
            if weigh:
                out["weight"] = sample_weight(target, self.weights)
            if F.MASK in p:
                out["mask_bytes"] = p[F.MASK]
            if F.INSTANCE_RUNS in p:
                out.update(parsed_instances(p))
            return out

        ds = self._records(split, training=training, deterministic=deterministic, seed=seed, worker=worker)
        return ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic or not training)

    def dataset(self, split, spec: PipelineSpec, *, training, repeat=False, format_batch=None):
        # Per-worker sharding by file, done here: tf.distribute's FILE auto-shard cannot find
        # the readers behind from_elements (it stops at ignore_errors and at the zip with
        # Dataset.random, TF 2.21: "Did not find a shardable source"), so it is switched off.
        worker = worker_slice() if training else (1, 0)
        ds = self._elements(split, training=training, deterministic=spec.deterministic, seed=spec.seed,
                            worker=worker)
        if training and spec.cache:  # the encoded bytes, as for loose files
            ds = ds.cache()
        return from_elements(ds, spec, training=training, repeat=repeat, format_batch=format_batch,
                             size_hint=self.sizes[split] // worker[0],
                             shard_policy=tf.data.experimental.AutoShardPolicy.OFF,
                             decode_targets=self.task.decode_targets)

    def task_columns(self, split):
        payload = ("bytes", "mask_bytes")  # the encoded image and mask: not columns
        return self._elements(split, training=False, deterministic=True).map(
            lambda e: {k: v for k, v in e.items() if k not in payload})

    def targets(self, split):
        """What validation scores against (the task's eval targets), read from the shards
        (labels only), in `dataset(split, training=False)` order."""
        if split not in self._targets:
            key = F.EVAL if self.manifest["has_eval"] else F.TARGET
            spec = _spec_of(self.manifest, keys=(key,))
            ds = self._records(split, training=False, deterministic=True).batch(1024)
            try:
                parts = [tf.io.parse_example(b, spec)[key].numpy() for b in ds]
            except tf.errors.InvalidArgumentError as e:
                raise DataError(_assert_message(e)) from None
            self._targets[split] = np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)))
        return self._targets[split]

    def channel_stats(self, spec, limit: int = 512):
        """Per-channel mean and std (0..255) over about `limit` training records, un-augmented."""
        spec = dataclasses.replace(spec, cache=False)
        ds = self.dataset("train", spec, training=False).take(-(-limit // spec.batch_size))
        return dataset_stats(ds, spec.channels)

    def write_report(self, run_dir) -> dict:
        """data_report.json for a run on shards: the manifest's counts and rejected files."""
        m = self.manifest
        total = sum(self.sizes.values()) + len(m["rejected"])
        report = {
            "source": "tfrecord", "shards": self.root, "n_samples": sum(self.sizes.values()),
            "n_rejected": len(m["rejected"]), "rejected_fraction": len(m["rejected"]) / max(total, 1),
            "class_counts": m["class_counts"], "rejected": m["rejected"],
        }
        if m.get("rejected_annotations"):
            report["rejected_annotations"] = m["rejected_annotations"]
        write_json(os.path.join(run_dir, "data_report.json"), report)
        return report


def _assert_message(e: Exception) -> str:
    found = re.search(r"assertion failed: \[(.*?)\]", str(e), re.S)
    return found.group(1) if found else describe_error(e)


def read_examples(root: str, split: str) -> list[dict]:
    """Every record of `split`, parsed to Python values, in shard order (tests, inspection)."""
    manifest = read_manifest(root)
    spec = _spec_of(manifest)
    out = []
    for shard in manifest["shards"]:
        if not shard["name"].startswith(f"{split}-"):
            continue
        path = join(root, shard["name"])
        for rec in tf.data.TFRecordDataset(path, "GZIP" if path.endswith(".gz") else ""):
            p = tf.io.parse_single_example(rec, spec)
            out.append({k: (v.numpy().tolist() if v.shape.rank else v.numpy()) for k, v in p.items()})
    return out
