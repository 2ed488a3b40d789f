"""What the trainer needs from the data, whatever stores it.

`Inputs` hides where samples live (loose files now; TFRecord shards plug in
beside `FileInputs`) behind one small interface: class names and counts, and
a `dataset(split, ...)` built by the shared pipeline tail.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from tfvision.config import Config
from tfvision.data.check import check_files
from tfvision.data.pipeline import PipelineSpec, Samples, build_dataset, channel_stats
from tfvision.data.sampling import positive_factors, positive_rates, sample_weights
from tfvision.errors import DataError
from tfvision.fileio import read_json, write_json
from tfvision.losses import class_weights

log = logging.getLogger("tfvision.data")


def class_tiers(counts: np.ndarray, cfg: Config) -> np.ndarray | None:
    """Tier per class: 0 light, 1 medium, 2 heavy (rows of the augmentation table)."""
    t = cfg.augment.tiers
    if not t.enabled:
        return None
    heavy_below, medium_below = t.thresholds
    return np.where(counts < heavy_below, 2, np.where(counts < medium_below, 1, 0)).astype(np.int32)


def known_per_class(targets: np.ndarray, known: np.ndarray | None) -> np.ndarray:
    """Samples whose label is known, per class (every sample when the task has no known mask).

    The manifest's ``known_counts`` (`tfvision.convert`) and `FileInputs` both count this
    way, so training on shards and on their source files sees the same numbers."""
    return (known > 0).sum(0) if known is not None else np.full(targets.shape[1], len(targets))


def sample_weight(targets, class_weight: np.ndarray) -> tf.Tensor:
    """Each sample's loss weight: its target's mix of the class weights (one-hot: its class's).

    TF ops over the last axis, so the one rule serves a whole table of loose files (eagerly)
    and a single record read from a shard (in the tf.data graph)."""
    return tf.reduce_sum(tf.cast(targets, tf.float32) * tf.constant(class_weight, tf.float32), axis=-1)


class Inputs:
    """Interface: class_names, counts (training), weights, tiers, sizes, dataset(), targets()."""

    class_names: list[str]
    counts: np.ndarray  # training positives per class
    known_counts: np.ndarray  # training samples with a known label, per class
    oversampling: dict | None = None  # per class: factor, positive rate before/after
    weights: np.ndarray | None
    tiers: np.ndarray | None
    sizes: dict[str, int]

    def _class_tables(self, cfg: Config, task) -> None:
        """Per-class loss weights (tasks that weigh samples, not the loss, by class) and
        augmentation tiers, from the training counts every source sets first."""
        self.weights = (class_weights(self.counts, cfg.train.loss.class_weights)
                        if task.sample_class_weights else None)
        self.tiers = class_tiers(self.counts, cfg)

    def dataset(self, split: str, spec: PipelineSpec, *, training: bool, repeat: bool = False,
                format_batch=None):
        raise NotImplementedError

    def targets(self, split: str) -> np.ndarray:
        """Targets of `split` in the order `dataset(split, training=False)` yields them."""
        raise NotImplementedError

    def task_columns(self, split: str) -> tf.data.Dataset:
        """The task's own columns of `split` (`Task.element_columns`: instance segmentation's runs,
        classes and image size), one element per sample, in `dataset(split, training=False)` order,
        before any decode or resize: what a task scores against at each image's own size."""
        raise NotImplementedError

    def channel_stats(self, spec: PipelineSpec):
        raise NotImplementedError


