"""The one input pipeline: samples -> read -> decode/crop -> resize -> batch -> augment -> mix.

Every task and every source (loose files now, TFRecord shards later) goes
through `build_dataset`; only `read` (where bytes come from) and the task's
`format_batch` (how a batch becomes model inputs and targets) differ.

Per image, in parallel: read the file, draw a random-resized-crop window,
decode only that window (DCT-downscaled JPEG where possible), resize, then
the joint image/mask augmentations (each only when its coin comes up). Per
batch: MixUp/CutMix.
Images leave the pipeline as float32 on the 0..255 scale; normalisation lives
in the model so that exports carry it.

>>> ds = build_dataset(Samples(paths, targets), spec, training=True)
>>> images, targets = next(iter(ds))
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tfvision.config import AugmentParams, Config
from tfvision.data import augment as aug
from tfvision.data.decode import decode_mask, decode_resized, image_shape
from tfvision.data.mix import mix_batch
from tfvision.data.sampling import weighted_dataset

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Samples:
    """What the pipeline reads: aligned per-sample arrays."""

    paths: np.ndarray  # [N] str
    targets: np.ndarray  # [N, K] float32 (one-hot, multi-hot, ...)
    tiers: np.ndarray | None = None  # [N] int32 augmentation tier
    known: np.ndarray | None = None  # [N, K] float32, 1 where the label is known
    weights: np.ndarray | None = None  # [N] float32 sample weights
    mask_paths: np.ndarray | None = None  # [N] str, integer label images (segmentation)
    sampling: np.ndarray | None = None  # [N] relative sampling weights (oversampling, training only)
    extra: dict | None = None  # task columns, [N, ...] arrays or tf.RaggedTensor (instances), read by decode_targets

    def __len__(self):
        return len(self.paths)


@dataclasses.dataclass
class PipelineSpec:
    image_size: tuple[int, int]
    channels: int
    batch_size: int
    tiers: list[AugmentParams]
    augment: bool = True
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_p: float = 0.0
    albumentations: dict | None = None
    placement: str = "host"  # "accelerator": training yields uint8 batch dicts for batch_augment.install
    shuffle_buffer: int = 2048
    deterministic: bool = False
    cache: bool = False
    seed: int = 0
    checked: bool = False  # every file was decoded once already: the check pass, or conversion to shards

    @property
    def augment_on_device(self) -> bool:
        """Training batches are augmented in the train step (`batch_augment`), not here."""
        return self.augment and self.albumentations is None and self.placement == "accelerator"

    @classmethod
    def from_config(cls, cfg: Config, image_size=None) -> PipelineSpec:
        a = cfg.augment
        tiers = [a.tiers.light, a.tiers.medium, a.tiers.heavy] if a.tiers.enabled else [a.params]
        return cls(
            image_size=tuple(image_size or cfg.data.size), channels=cfg.data.channels,
            batch_size=cfg.train.batch_size, tiers=tiers, augment=a.enabled,
            mixup_alpha=a.mix.mixup_alpha, cutmix_alpha=a.mix.cutmix_alpha, mix_p=a.mix.p,
            albumentations=a.albumentations, placement=a.placement, shuffle_buffer=cfg.data.shuffle_buffer,
            deterministic=cfg.data.deterministic, cache=cfg.data.cache, seed=cfg.seed,
            checked=cfg.data.check_files or cfg.data.source == "tfrecord",
        )


def crop_window(data: tf.Tensor, params: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random-resized-crop window [y, x, h, w]: area fraction and log-aspect drawn
    uniformly from the image's tier row, clipped to the image."""
    hw = tf.cast(image_shape(data), tf.float32)
    u = tf.random.stateless_uniform([4], seed)
    lo, hi = params[aug._COL["crop_scale_lo"]], params[aug._COL["crop_scale_hi"]]
    rlo, rhi = params[aug._COL["crop_ratio_lo"]], params[aug._COL["crop_ratio_hi"]]
    area = (lo + (hi - lo) * u[0]) * hw[0] * hw[1]
    ratio = tf.exp(tf.math.log(rlo) + (tf.math.log(rhi) - tf.math.log(rlo)) * u[1])
    h = tf.clip_by_value(tf.round(tf.sqrt(area / ratio)), 1.0, hw[0])
    w = tf.clip_by_value(tf.round(tf.sqrt(area * ratio)), 1.0, hw[1])
    y = tf.floor((hw[0] - h) * u[2])
    x = tf.floor((hw[1] - w) * u[3])
    return tf.cast(tf.stack([y, x, h, w]), tf.int32)


def _element_seeds(seed: int) -> tf.data.Dataset:
    # A fresh, reproducible stream of per-element seeds each epoch.
    rand = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return rand.batch(2).map(lambda s: tf.cast(s % (2**31 - 1), tf.int32))


