"""Turn what a training config reads into verified TFRecord shards: ``python -m tfvision.convert``.

    python -m tfvision.convert --config TRAIN_CONFIG.json --output DIR [--workers N] [--shard-mb M]
                               [--overwrite] [--gzip] [--set key.path=value ...]
    python -m tfvision.convert --verify DIR

Reads top to bottom: validate the config (before TensorFlow loads); read the
source and split it exactly as training would (same source reader, same seeded
split); encode labels with the task; plan shards of about ``--shard-mb`` per
split; write them in worker processes, each image read and decoded once
(corrupt files go to ``rejected``, never into a shard); write
``manifest.json``. Every shard is written under a temporary name and renamed
when complete, and recorded as finished, so running the same command again
after a crash keeps the finished shards and writes the rest.

Train on the result with ``--set data.source=tfrecord data.root=DIR``.

Exit codes: 0 success, 2 config or data error (one line on stderr) or a failed
``--verify``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tfvision import __version__
from tfvision.cli import run_command
from tfvision.config import Config
from tfvision.config_loader import load_config
from tfvision.data.sources import SPLIT_NAMES as SPLITS
from tfvision.errors import ConfigError, DataError
from tfvision.fileio import check_output_outside, read_json, write_json

log = logging.getLogger("tfvision.convert")

STATE = ".convert-state.json"  # finished shards of an unfinished conversion


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tfvision.convert",
        description="Convert a training config's data to TFRecord shards, or verify a shard folder. "
                    "Exit 0 ok, 2 config/data error or failed verify, 1 other.",
    )
    p.add_argument("--config", help="training config JSON whose data section is converted")
    p.add_argument("--output", help="shard folder to write (local; upload it for gs:// training)")
    p.add_argument("--verify", metavar="DIR", help="re-read every shard in DIR against its manifest")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes, each writing one shard at a time (default 0: shards are "
                        "written here, one at a time, and every core decodes)")
    p.add_argument("--shard-mb", type=float, default=100.0, help="target shard size in MB (default 100)")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier conversion in --output first")
    p.add_argument("--gzip", action="store_true", help="GZIP-compress shards (.tfrecord.gz); "
                   "JPEG/PNG bytes barely shrink, so this mostly costs CPU")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                   help="override config values, as in train: --set a.b=1 c.d=x; repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.verify and not (args.config and args.output):
        p.error("give --config and --output, or --verify DIR")
    if args.workers < 0 or args.shard_mb <= 0:
        p.error("--workers must be >= 0 and --shard-mb > 0")
    return args


def main(argv=None) -> int:
    return run_command(_command, parse_args, argv)


def _command(args) -> int:
    if args.verify:
        return verify_cli(args.verify, progress=not args.quiet)
    cfg = load_config(args.config, args.overrides)
    convert(cfg, args.output, workers=args.workers, shard_mb=args.shard_mb,
            overwrite=args.overwrite, gzip=args.gzip, progress=not args.quiet)
    return 0


def verify_cli(root: str, progress: bool = True) -> int:
    from tfvision.data.tfrecord import verify

    problems, n = verify(root, progress=progress)
    for line in problems:
        print(f"FAIL {line}")
    if problems:
        print(f"verify {root}: {len(problems)} problem(s) in {n} shards", file=sys.stderr)
        return 2
    print(f"verify {root}: {n} shards OK")
    return 0


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
        sizes = np.array([os.path.getsize(p) for p in frame["path"].to_numpy()[rows]], np.float64)
        total = max(sizes.sum(), 1.0)
        n = min(len(rows), max(1, math.ceil(total / target)))
        before = np.cumsum(sizes) - sizes
        index = np.minimum((before * n / total).astype(np.int64), n - 1)
        used = np.unique(index)  # a file bigger than a shard can leave one empty
        for i, k in enumerate(used):
            plan.append((shard_name(split, i, len(used), gzip), rows[index == k]))
    return plan


def _fingerprint(frame, plan, class_names, cfg, gzip) -> str:
    """What decides the shards' bytes: rows per shard, labels, encoding. Training-only
    settings (epochs, augmentation, max_bad_fraction) are left out, so changing them
    keeps the finished shards."""
    from tfvision.data.features import SCHEMA_VERSION

    h = hashlib.sha256(json.dumps([SCHEMA_VERSION, cfg.task, class_names, cfg.data.channels, gzip,
                                   cfg.data.root]).encode())
    cols = frame[[c for c in ("path", "label", "group", "fold", "mask") if c in frame]].astype(str).to_numpy()
    for name, rows in plan:
        h.update(name.encode())
        for r in cols[rows]:
            h.update("\0".join(r).encode() + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- the output folder


def _owned(name: str) -> bool:
    from tfvision.data.tfrecord import MANIFEST, SHARD_RE

    bare = name[1:].split(".tmp-")[0] if name.startswith(".") else name
    return name in (MANIFEST, STATE) or bool(SHARD_RE.match(bare))


def _open_output(out: Path, fingerprint: str, overwrite: bool) -> dict:
    """Prepare `out`. Returns {name: result} of the shards an interrupted run finished,
    or the manifest when the same conversion is already complete."""
    from tfvision.data.tfrecord import MANIFEST

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} exists and is not a folder")
    if out.is_dir() and not ((out / MANIFEST).is_file() or (out / STATE).is_file()
                             or all(_owned(p.name) for p in out.iterdir())):
        raise ConfigError(f"--output: {out} holds files that are not a conversion's (no {MANIFEST}); "
                          f"shards go to a new or empty folder, or one an earlier conversion wrote")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in out.iterdir():
            if _owned(p.name) and p.is_file():
                p.unlink()
        return {}
    for p in out.glob(".*.tmp-*"):  # a killed run's unfinished shard
        if _owned(p.name):
            p.unlink()
    if (out / MANIFEST).is_file():
        manifest = read_json(out / MANIFEST)
        if manifest.get("fingerprint") != fingerprint:
            raise DataError(f"--output: {out} holds a conversion of other data or options; "
                            f"use --overwrite or another folder")
        changed = [s["name"] for s in manifest["shards"]
                   if not (out / s["name"]).is_file() or (out / s["name"]).stat().st_size != s["bytes"]]
        if changed:
            raise DataError(f"--output: shard {out / changed[0]} is missing or changed since the "
                            f"conversion; use --overwrite to convert again")
        return manifest
    if (out / STATE).is_file():
        state = read_json(out / STATE)
        if state.get("fingerprint") != fingerprint:
            raise DataError(f"--output: {out} holds an unfinished conversion of other data or options; "
                            f"use --overwrite or another folder")
        return {n: s for n, s in state["shards"].items()
                if (out / n).is_file() and (out / n).stat().st_size == s["bytes"]}
    if any(_owned(p.name) for p in out.iterdir()):
        raise DataError(f"--output: {out} holds shards but no manifest; use --overwrite")
    return {}


# --------------------------------------------------------------------------- converting


def _run(jobs, workers: int):
    """Yield each job's result as it finishes, in worker processes or (workers=0) here."""
    from tfvision.data.tfrecord import write_shard

    if workers == 0:
        for job in jobs:
            yield write_shard(job)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: TensorFlow's threads do not survive fork.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = {pool.submit(write_shard, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def convert(cfg: Config, output, *, workers: int = 0, shard_mb: float = 100.0, overwrite: bool = False,
            gzip: bool = False, progress: bool = True) -> dict:
    """Write the shards and manifest.json for `cfg`'s data into `output`. Returns the manifest."""
    from tqdm import tqdm

    from tfvision.data import features as F
    from tfvision.data.inputs import known_per_class
    from tfvision.data.tfrecord import MANIFEST, ShardJob

    if "://" in str(output):
        raise ConfigError("--output: shards are written to a local folder; copy it to cloud storage "
                          "afterwards (gsutil -m cp -r DIR gs://...)")
    t0 = time.perf_counter()
    out = Path(output)
    check_output_outside(out, [cfg.data.root], "--output")
    frame, missing, class_names, task = read_table(cfg)
    total = len(frame) + len(missing)
    allowed = cfg.data.max_bad_fraction * total
    if len(missing) > allowed:
        raise DataError(f"{len(missing)} of {total} images are missing (e.g. {missing[0]['path']}), above "
                        f"data.max_bad_fraction={cfg.data.max_bad_fraction}")
    plan = plan_shards(frame, shard_mb, gzip, cfg.seed)
    fingerprint = _fingerprint(frame, plan, class_names, cfg, gzip)
    done = _open_output(out, fingerprint, overwrite)
    if "schema_version" in done:
        log.info("%s already holds this conversion (python -m tfvision.convert --verify %s re-checks it)",
                 out, out)
        return done
    if done:
        log.info("resuming: keeping %d finished shard(s) of %d", len(done), len(plan))

    root = os.path.abspath(cfg.data.root)
    targets, known = task.targets(frame, class_names)
    masks = task.mask_paths(frame)  # segmentation: the label image of each row, else None
    if masks is not None:  # the mask is the target; the record keeps a [K] placeholder for the schema
        targets = np.zeros((len(frame), len(class_names)), np.float32)
    evals = task.eval_targets(frame, class_names) if masks is None else targets
    has_eval = not np.array_equal(evals, targets)  # multi-label scores only the certain labels

    def job(name, rows):
        sub = frame.iloc[rows]
        ids = [os.path.relpath(p, root) if os.path.abspath(p).startswith(root + os.sep) else p
               for p in sub["path"]]
        recs = [(p, i, g, lab, targets[r].tolist(), None if known is None else known[r].tolist(),
                 evals[r].tolist() if has_eval else None, int(f), None if masks is None else str(masks[r]))
                for r, p, i, g, lab, f in zip(rows, sub["path"], ids, sub["group"], sub["label"], sub["fold"],
                                                     strict=True)]
        # Each process checks images in a parallel map; together they use every core once.
        return ShardJob(str(out), name, recs, cfg.data.channels, gzip,
                        threads=max(1, _cores() // workers) if workers else None,
                        parent_pid=os.getpid() if workers else None, num_classes=len(class_names))

    todo = [(name, rows) for name, rows in plan if name not in done]
    rejected = [r for s in done.values() for r in s["rejected"]]
    bar = tqdm(total=sum(len(r) for _, r in todo), unit="img", desc="converting",
               disable=None if progress else True)
    results = _run((job(n, r) for n, r in todo), workers)
    try:
        for result in results:
            done[result["name"]] = result
            rejected += result["rejected"]
            write_json(out / STATE, {"fingerprint": fingerprint, "shards": done})
            bar.update(result["records"] + len(result["rejected"]))
            if len(missing) + len(rejected) > allowed:
                raise DataError(
                    f"{len(missing) + len(rejected)} of {total} images are unreadable (e.g. "
                    f"{rejected[-1]['path']}: {rejected[-1]['reason']}), above data.max_bad_fraction="
                    f"{cfg.data.max_bad_fraction}; finished shards are kept in {out}")
    finally:
        results.close()
        bar.close()

    shards, counts, class_counts, known_counts = [], {}, {}, {}
    for name, _ in plan:
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
            positives = np.sum([done[n].get("pixel_counts", [0] * len(class_names)) for n, _ in plan
                                if n.startswith(f"{split}-")], axis=0).astype(int).tolist()
        else:
            positives = [int(v) if float(v).is_integer() else v for v in task.class_counts(targets[sel], k).tolist()]
        class_counts[split] = dict(zip(class_names, positives, strict=True))
        known_counts[split] = dict(zip(class_names, known_per_class(targets[sel], k).tolist(), strict=True))
    manifest = {
        "schema_version": F.SCHEMA_VERSION, "tfvision_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fingerprint": fingerprint, "task": cfg.task, "class_names": class_names,
        "num_classes": len(class_names), "has_known": known is not None, "has_eval": has_eval,
        "has_mask": masks is not None, "class_counts_unit": "pixels" if masks is not None else "samples",
        "checked_channels": cfg.data.channels, "compression": "GZIP" if gzip else None,
        "shard_mb": shard_mb, "counts": counts, "class_counts": class_counts, "known_counts": known_counts, "shards": shards,
        "rejected": list(missing) + rejected,
        "source": {"type": cfg.data.source, "root": root, "csv": cfg.data.csv, "rows": total},
        "config": cfg.to_dict(), "features": F.DESCRIPTION,
    }
    write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    size = sum(s["bytes"] for s in shards)
    log.info("wrote %d records in %d shards (%.1f MB) to %s in %.1f s; %d rejected",
             sum(counts.values()), len(shards), size / 2**20, out, time.perf_counter() - t0,
             len(manifest["rejected"]))
    return manifest


if __name__ == "__main__":
    sys.exit(main())