class FileInputs(Inputs):
    """Loose image files listed in a sample table (every source but tfrecord)."""

    def __init__(self, cfg: Config, task, frame: pd.DataFrame):
        self.task = task
        self.class_names = task.class_names(frame, cfg)
        self.frames = {s: frame[frame["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
        if self.frames["train"].empty or self.frames["val"].empty:
            raise DataError("after removing unreadable files the train or val split is empty")
        targets, known = task.targets(self.frames["train"], self.class_names)
        self.counts = task.class_counts(targets, known)
        self.known_counts = known_per_class(targets, known)
        self._class_tables(cfg, task)
        self.sizes = {s: len(f) for s, f in self.frames.items()}
        self._samples = {s: self._make(f, train=s == "train") for s, f in self.frames.items() if len(f)}
        if cfg.data.oversample.enabled:
            self._oversample(cfg)

    def _make(self, frame, train: bool) -> Samples:
        targets, known = self.task.targets(frame, self.class_names)
        tiers = self.task.tiers(targets, self.tiers) if train and self.tiers is not None else None
        weights = sample_weight(targets, self.weights).numpy() if train and self.weights is not None else None
        return Samples(frame["path"].to_numpy(), targets, tiers=tiers, known=known, weights=weights,
                       mask_paths=self.task.mask_paths(frame), extra=self.task.element_columns(frame))

    def _oversample(self, cfg: Config):
        s = self._samples["train"]
        known = s.known if s.known is not None else np.ones_like(s.targets)
        factors = positive_factors(s.targets, known, cfg.data.oversample, self.class_names)
        s.sampling = sample_weights(s.targets, known, factors)
        before, after = positive_rates(s.targets, known), positive_rates(s.targets, known, s.sampling)
        self.oversampling = {c: {"factor": float(f), "positive_rate_before": float(b), "positive_rate_after": float(a)}
                             for c, f, b, a in zip(self.class_names, factors, before, after, strict=True)}
        for c, v in self.oversampling.items():
            if v["factor"] != 1.0:
                log.info("oversampling %s x%.2f: positive rate %.3f -> %.3f", c, v["factor"],
                         v["positive_rate_before"], v["positive_rate_after"])

    def dataset(self, split, spec, *, training, repeat=False, format_batch=None):
        return build_dataset(self._samples[split], spec, training=training, repeat=repeat,
                             format_batch=format_batch, decode_targets=self.task.decode_targets)

    def targets(self, split):
        return self.task.eval_targets(self.frames[split], self.class_names)

    def task_columns(self, split):
        return tf.data.Dataset.from_tensor_slices(self._samples[split].extra)

    def channel_stats(self, spec):
        return channel_stats(self._samples["train"], spec)


def check_data(cfg: Config, run_dir: Path, frame: pd.DataFrame, missing: list[dict], resuming: bool):
    """Decode every file once; drop and report the bad ones; stop if too many."""
    report_path = run_dir / "data_report.json"
    # An entry with a row is one bad annotation (instance sources): listed, but its image stays.
    annotations = [r for r in missing if r.get("row") is not None]
    missing = [r for r in missing if r.get("row") is None]
    if resuming and report_path.exists():
        rejected = read_json(report_path)["rejected"]
    else:
        rejected = list(missing)
        if cfg.data.check_files:
            rejected += check_files(frame["path"].tolist(), cfg.data.channels)
    if not cfg.data.check_files:
        # Scores need one prediction per listed val/test image, and evaluation skips a file it
        # cannot decode; so those files are checked even so, on every start (a resumed run's
        # may have changed since), while the training files, the bulk, stay unchecked.
        seen = {r["path"] for r in rejected}
        held_out = [p for p in frame.loc[frame["split"] != "train", "path"] if p not in seen]
        rejected += check_files(held_out, cfg.data.channels)
    bad = {r["path"] for r in rejected}
    total = len(frame) + len(missing)
    fraction = len(rejected) / max(total, 1)
    kept = frame[~frame["path"].isin(bad)].reset_index(drop=True)
    ycols = [c for c in kept.columns if c.startswith("y:")]
    if ycols:  # multi-label: positives per class (uncertain and blank not counted)
        counts = {s: {c[2:]: int((part[c] == "1").sum()) for c in ycols}
                  for s, part in kept.groupby("split")}
    else:
        counts = {s: kept[kept["split"] == s]["label"].value_counts().sort_index().to_dict()
                  for s in ("train", "val", "test") if (kept["split"] == s).any()}
    report = {
        "n_samples": int(len(kept)), "n_rejected": len(rejected), "rejected_fraction": fraction,
        "class_counts": counts, "rejected": rejected,
    }
    if annotations:
        report["rejected_annotations"] = annotations
        log.warning("%d annotation(s) rejected (their images keep the others); see %s",
                    len(annotations), report_path)
    write_json(report_path, report)
    for r in rejected[:20]:
        log.warning("skipped %s: %s", r["path"], r["reason"])
    if len(rejected) > 20:
        log.warning("... and %d more, see %s", len(rejected) - 20, report_path)
    if fraction > cfg.data.max_bad_fraction:
        raise DataError(
            f"{len(rejected)} of {total} images ({fraction:.1%}) are unreadable, above "
            f"data.max_bad_fraction={cfg.data.max_bad_fraction}; see {report_path}"
        )
    return kept, report