def per_iterator(make) -> tf.data.Dataset:
    """The dataset ``make()`` returns, built anew for every iterator over it.

    A ``shuffle(reshuffle_each_iteration=True)`` draws each pass's order from one seed generator
    per dataset, shared by all of its iterators, and ``repeat`` draws the next order as soon as
    any iterator reads ahead into the next pass. Keras 3.15 on JAX (and on TensorFlow under a
    tf.distribute strategy) opens an iterator to peek at one batch before `fit` and drops it,
    so the batches `fit` trained on depended on how far that iterator's prefetch had run: one
    of two orders at random, even with ``data.deterministic``. Built inside ``flat_map``, the
    generators are the iterator's own, and every iterator starts at the same first pass.

    >>> ds = per_iterator(lambda: source.shuffle(n, seed=0).repeat())
    """
    return tf.data.Dataset.range(1).flat_map(lambda _: make())


def build_dataset(
    samples: Samples, spec: PipelineSpec, *, training: bool, repeat: bool = False, format_batch=None,
    decode_targets=None,
) -> tf.data.Dataset:
    """Batched dataset of model-ready elements from loose files.

    Args:
        samples: paths and targets (see `Samples`).
        spec: sizes, augmentation and batching (see `PipelineSpec.from_config`).
        training: shuffle, augment, mix and drop the last partial batch.
        repeat: repeat forever (with `steps_per_epoch`).
        format_batch: task hook turning the batch dict into `(x, y[, w])`;
            default `(image, target[, weight])`.
        decode_targets: task hook for targets that move with the image (see `from_elements`).
    """
    n = len(samples)
    columns = {"path": samples.paths.astype(str), "target": samples.targets.astype(np.float32),
               "tier": (samples.tiers if samples.tiers is not None else np.zeros(n)).astype(np.int32)}
    if samples.known is not None:
        columns["known"] = samples.known.astype(np.float32)
    if samples.weights is not None:
        columns["weight"] = samples.weights.astype(np.float32)
    if samples.mask_paths is not None:
        columns["mask_path"] = samples.mask_paths.astype(str)
    columns.update(samples.extra or {})
    if training and samples.sampling is not None:
        def weighted():
            return weighted_dataset(columns, samples.sampling, spec.seed)

        ds = per_iterator(weighted) if repeat else weighted()  # it repeats shuffles: see per_iterator
    else:
        ds = tf.data.Dataset.from_tensor_slices(columns)
    if training and spec.cache and samples.sampling is None:  # cache the file bytes; decoding stays per epoch (random crops)
        ds = ds.map(_read_files, num_parallel_calls=AUTOTUNE).cache()
    return from_elements(ds, spec, training=training, repeat=repeat, format_batch=format_batch,
                         size_hint=n, decode_targets=decode_targets)


def _read_files(s: dict) -> dict:
    out = {k: v for k, v in s.items() if k not in ("path", "mask_path")}
    out["bytes"] = tf.io.read_file(s["path"])
    if "mask_path" in s:
        out["mask_bytes"] = tf.io.read_file(s["mask_path"])
    return out


