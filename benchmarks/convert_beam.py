"""Conversion speed: the local converter against the Apache Beam DirectRunner at 1 and 2 workers.

On a folder of 500x500 JPEGs (`common.jpeg_folder`), in one run, on the same
files, config and shard plan:

- check only: `tfrecord.checked_images` over every file (read + the decode
  check, nothing written): the floor of any conversion.
- local, workers=0: `tfvision.convert.convert`, in this process, every core
  decoding in a tf.data map (the default).
- beam, workers=W: `tfvision.data.beam.convert_beam` on the DirectRunner. W=0
  is its in-memory mode (every bundle in this process); W>=1 is
  multi_processing with W worker processes (direct_num_workers), each
  importing TensorFlow once; that start-up is included.

Every conversion must write the same shards (same sha256s) as the local one,
or the script stops. Each Beam contender also converts the first
``--startup-images`` files alone; the difference of the two times gives its
rate after start-up (the worker processes' TensorFlow import is a fixed cost of
several CPU-seconds each), which is how it scales with workers on a set big
enough to matter. Each round runs every contender once; the best round per
contender is reported, with CPU-ms per image (this process and its finished
children, i.e. the Beam workers), steadier than wall time on a shared machine.

    python benchmarks/convert_beam.py                       # 2000 images, 2 rounds
    python benchmarks/convert_beam.py --n-images 500 --rounds 1 --beam-workers 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from tfrecord import make_config, timed  # noqa: E402  (benchmarks/tfrecord.py: the same config)

from tfvision.config_loader import config_from_dict  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # Its own folder: other benchmarks rebuild theirs at other sizes.
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "tfvision-bench", "jpeg500-beam"),
                    help="cached JPEG folder (made once)")
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--shard-mb", type=float, default=8.0)
    ap.add_argument("--beam-workers", type=int, nargs="+", default=[1, 2],
                    help="DirectRunner worker processes to try (0: in-memory, in this process)")
    ap.add_argument("--startup-images", type=int, default=40,
                    help="images of the small conversion that measures each Beam contender's start-up")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)

    paths = common.jpeg_folder(args.data, n=args.n_images, size=500)
    raw = make_config(Path(args.data), len(paths))
    cfg = config_from_dict(raw)
    # The first files alone, under another CSV name (make_config's bench.csv lists them all).
    lines = (Path(args.data) / "bench.csv").read_text().splitlines()[: args.startup_images + 1]
    (Path(args.data) / "bench-startup.csv").write_text("\n".join(lines) + "\n")
    small = config_from_dict({**raw, "data": {**raw["data"], "csv": "bench-startup.csv"}})
    mb = sum(os.path.getsize(p) for p in paths) / 2**20
    work = Path(tempfile.mkdtemp(prefix="tfvision-bench-beam-"))

    from tfvision.convert import convert
    from tfvision.data.beam import convert_beam
    from tfvision.data.tfrecord import checked_images

    results: dict[str, list] = {}
    reference: list = []

    def same_shards(manifest):
        shards = [(s["name"], s["sha256"]) for s in manifest["shards"]]
        if reference and shards != reference:
            raise SystemExit("a contender wrote other shards than the local converter")
        reference[:] = shards

    def check_only():
        for _ in checked_images(paths, 3).as_numpy_iterator():
            pass

    def run(name, fn, images=None):
        images = images or len(paths)
        seconds, cpu = timed(fn)
        results.setdefault(name, []).append({"images": images, "seconds": seconds, "cpu_seconds": cpu,
                                             "load": common.loadavg()})
        print(f"  {name}: {images / seconds:.0f} img/s, {1000 * cpu / images:.2f} CPU-ms/img", flush=True)

    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        run("check only (read + decode check)", check_only)
        run("local, workers=0", lambda: same_shards(convert(
            cfg, work / "local", shard_mb=args.shard_mb, overwrite=True, progress=False)))
        for w in args.beam_workers:
            run(f"beam DirectRunner, workers={w}", lambda w=w: same_shards(convert_beam(
                cfg, work / f"beam{w}", workers=w, shard_mb=args.shard_mb, overwrite=True)))
            run(f"start-up: beam, workers={w}", lambda w=w: convert_beam(
                small, work / f"small{w}", workers=w, shard_mb=args.shard_mb, overwrite=True),
                images=len(lines) - 1)

    best = {k: min(v, key=lambda x: x["seconds"]) for k, v in results.items() if not k.startswith("start-up")}
    rate = {k: b["images"] / b["seconds"] for k, b in best.items()}
    local = rate["local, workers=0"]
    rows = [[k, f"{rate[k]:,.0f}", f"{1000 * b['cpu_seconds'] / b['images']:.2f}", f"{rate[k] / local:.2f}x", ""]
            for k, b in best.items()]
    after = {}  # img/s once started: (N - n) / (t_N - t_n), best rounds
    for w in args.beam_workers:
        big, start = best[f"beam DirectRunner, workers={w}"], min(
            results[f"start-up: beam, workers={w}"], key=lambda x: x["seconds"])
        after[w] = (big["images"] - start["images"]) / max(big["seconds"] - start["seconds"], 1e-9)
        rows[[r[0] for r in rows].index(f"beam DirectRunner, workers={w}")][4] = (
            f"{start['seconds']:.1f} s, then {after[w]:,.0f} img/s")
    info = common.machine_info()
    print(f"\n{len(paths)} JPEGs 500x500, {mb:.0f} MB; {info['cores']} cores ({info['cpu']}); "
          f"load average {common.loadavg():.1f}")
    print(common.markdown_table(rows, ["contender", "img/s (best)", "CPU-ms/img", "vs local",
                                       f"start-up ({args.startup_images} images), then"]))
    beam = {w: rate.get(f"beam DirectRunner, workers={w}") for w in args.beam_workers}
    if beam.get(1) and beam.get(2):
        print(f"\nbeam workers=2 / workers=1: {beam[2] / beam[1]:.2f}x overall, "
              f"{after[2] / after[1]:.2f}x after start-up")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "images": len(paths), "mb": mb,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
