"""Train a model from a JSON config: ``python -m tfvision.train --config FILE``.

Reads top to bottom: validate the config (before TensorFlow is imported), read
and split the data, check every file, build the task's model, run each
training phase with `fit`, then evaluate the best checkpoint into the run
folder. A killed run resumes when started again on the same run folder.
The run folder may be ``gs://...`` (`tfvision.run.working_copy`).

Exit codes: 0 success, 2 config or data error (one line on stderr), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tfvision import __version__
from tfvision.cli import run_command
from tfvision.config_loader import json_schema, load_config
from tfvision.errors import DataError
from tfvision.remote import is_url
from tfvision.run import load_run_config, new_run_dir, open_run, working_copy

log = logging.getLogger("tfvision.train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tfvision.train",
        description="Train a tfvision model from a JSON config. Exit 0 ok, 2 config/data error, 1 other.",
    )
    p.add_argument("--config", help="JSON config file (see configs/)")
    p.add_argument("--output-dir", help="run folder (default runs/<config name>-<timestamp>), local or "
                   "gs://...; an existing run folder with the same config resumes")
    p.add_argument("--resume", metavar="RUN_DIR", help="resume a run folder with its saved config")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                   help="override config values (JSON literal or string): --set a.b=1 c.d=x; repeatable")
    p.add_argument("--check-data", action="store_true",
                   help="only read, split and check every image, write data_report.json, then exit")
    p.add_argument("--print-schema", action="store_true", help="print the config JSON Schema and exit")
    p.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bars")
    args = p.parse_args(argv)
    if not (args.config or args.resume or args.print_schema):
        p.error("one of --config, --resume or --print-schema is required")
    return args


def main(argv=None) -> int:
    return run_command(_command, parse_args, argv)


def _command(args) -> int:
    if args.print_schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.resume:
        run_dir = args.resume if is_url(args.resume) else Path(args.resume)
        cfg = load_run_config(run_dir)
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = new_run_dir(cfg, args.output_dir)
    return train(cfg, run_dir, check_only=args.check_data, verbose=0 if args.quiet else 2)


def train(cfg, run_dir: Path | str, check_only: bool = False, verbose: int = 2) -> int:
    """Run (or resume) training for a validated config into `run_dir` (a folder or a URL)."""
    from tfvision.backend import select_backend

    select_backend(cfg.train.strategy)  # before Keras is imported: it reads KERAS_BACKEND once
    from tfvision import distribute
    from tfvision.fileio import check_output_outside

    # The task's rules were checked by the config loader, before anything is written.
    check_output_outside(run_dir, [cfg.data.root], "--output-dir")
    # Before TensorFlow runs any op: MultiWorkerMirroredStrategy sets up its collectives at
    # program start. A data check alone needs no strategy (nor the other workers).
    runtime = None if check_only else distribute.setup(cfg)
    chief = runtime is None or runtime.is_chief
    # A URL run folder is written as a local working copy and published by `sync`. Only the
    # chief writes `run_dir`; another worker writes a temporary copy (tfvision.distribute).
    with working_copy(run_dir, cfg, writes=chief) as (local, sync), distribute.write_folder(runtime, local) as folder:
        return _train_in(cfg, folder, check_only, verbose, sync)


def _train_in(cfg, run_dir: Path, check_only: bool, verbose: int, sync=lambda: None) -> int:
    from tfvision.data import builtin

    if cfg.data.prepare and cfg.data.source != "tfrecord":
        builtin.prepare(cfg.data.prepare, cfg.data.root)
    # Data decisions are all made before training starts (tfvision.training).
    resuming = open_run(run_dir, cfg)
    log.info("%s run folder %s", "resuming" if resuming else "new", run_dir)
    frame, rejected_missing = _read_samples(cfg, run_dir)

    from tfvision import training

    return training.fit_run(cfg, run_dir, frame, rejected_missing, resuming, check_only, verbose, sync)


def _read_samples(cfg, run_dir: Path):
    from tfvision.data.sources import load_samples
    from tfvision.data.splits import assign_splits
    from tfvision.run import read_splits, write_splits

    if cfg.data.source == "tfrecord":  # the split is in the shards (names and manifest.json)
        return None, []
    saved = read_splits(run_dir)
    table = load_samples(cfg.data)
    if saved is not None:  # a resumed run keeps exactly the split it started with
        return saved, table.missing
    frame = assign_splits(table.frame, cfg.data.split, cfg.seed)
    write_splits(run_dir, frame)
    return frame, table.missing


__all__ = ["main", "train", "DataError", "__version__"]

if __name__ == "__main__":
    sys.exit(main())