def from_elements(
    ds: tf.data.Dataset, spec: PipelineSpec, *, training: bool, repeat: bool = False, format_batch=None,
    size_hint: int | None = None,
    shard_policy=tf.data.experimental.AutoShardPolicy.DATA,
    decode_targets=None,
) -> tf.data.Dataset:
    """The shared tail of every source: per-element dicts -> model-ready batches.

    Elements hold ``path`` or ``bytes`` (encoded image), ``target``, ``tier``,
    and optionally ``known``, ``weight``, and ``mask_path``/``mask_bytes`` (an
    integer label PNG, cropped and resized with the image, nearest-neighbour).
    Loose files and TFRecord shards both end here, so they get the same
    decode and augmentation graph. With ``spec.placement == "accelerator"``,
    training batches stay unaugmented, unformatted dicts with uint8 images, for
    the train step that `batch_augment.install` sets up.

    ``decode_targets(element, window, size)``, a task hook, turns the task's own
    columns into tensors that move with the image: it returns the element with a
    ``mask`` [H, W, C] (any channels: instance masks are one channel each) cut to
    `window` ([y, x, h, w] of the source image; None: the whole image) and
    resized to `size`, which the geometric augmentations then move with the image.
    """
    table = aug.param_table(spec.tiers)
    do_aug = training and spec.augment
    crop = do_aug and spec.albumentations is None  # the crop window is part of decoding: always here
    # Placement "accelerator": the rest runs on whole batches in the train step (data/batch_augment.py).
    on_device = training and spec.augment_on_device
    native = crop and not on_device
    plan = aug.Plan.from_tiers(spec.tiers)
    size = tuple(spec.image_size)

    def load(s, seed):
        if "bytes" not in s:
            s = _read_files(s)
        params = tf.gather(table, s["tier"])
        window = crop_window(s["bytes"], params, seed) if crop else None
        image = decode_resized(s["bytes"], spec.channels, size, window)
        out = {k: v for k, v in s.items() if k not in ("bytes", "mask_bytes")}
        out.update(image=image, params=params)
        if "mask_bytes" in s:
            out["mask"] = tf.image.resize(decode_mask(s["mask_bytes"], window), size, method="nearest")
        if decode_targets is not None:
            out = decode_targets(out, window, size)
        if native:
            mask_channels = out["mask"].shape[-1] if "mask" in out else None
            out = aug.augment_image(out, params, seed + [1, 0], plan)
            out["image"].set_shape(size + (spec.channels,))
            if "mask" in out:
                out["mask"].set_shape(size + (mask_channels,))
        if on_device:  # a quarter of the bytes to the device; each sample's tier row is gathered there
            out["image"] = tf.saturate_cast(tf.round(out["image"]), tf.uint8)
            del out["params"]
        return out

    if training:
        source, buffer = ds, min(size_hint or spec.shuffle_buffer, spec.shuffle_buffer)

        def passes():
            shuffled = source.shuffle(buffer, seed=spec.seed, reshuffle_each_iteration=True)
            return tf.data.Dataset.zip(shuffled.repeat() if repeat else shuffled, _element_seeds(spec.seed))

        # Without repeat, each epoch is an iterator of its own and must reshuffle.
        ds = per_iterator(passes) if repeat else passes()
        ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=spec.deterministic)
    else:
        ds = ds.map(lambda s: load(s, tf.zeros([2], tf.int32)), num_parallel_calls=AUTOTUNE,
                    deterministic=True)
        if spec.cache:
            ds = ds.cache()
        if repeat:
            ds = ds.repeat()
    # A file that fails to decode anyway is skipped, never blanked, with a logged warning.
    # Guarding each element stops tf.data fusing the map into the batch, which cost 0.15
    # CPU-ms per image (benchmarks/README.md). So when every file was decoded once already,
    # training keeps the fused path and guards whole batches: a file that breaks after its
    # check costs its batch. Evaluation always guards per element, so no row is lost.
    per_batch = training and spec.checked
    if not per_batch:
        ds = ds.ignore_errors(log_warning=True)
    if do_aug and spec.albumentations is not None:
        ds = ds.map(aug.albumentations_fn(spec.albumentations), num_parallel_calls=AUTOTUNE)
    drop = training and (size_hint is None or size_hint >= spec.batch_size)
    if per_batch:  # map + batch, fused by tf.data
        ds = ds.batch(spec.batch_size, drop_remainder=drop).ignore_errors(log_warning=True)
    else:
        ds = ds.batch(spec.batch_size, drop_remainder=drop, num_parallel_calls=AUTOTUNE,
                      deterministic=spec.deterministic or not training)
    # On the device, batches are seeded per step and replica; a [2] seed here would be split among replicas.
    if training and not on_device:
        seed = spec.seed + 1
        ds = tf.data.Dataset.zip(ds, per_iterator(lambda: _element_seeds(seed)) if repeat else _element_seeds(seed))
        ds = ds.map(lambda b, s: {**b, "seed": s}, num_parallel_calls=AUTOTUNE)
        if do_aug and spec.mix_p > 0:
            ds = ds.map(lambda b: mix_batch(b, spec.mixup_alpha, spec.cutmix_alpha, spec.mix_p),
                        num_parallel_calls=AUTOTUNE, deterministic=spec.deterministic)
    if not on_device:  # else the train step formats the augmented batch dict
        ds = ds.map(format_batch or default_format, num_parallel_calls=AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = spec.deterministic or not training
    options.experimental_distribute.auto_shard_policy = shard_policy
    return ds.with_options(options).prefetch(AUTOTUNE)


def default_format(batch: dict):
    if "weight" in batch:
        return batch["image"], batch["target"], batch["weight"]
    return batch["image"], batch["target"]


def steps_for(n: int, batch_size: int, training: bool) -> int:
    return max(1, n // batch_size) if training and n >= batch_size else max(1, math.ceil(n / batch_size))


def dataset_stats(dataset: tf.data.Dataset, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..255 scale) of the images of a batched dataset."""
    total, sq, count = np.zeros(channels), np.zeros(channels), 0
    for images, *_ in dataset:
        x = images.numpy().reshape(-1, channels).astype(np.float64)
        total, sq, count = total + x.sum(0), sq + (x**2).sum(0), count + len(x)
    mean = total / count
    return mean.tolist(), np.sqrt(np.maximum(sq / count - mean**2, 1e-6)).tolist()


def channel_stats(samples: Samples, spec: PipelineSpec, limit: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..255 scale) over up to `limit` images, un-augmented."""
    sub = Samples(samples.paths[:limit], samples.targets[:limit])
    return dataset_stats(build_dataset(sub, dataclasses.replace(spec, cache=False), training=False), spec.channels)
