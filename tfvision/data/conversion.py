"""What a conversion writes, shared by the local converter (`tfvision.convert`) and the Apache
Beam pipeline (`tfvision.data.beam`), so the two cannot drift apart.

`plan_conversion` does everything before the first byte is written: read the
source and split it exactly as training would (same source reader, same seeded
split), encode labels with the task, plan shards of about ``shard_mb`` per split
and fingerprint the result. `Conversion.shard_rows` gives the rows a shard
holds, which `tfrecord.write_shard` (local) or `tfrecord.check_sample` (Beam)
check and encode; `Conversion.write_manifest` turns the shards' results into
``manifest.json``. Rows keep their planned order inside a shard on both paths,
and records serialize deterministically, so the same conversion gives the same
shard bytes and sha256s whichever path ran it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import time

import numpy as np
import pandas as pd

from tfvision import __version__, remote
from tfvision.config import Config
from tfvision.data.sources import SPLIT_NAMES as SPLITS
from tfvision.errors import ConfigError, DataError
from tfvision.fileio import check_output_outside, read_json, write_json
from tfvision.remote import join

log = logging.getLogger("tfvision.convert")

STATE = ".convert-state.json"  # finished shards of an unfinished conversion
# One finished shard of a Beam run: its workers cannot update one shared STATE file.
SHARD_STATE = ".convert-state-"


def shard_state(name: str) -> str:
    return f"{SHARD_STATE}{name}.json"


# --------------------------------------------------------------------------- what to convert


def read_table(cfg: Config) -> tuple[pd.DataFrame, list[dict], list[str], object]:
    """The sample table training would use: (frame with split and fold, missing, class names, task).

    Raises DataError for a missing column, an unknown label, a template naming
    no file or an empty split, before anything is written.
    """
    from tfvision.data import builtin
    from tfvision.data.sources import load_samples
    from tfvision.data.splits import assign_splits
    from tfvision.tasks import get_task

    if cfg.data.source == "tfrecord":
        raise ConfigError("data.source: 'tfrecord' is already shards; convert reads the source they come from")
    if cfg.data.prepare:
        builtin.prepare(cfg.data.prepare, cfg.data.root)
    table = load_samples(cfg.data)
    frame = assign_splits(table.frame, cfg.data.split, cfg.seed)
    frame["fold"] = fold_index(table.frame, frame, cfg)
    task = get_task(cfg.task, cfg)
    class_names = task.class_names(frame, cfg)
    return frame, table.missing, class_names, task


def fold_index(before: pd.DataFrame, after: pd.DataFrame, cfg: Config) -> np.ndarray:
    """Fold of each row in the seeded K-fold that chose the val split (val is one of its
    folds), so other folds can be held out later; -1 for test rows and rows whose split
    the layout fixes. K is ``data.split.n_folds`` with ``split.fold`` set, else the
    round(1 / val_fraction) folds `assign_splits` used."""
    from tfvision.data.splits import holdout_mask

    s = cfg.data.split
    folds = np.full(len(after), -1, np.int64)
    free = (before["split"] == "").to_numpy() & (after["split"] != "test").to_numpy()
    if (before["split"] == "val").any() or not free.any() or (s.fold is None and s.val_fraction == 0):
        return folds
    k_folds = s.n_folds if s.fold is not None else max(2, round((1.0 - s.test_fraction) / s.val_fraction))
    sub, rows = after[free], np.flatnonzero(free)
    try:
        for k in range(k_folds):
            mask = holdout_mask(sub["label"].to_numpy(), sub["group"].to_numpy(), s.method,
                                n_folds=k_folds, fold=k, seed=cfg.seed)
            folds[rows[mask]] = k
    except DataError as e:  # too few samples or groups for the folds: no fold index
        log.info("no fold index: %s", e)
        return np.full(len(after), -1, np.int64)
    return folds


def plan_shards(frame: pd.DataFrame, shard_mb: float, gzip: bool, seed: int) -> list[tuple[str, np.ndarray]]:
    """[(shard name, row indices)]: per split, rows shuffled (seeded) and cut into
    shards of about `shard_mb` of file bytes, balanced in size."""
    from tfvision.data.tfrecord import shard_name

    target = shard_mb * 2**20
    rng = np.random.default_rng(seed)
    plan = []
    for split in SPLITS:
        rows = np.flatnonzero((frame["split"] == split).to_numpy())
        if not len(rows):
            continue
        rows = rows[rng.permutation(len(rows))]  # a class-sorted source would give class-sorted shards
        sizes = np.array([remote.size(p) for p in frame["path"].to_numpy()[rows]], np.float64)
        total = max(sizes.sum(), 1.0)
        n = min(len(rows), max(1, math.ceil(total / target)))
        before = np.cumsum(sizes) - sizes
        index = np.minimum((before * n / total).astype(np.int64), n - 1)
        used = np.unique(index)  # a file bigger than a shard can leave one empty
        for i, k in enumerate(used):
            plan.append((shard_name(split, i, len(used), gzip), rows[index == k]))
    return plan


def fingerprint(frame, plan, class_names, cfg, gzip, instances=None) -> str:
    """What decides the shards' bytes: rows per shard, labels, encoding (and each row's instances,
    whose annotations can change while the file list stays). Training-only settings (epochs,
    augmentation, max_bad_fraction) are left out, so changing them keeps the finished shards."""
    from tfvision.data.features import SCHEMA_VERSION

    h = hashlib.sha256(json.dumps([SCHEMA_VERSION, cfg.task, class_names, cfg.data.channels, gzip,
                                   cfg.data.root]).encode())
    cols = frame[[c for c in ("path", "label", "group", "fold", "mask") if c in frame]].astype(str).to_numpy()
    for name, rows in plan:
        h.update(name.encode())
        for r in rows:
            h.update("\0".join(cols[r]).encode() + b"\n")
            for values in (instances[r].values() if instances is not None else ()):
                h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Conversion:
    """One planned conversion: the sample table, its shards, the encoded targets and the output."""

    cfg: Config
    out: str  # a local folder or a URL (`tfvision.remote`)
    shard_mb: float
    gzip: bool
    frame: pd.DataFrame
    missing: list[dict]
    class_names: list[str]
    task: object
    plan: list[tuple[str, np.ndarray]]
    fingerprint: str
    targets: np.ndarray
    known: np.ndarray | None
    masks: np.ndarray | None  # segmentation: the label image of each row
    instances: list[dict] | None  # instance segmentation: each row's ``instance/*`` features
    rejected_annotations: list[dict]  # bad annotation rows of images that are kept (instance sources)
    evals: np.ndarray
    has_eval: bool
    started: float

    @property
    def total(self) -> int:
        return len(self.frame) + len(self.missing)

    def shard_rows(self, rows: np.ndarray) -> list[tuple]:
        """The `tfrecord.ShardJob` rows of the frame rows `rows`: (path, image id, group, label,
        target, known, eval target, fold, mask path or None, instance features or None)."""
        root = remote.absolute(self.cfg.data.root)
        sub = self.frame.iloc[rows]
        absolute = [remote.absolute(p) for p in sub["path"]]
        ids = [a[len(root) + 1:] if a.startswith(root + "/") else p for a, p in zip(absolute, sub["path"], strict=True)]
        t, k, m, inst = self.targets, self.known, self.masks, self.instances
        return [(p, i, g, lab, t[r].tolist(), None if k is None else k[r].tolist(),
                 self.evals[r].tolist() if self.has_eval else None, int(f), None if m is None else str(m[r]),
                 None if inst is None else inst[r])
                for r, p, i, g, lab, f in zip(rows, sub["path"], ids, sub["group"], sub["label"], sub["fold"],
                                              strict=True)]

    def check_rejected(self, done: dict) -> None:
        """Raise DataError once the missing and rejected files pass data.max_bad_fraction."""
        rejected = [r for s in done.values() for r in s["rejected"]]
        bad = len(self.missing) + len(rejected)
        if bad > self.cfg.data.max_bad_fraction * self.total:
            raise DataError(
                f"{bad} of {self.total} images are unreadable (e.g. {rejected[-1]['path']}: "
                f"{rejected[-1]['reason']}), above data.max_bad_fraction={self.cfg.data.max_bad_fraction}; "
                f"finished shards are kept in {self.out}")

    def todo(self, done: dict) -> list[tuple[str, np.ndarray]]:
        return [(name, rows) for name, rows in self.plan if name not in done]

    def open_output(self, overwrite: bool) -> dict:
        """Prepare the output folder. Returns {name: result} of the shards an interrupted run
        finished, or the manifest when the same conversion is already complete (`complete`)."""
        done = _open_output(self.out, self.fingerprint, overwrite)
        if complete(done):
            log.info("%s already holds this conversion (python -m tfvision.convert --verify %s re-checks it)",
                     self.out, self.out)
        elif done:
            log.info("resuming: keeping %d finished shard(s) of %d", len(done), len(self.plan))
        return done

    def write_state(self, done: dict) -> None:
        write_json(join(self.out, STATE), {"fingerprint": self.fingerprint, "shards": done})

    def write_manifest(self, done: dict) -> dict:
        """Write manifest.json from every planned shard's result and drop the state files."""
        from tfvision.data import features as F
        from tfvision.data.inputs import known_per_class
        from tfvision.data.tfrecord import MANIFEST

        cfg, frame, known, masks, class_names = self.cfg, self.frame, self.known, self.masks, self.class_names
        shards, counts, class_counts, known_counts = [], {}, {}, {}
        # In plan order, whichever order the shards finished in.
        rejected = [r for name, _ in self.plan for r in done[name]["rejected"]]
        for name, _ in self.plan:
            r, split = done[name], name.split("-")[0]
            shards.append({"name": name, "split": split, "records": r["records"], "bytes": r["bytes"],
                           "sha256": r["sha256"]})
            counts[split] = counts.get(split, 0) + r["records"]
        # Class counts of what the shards hold, by the task's own rule (positives per class).
        kept = ~frame["path"].isin({r["path"] for r in rejected}).to_numpy()
        for split in counts:
            sel = kept & (frame["split"] == split).to_numpy()
            k = known[sel] if known is not None else None
            if masks is not None:  # segmentation: pixels per class, counted while the masks were checked
                positives = np.sum([done[n].get("pixel_counts", [0] * len(class_names)) for n, _ in self.plan
                                    if n.startswith(f"{split}-")], axis=0).astype(int).tolist()
            else:
                positives = [int(v) if float(v).is_integer() else v
                             for v in self.task.class_counts(self.targets[sel], k).tolist()]
            class_counts[split] = dict(zip(class_names, positives, strict=True))
            known_counts[split] = dict(zip(class_names, known_per_class(self.targets[sel], k).tolist(),
                                           strict=True))
        manifest = {
            "schema_version": F.SCHEMA_VERSION, "tfvision_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "fingerprint": self.fingerprint, "task": cfg.task, "class_names": class_names,
            "num_classes": len(class_names), "has_known": known is not None, "has_eval": self.has_eval,
            "has_mask": masks is not None, "has_instances": self.instances is not None,
            "class_counts_unit": ("pixels" if masks is not None else "instances" if self.instances is not None
                                  else "samples"),
            "checked_channels": cfg.data.channels, "compression": "GZIP" if self.gzip else None,
            "shard_mb": self.shard_mb, "counts": counts, "class_counts": class_counts,
            "known_counts": known_counts, "shards": shards, "rejected": list(self.missing) + rejected,
            "rejected_annotations": self.rejected_annotations,
            "source": {"type": cfg.data.source, "root": remote.absolute(cfg.data.root), "csv": cfg.data.csv,
                       "rows": self.total},
            "config": cfg.to_dict(), "features": F.DESCRIPTION,
        }
        # The manifest goes last: until it is there, the folder is an unfinished conversion.
        write_json(join(self.out, MANIFEST), manifest)
        for name in remote.listdir(self.out):
            if name.startswith(SHARD_STATE) or name == STATE:
                remote.remove(join(self.out, name))
        size = sum(s["bytes"] for s in shards)
        log.info("wrote %d records in %d shards (%.1f MB) to %s in %.1f s; %d rejected",
                 sum(counts.values()), len(shards), size / 2**20, self.out, time.perf_counter() - self.started,
                 len(manifest["rejected"]))
        return manifest


