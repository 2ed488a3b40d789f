"""Turn what a training config reads into verified TFRecord shards: ``python -m tfvision.convert``.

    python -m tfvision.convert --config TRAIN_CONFIG.json --output DIR [--workers N] [--shard-mb M]
                               [--overwrite] [--gzip] [--set key.path=value ...]
                               [--runner DirectRunner|FlinkRunner|SparkRunner|DataflowRunner
                                [--beam-option KEY=VALUE ...]]
    python -m tfvision.convert --verify DIR

Reads top to bottom: validate the config (before TensorFlow loads); plan the
conversion (`tfvision.data.conversion`: read the source and split it exactly
as training would, encode labels with the task, plan shards of about
``--shard-mb`` per split); write the shards in worker processes, each image
read and decoded once (corrupt files go to ``rejected``, never into a shard);
write ``manifest.json``. Every shard is written under a temporary name and
renamed when complete, and recorded as finished, so running the same command
again after a crash keeps the finished shards and writes the rest. ``--output``
may be ``gs://...``: each shard is written locally, uploaded under a temporary
name and moved into place (`tfvision.remote`), the manifest last.

With ``--runner`` the shards are written by an Apache Beam pipeline instead
(`tfvision.data.beam`, ``pip install "tfvision[beam]"``): the same plan, checks,
records and manifest, scheduled by Beam.

Train on the result with ``--set data.source=tfrecord data.root=DIR``.

Exit codes: 0 success, 2 config or data error (one line on stderr) or a failed
``--verify``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

from tfvision.cli import run_command
from tfvision.config import Config
from tfvision.config_loader import load_config
from tfvision.data.conversion import complete, plan_conversion
from tfvision.errors import ConfigError

RUNNERS = ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner")


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tfvision.convert",
        description="Convert a training config's data to TFRecord shards, or verify a shard folder. "
                    "Exit 0 ok, 2 config/data error or failed verify, 1 other.",
    )
    p.add_argument("--config", help="training config JSON whose data section is converted")
    p.add_argument("--output", help="shard folder to write: local, or gs://BUCKET/PATH (each shard is "
                   "uploaded under a temporary name and moved into place, the manifest last)")
    p.add_argument("--verify", metavar="DIR", help="re-read every shard in DIR against its manifest")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes, each writing one shard at a time (default 0: shards are "
                        "written here, one at a time, and every core decodes); with --runner "
                        "DirectRunner: its processes (direct_num_workers)")
    p.add_argument("--runner", choices=RUNNERS,
                   help="convert as an Apache Beam pipeline on this runner (pip install 'tfvision[beam]'); "
                        "default: the local converter")
    p.add_argument("--beam-option", dest="beam_options", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE", help="a Beam pipeline option for --runner, e.g. flink_master=HOST:PORT, "
                   "parallelism=N, spark_master_url=URL, project=P; KEY alone for a switch; repeatable")
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
    if args.beam_options and not args.runner:
        p.error("--beam-option needs --runner")
    if bad := [o for o in args.beam_options if not o or o.startswith(("-", "="))]:
        p.error(f"--beam-option: {bad[0]!r} is not KEY=VALUE or KEY (without the leading --)")
    if args.runner not in (None, "DirectRunner") and args.workers:
        p.error(f"--workers: {args.runner} sizes its own workers; give them with --beam-option "
                f"(e.g. max_num_workers=N on Dataflow)")
    return args


def main(argv=None) -> int:
    return run_command(_command, parse_args, argv)


def _command(args) -> int:
    if args.verify:
        return verify_cli(args.verify, progress=not args.quiet)
    cfg = load_config(args.config, args.overrides)
    if args.runner:
        from tfvision.data.beam import convert_beam

        convert_beam(cfg, args.output, runner=args.runner, options=args.beam_options, workers=args.workers,
                     shard_mb=args.shard_mb, overwrite=args.overwrite, gzip=args.gzip)
    else:
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

    from tfvision.data.tfrecord import ShardJob

    if workers and any(str(p).startswith("ram://") for p in (output, cfg.data.root)):
        # ram:// is the memory of this process: a worker process would read or write its own.
        raise ConfigError("--workers: a ram:// folder lives in this process only; use --workers 0")
    conv = plan_conversion(cfg, output, shard_mb, gzip)
    done = conv.open_output(overwrite)
    if complete(done):
        return done

    def job(name, rows):
        # Each process checks images in a parallel map; together they use every core once.
        return ShardJob(str(conv.out), name, conv.shard_rows(rows), cfg.data.channels, gzip,
                        threads=max(1, _cores() // workers) if workers else None,
                        parent_pid=os.getpid() if workers else None, num_classes=len(conv.class_names))

    todo = conv.todo(done)
    bar = tqdm(total=sum(len(r) for _, r in todo), unit="img", desc="converting",
               disable=None if progress else True)
    results = _run((job(n, r) for n, r in todo), workers)
    try:
        for result in results:
            done[result["name"]] = result
            conv.write_state(done)
            bar.update(result["records"] + len(result["rejected"]))
            conv.check_rejected(done)
    finally:
        results.close()
        bar.close()
    return conv.write_manifest(done)


if __name__ == "__main__":
    sys.exit(main())
