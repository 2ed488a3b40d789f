"""The conversion as an Apache Beam pipeline: ``python -m tfvision.convert ... --runner R``.

    list samples -> Reshuffle -> CheckSample (read, check, encode) -> group by shard
        -> WriteShard (write, sha256, the shard's state file)      then, here: manifest.json

An optional extra: ``pip install "tfvision[beam]"``. What is converted, the
shard plan, the checks, the rejection reasons and the manifest are the local
converter's (`tfvision.data.conversion`, `tfrecord.check_sample`); only the
scheduling is Beam's. `WriteShard` puts a shard's records back in planned
order, so a Beam run writes the same shard bytes as the local converter and a
manifest that differs from its manifest only in ``created``.

The shards' results come back to this process through one state file per shard
in the output folder (a runner returns no data to the launcher), read once
the pipeline has finished, so the output must be a folder every worker can
write: any local folder with the DirectRunner, a shared file system with
Flink or Spark. The same state files let a rerun keep the shards a failed
run finished, with either converter.

The sample list travels inside the submitted pipeline (``beam.Create``), about
200 bytes a sample: fine for hundreds of thousands of samples; a runner that
caps the size of a submitted job (Dataflow) would need it read from a file.
"""

from __future__ import annotations

import numpy as np

from tfvision.config import Config
from tfvision.data.conversion import complete, plan_conversion, shard_state
from tfvision.errors import ConfigError
from tfvision.fileio import read_json, write_json
from tfvision.remote import join

try:
    import apache_beam as beam
except ImportError as e:  # an optional extra; the local converter does not need it
    raise ConfigError(f"--runner needs Apache Beam, an optional extra: pip install 'tfvision[beam]' "
                      f"({e})") from None


class CheckSample(beam.DoFn):
    """(shard, index, row) -> (shard, (index, record or None, mask pixel counts or None, rejection or None))."""

    def __init__(self, channels: int, num_classes: int):
        self.channels, self.num_classes = channels, num_classes

    def setup(self):
        # TensorFlow loads here, once per worker, not when the pipeline is built or pickled.
        from tfvision.data.tfrecord import check_sample

        self._check = check_sample

    def process(self, element):
        name, index, row = element
        record, counts, rejected = self._check(row, self.channels, self.num_classes)
        yield name, (index, record, None if counts is None else counts.tolist(), rejected)


class WriteShard(beam.DoFn):
    """(shard, its checked samples) -> the shard written under a temporary name and renamed,
    and its result (`tfrecord.shard_result`) in the shard's state file."""

    def __init__(self, directory: str, gzip: bool, num_classes: int):
        self.directory, self.gzip, self.num_classes = directory, gzip, num_classes

    def setup(self):
        from tfvision.data import tfrecord

        self._tfrecord = tfrecord

    def process(self, element):
        name, samples = element
        samples = sorted(samples, key=lambda s: s[0])  # planned order: the local converter's bytes
        pixels = np.zeros(self.num_classes, np.int64)
        for _, _, counts, _ in samples:
            if counts is not None:
                pixels += counts
        records = [s[1] for s in samples if s[1] is not None]
        size, digest = self._tfrecord.write_records(join(self.directory, name), records, self.gzip)
        result = self._tfrecord.shard_result(name, len(records), size, digest,
                                             [s[3] for s in samples if s[3] is not None], pixels)
        write_json(join(self.directory, shard_state(name)), result)
        yield name


def pipeline_options(runner: str, options=(), workers: int = 0):
    """Beam's PipelineOptions from ``--runner``, ``--workers`` and the ``--beam-option``s
    (``KEY=VALUE``, or ``KEY`` for a switch such as ``save_main_session``).

    Raises:
        ConfigError: an option no Beam component knows (Beam itself only logs and drops it),
            or a value Beam's parser refuses.
    """
    import contextlib
    import io

    from apache_beam.options.pipeline_options import PipelineOptions

    flags = [f"--runner={runner}"]
    if runner == "DirectRunner" and workers:
        # One process per worker, each with its own TensorFlow: decoding scales with cores
        # (the in-memory default runs every bundle in this process).
        flags += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}",
                  # Worker processes log each gRPC channel's life at INFO on this terminal.
                  "--default_sdk_harness_log_level=WARNING"]
    flags += [f"--{o}" for o in options]  # last wins, so --beam-option overrides the ones above
    opts = PipelineOptions(flags)
    usage = io.StringIO()
    try:  # Beam parses lazily, and argparse prints its whole usage before exiting on a bad value
        with contextlib.redirect_stderr(usage):
            known = opts.get_all_options(retain_unknown_options=False)
            given = opts.get_all_options(retain_unknown_options=True)
    except SystemExit:
        raise ConfigError(f"--beam-option: {usage.getvalue().strip().splitlines()[-1].split('error: ')[-1]}"
                          ) from None
    if unknown := sorted(set(given) - set(known)):
        raise ConfigError(f"--beam-option: {unknown[0]!r} is not a Beam pipeline option")
    return opts


def _runner(name: str, options):
    """The runner for `name`. "DirectRunner" is Beam's FnApiRunner, built as Beam's DirectRunner
    builds it: Beam 2.77's DirectRunner first tries the PrismRunner, a Go binary it downloads
    from GitHub on first use (offline: a failed download, then a fallback to the FnApiRunner),
    and direct_running_mode / direct_num_workers configure the FnApiRunner only."""
    if name != "DirectRunner":
        return name
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # The options travel to multi_processing workers in the provision info, as in DirectRunner.
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def convert_beam(cfg: Config, output, *, runner: str = "DirectRunner", options=(), workers: int = 0,
                 shard_mb: float = 100.0, overwrite: bool = False, gzip: bool = False) -> dict:
    """`tfvision.convert.convert` as a Beam pipeline on `runner`. Returns the manifest."""
    pipeline = pipeline_options(runner, options, workers)  # a bad option stops before any reading
    conv = plan_conversion(cfg, output, shard_mb, gzip)
    done = conv.open_output(overwrite)
    if complete(done):
        return done
    conv.write_state(done)  # claims the folder, so a rerun after a failure keeps finished shards
    todo = conv.todo(done)
    samples = [(name, i, row) for name, rows in todo for i, row in enumerate(conv.shard_rows(rows))]
    if samples:
        num_classes = len(conv.class_names)
        with beam.Pipeline(runner=_runner(runner, pipeline), options=pipeline) as p:
            _ = (p
                 | "ListSamples" >> beam.Create(samples)
                 | "Reshuffle" >> beam.Reshuffle()  # spread the samples over workers, not shards
                 | "CheckSample" >> beam.ParDo(CheckSample(cfg.data.channels, num_classes))
                 | "GroupByShard" >> beam.GroupByKey()
                 | "WriteShard" >> beam.ParDo(WriteShard(str(conv.out), gzip, num_classes)))
    for name, _ in todo:
        done[name] = read_json(join(conv.out, shard_state(name)))
    # Once, at the end: a runner reports nothing back while it runs (the local converter stops
    # at the first shard that passes data.max_bad_fraction). The shards stay for a rerun.
    conv.check_rejected(done)
    return conv.write_manifest(done)