def complete(done: dict) -> bool:
    """`Conversion.open_output` found the same conversion finished (it returned the manifest)."""
    return "schema_version" in done


def plan_conversion(cfg: Config, output, shard_mb: float = 100.0, gzip: bool = False) -> Conversion:
    """Read, split and plan `cfg`'s data for shards in `output`; nothing is written.

    Raises:
        UserError: `output` lies inside data.root (a folder or a ``gs://`` URL: `tfvision.remote`).
        DataError: `read_table`'s errors, or more missing files than data.max_bad_fraction allows.
    """
    started = time.perf_counter()
    out = str(output)  # a URL (gs://) stays one: Path would fold its "//"
    check_output_outside(out, [cfg.data.root], "--output")
    frame, missing, class_names, task = read_table(cfg)
    # A row-level entry is one bad annotation of an image that stays (instance sources).
    annotations = [r for r in missing if r.get("row") is not None]
    missing = [r for r in missing if r.get("row") is None]
    total = len(frame) + len(missing)
    if len(missing) > cfg.data.max_bad_fraction * total:
        raise DataError(f"{len(missing)} of {total} images are missing (e.g. {missing[0]['path']}), above "
                        f"data.max_bad_fraction={cfg.data.max_bad_fraction}")
    plan = plan_shards(frame, shard_mb, gzip, cfg.seed)
    targets, known = task.targets(frame, class_names)
    masks = task.mask_paths(frame)
    if masks is not None:  # the mask is the target; the record keeps a [K] placeholder for the schema
        targets = np.zeros((len(frame), len(class_names)), np.float32)
    evals = task.eval_targets(frame, class_names) if masks is None else targets
    instances = task.record_features(frame)
    return Conversion(cfg=cfg, out=out, shard_mb=shard_mb, gzip=gzip, frame=frame, missing=missing,
                      class_names=class_names, task=task, plan=plan,
                      fingerprint=fingerprint(frame, plan, class_names, cfg, gzip, instances), targets=targets,
                      known=known, masks=masks, instances=instances, rejected_annotations=annotations,
                      evals=evals,
                      has_eval=not np.array_equal(evals, targets),  # multi-label scores only the certain labels
                      started=started)


# --------------------------------------------------------------------------- the output folder


def _owned(name: str) -> bool:
    """A file conversions write: the manifest, a shard, a state file, or one of their temporary files."""
    from tfvision.data.tfrecord import MANIFEST, SHARD_RE

    if name.startswith(".") and ".tmp-" in name:
        name = name[1:].split(".tmp-")[0]
    if name.startswith(SHARD_STATE) and name.endswith(".json"):
        name = name[len(SHARD_STATE):-len(".json")]
    return name in (MANIFEST, STATE) or bool(SHARD_RE.match(name))


def _open_output(out: str, fingerprint: str, overwrite: bool) -> dict:
    """Prepare `out`. Returns {name: result} of the shards an interrupted run finished,
    or the manifest when the same conversion is already complete."""
    from tfvision.data.tfrecord import MANIFEST

    def intact(name: str, size: int) -> bool:
        return remote.isfile(join(out, name)) and remote.size(join(out, name)) == size

    if remote.exists(out) and not remote.isdir(out):
        raise ConfigError(f"--output: {out} exists and is not a folder")
    names = remote.listdir(out)
    if names and not (MANIFEST in names or STATE in names or all(_owned(n) for n in names)):
        raise ConfigError(f"--output: {out} holds files that are not a conversion's (no {MANIFEST}); "
                          f"shards go to a new or empty folder, or one an earlier conversion wrote")
    remote.makedirs(out)
    if overwrite:
        for n in names:
            if _owned(n) and remote.isfile(join(out, n)):
                remote.remove(join(out, n))
        return {}
    for n in names:  # a killed run's unfinished shard, or one uploaded but not yet moved (gs://)
        if remote.is_temp(n) and _owned(n):
            remote.remove(join(out, n))
    if MANIFEST in names:
        manifest = read_json(join(out, MANIFEST))
        if manifest.get("fingerprint") != fingerprint:
            raise DataError(f"--output: {out} holds a conversion of other data or options; "
                            f"use --overwrite or another folder")
        changed = [s["name"] for s in manifest["shards"] if not intact(s["name"], s["bytes"])]
        if changed:
            raise DataError(f"--output: shard {join(out, changed[0])} is missing or changed since the "
                            f"conversion; use --overwrite to convert again")
        return manifest
    if STATE in names:
        state = read_json(join(out, STATE))
        if state.get("fingerprint") != fingerprint:
            raise DataError(f"--output: {out} holds an unfinished conversion of other data or options; "
                            f"use --overwrite or another folder")
        shards = dict(state["shards"])
        for n in names:  # shards a Beam run finished
            if n.startswith(SHARD_STATE) and n.endswith(".json"):
                result = read_json(join(out, n))
                shards[result["name"]] = result
        return {n: s for n, s in shards.items() if intact(n, s["bytes"])}
    if any(_owned(n) for n in names):
        raise DataError(f"--output: {out} holds shards but no manifest; use --overwrite")
    return {}
