"""Where training runs (`train.strategy`): one device, mirrored devices, several machines, a TPU.

`setup(cfg)` turns the config into a `Runtime`: the `tf.distribute` strategy plus what the
trainer must know about it (replicas, chief or not, steps per device call). Every strategy
but ``default`` feeds `fit` through `distribute_datasets_from_function`, one input pipeline
per worker, each batched at the per-replica batch:

- ``train.batch_size`` is per replica. The global batch is ``batch_size x replicas`` (all
  devices of all workers) and every learning rate is multiplied by the replica count (the
  linear scaling rule, Goyal et al. 2017), so one device trains exactly as configured.
- TFRecord shards are split between workers by file (`RecordInputs`, at least one shard per
  worker); loose files by data: each worker runs the whole pipeline and keeps every
  N-th batch (tf.distribute's AutoShardPolicy.DATA), so N workers see the batches one
  process would at N times the batch.
- Only the chief writes the run folder (`write_folder`).

>>> runtime = setup(cfg)
>>> train, val, steps, val_steps = runtime.fit_data(inputs, spec, task.format_batch, None)

The JAX route (``keras.distribution``: DataParallel now, ModelParallel later) is one more
entry in `_STRATEGIES`: it sets the Keras distribution and returns a Runtime whose
`strategy` is the default one, since Keras then places the variables itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import keras
import tensorflow as tf

from tfvision.errors import ConfigError
from tfvision.fileio import PROCESS_MARKER, process_dir

# The data modules are imported where used: importing them runs TensorFlow ops (module-level
# constants), after which MultiWorkerMirroredStrategy can no longer be made ("Collective ops
# must be configured at program startup").

log = logging.getLogger("tfvision.train")

TPU_STEPS_PER_EXECUTION = 32  # batches per host->TPU call; one per call leaves the TPU idle between steps
_RUNTIMES: dict = {}  # one per process: MultiWorkerMirroredStrategy configures the collectives once


@dataclasses.dataclass
class Runtime:
    """A strategy and what training must know about it (see the module docstring)."""

    name: str  # train.strategy
    strategy: tf.distribute.Strategy
    worker: int = 0  # this process's index in TF_CONFIG's cluster, chief first
    workers: int = 1
    steps_per_execution: int = 1
    policy: str = "float32"  # the Keras mixed-precision policy
    element_spec: object = None  # one replica's training batch, set by fit_data

    @property
    def is_chief(self) -> bool:
        return self.worker == 0

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def distributed(self) -> bool:
        return self.name != "default"

    def global_batch(self, per_replica: int) -> int:
        return per_replica * self.replicas

    def scale_lr(self, lr: float) -> float:
        """The linear scaling rule: `lr` is the rate for one replica's batch."""
        return lr * self.replicas

    def fit_data(self, inputs, spec, format_batch, steps_per_epoch: int | None):
        """(train, val, steps, val_steps) for `model.fit`, batched at `spec.batch_size` per replica.

        Distributed, validation during `fit` runs on full global batches of the repeated
        validation set (static shapes, every worker busy); metrics.json still scores every
        validation image once, on the chief.
        """
        from tfvision.data.inputs import FileInputs
        from tfvision.data.pipeline import steps_for
        from tfvision.data.tfrecord import RecordInputs

        n_train, n_val = inputs.sizes["train"], inputs.sizes["val"]
        if not self.distributed:
            # Always repeat and give steps_per_epoch: the dataset's cardinality is unknown
            # (ignore_errors), and Keras would otherwise find each epoch's end by running dry;
            # the validation length too, or Keras finds it the same way and warns.
            train = inputs.dataset("train", spec, training=True, repeat=True, format_batch=format_batch)
            val = inputs.dataset("val", spec, training=False, format_batch=format_batch)
            return (train, val, steps_per_epoch or steps_for(n_train, spec.batch_size, True),
                    steps_for(n_val, spec.batch_size, False))
        batch = self.global_batch(spec.batch_size)
        by_file = isinstance(inputs, RecordInputs)  # it hands each worker its own shard files already

        def train_fn(ctx: tf.distribute.InputContext):
            ds = inputs.dataset("train", spec, training=True, repeat=True, format_batch=format_batch)
            return ds if by_file else ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)

        def val_fn(ctx: tf.distribute.InputContext):
            ds = inputs.dataset("val", spec, training=False, repeat=True, format_batch=format_batch)
            ds = ds.rebatch(spec.batch_size, drop_remainder=True)
            return ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)

        self.element_spec = train_fn(tf.distribute.InputContext()).element_spec
        if self.name == "tpu":
            if isinstance(inputs, FileInputs):
                check_host_decoders(p for f in inputs.frames.values() for p in f["path"])
            check_static(self.element_spec, "training")
            check_static(val_fn(tf.distribute.InputContext()).element_spec, "validation")
        train = self.strategy.distribute_datasets_from_function(train_fn)
        val = self.strategy.distribute_datasets_from_function(val_fn)
        return train, val, steps_per_epoch or steps_for(n_train, batch, True), max(1, n_val // batch)

    def execution_steps(self, steps: int) -> int:
        """`steps_per_execution` for an epoch of `steps`: the largest divisor of `steps` up to
        the configured value, since Keras 3.15 runs whole executions and would otherwise
        train past the epoch's end (and the schedule's)."""
        return max(d for d in range(1, min(self.steps_per_execution, steps) + 1) if steps % d == 0)

    def adapt(self, model: keras.Model) -> None:
        """Make `model.fit` work under this strategy (after `compile`, before `fit`).

        Keras 3.15 builds a distributed model from the first batch, reduced with
        ``strategy.reduce("MEAN", batch)``: a nest, which MultiWorkerMirroredStrategy cannot
        reduce ("Attempt to convert a value (PerReplica...) with an unsupported type"), and
        it draws that batch from an iterator it then throws away, so training starts on a
        second pass of the data. Shapes are all the build needs: it gets the dataset's
        element spec instead.
        """
        if not self.distributed:
            return
        spec = self.element_spec

        def build(iterator=None, data_batch=None):
            with model.distribute_strategy.scope():
                model._symbolic_build(data_batch=spec)

        model._maybe_symbolic_build = build


# --------------------------------------------------------------------------- strategies


def _default(cfg):
    return Runtime("default", tf.distribute.get_strategy())


def _mirrored(cfg):
    # MirroredStrategy() alone falls back to one CPU when there is no GPU; list
    # the logical CPUs explicitly so multi-device CPU runs (and tests) mirror too.
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return Runtime("mirrored", tf.distribute.MirroredStrategy([d.name for d in devices]))


def _multi_worker(cfg):
    workers, index = cluster_from_env()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _patch_keras_multi_worker_logs()
    return Runtime("multi_worker", strategy, worker=index, workers=workers)


def _tpu(cfg):
    check_tpu_config(cfg)
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
    try:
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"train.strategy: 'tpu', but TensorFlow finds no TPU here ({str(e).splitlines()[0][:200]}); "
            "it needs a TPU VM and a TensorFlow built with the TPU runtime (tensorflow-tpu)") from None
    strategy = tf.distribute.TPUStrategy(resolver)
    spe = cfg.train.steps_per_execution or TPU_STEPS_PER_EXECUTION
    return Runtime("tpu", strategy, steps_per_execution=spe, policy="mixed_bfloat16")


def _jax(cfg):
    # The JAX route (keras.distribution) lives in tfvision/jax_runtime.py: an optional extra, and
    # a Runtime of its own (no tf.distribute strategy); imported only when asked for.
    from tfvision.jax_runtime import jax_runtime

    return jax_runtime(cfg)


_STRATEGIES = {"default": _default, "mirrored": _mirrored, "multi_worker": _multi_worker, "tpu": _tpu,
               "jax": _jax}


def setup(cfg) -> Runtime:
    """The process's `Runtime` for ``cfg.train.strategy``, made on the first call.

    Call it before TensorFlow runs any op: MultiWorkerMirroredStrategy must configure the
    collective runtime at program start. Sets the Keras mixed-precision policy (TPU:
    ``mixed_bfloat16``; ``train.mixed_precision`` elsewhere).

    Raises:
        ConfigError: no TF_CONFIG for ``multi_worker``; no TPU, or input code a TPU cannot run.
    """
    name = cfg.train.strategy
    if name not in _RUNTIMES:
        runtime = _STRATEGIES[name](cfg)
        if runtime.policy == "float32":
            runtime.policy = cfg.train.mixed_precision
        if cfg.train.steps_per_execution and name != "tpu":
            runtime.steps_per_execution = cfg.train.steps_per_execution
        _RUNTIMES[name] = runtime
    runtime = _RUNTIMES[name]
    keras.mixed_precision.set_global_policy(runtime.policy)
    return runtime


def cluster_from_env() -> tuple[int, int]:
    """(workers, this worker's index, chief first) from TF_CONFIG.

    Raises:
        ConfigError: TF_CONFIG is unset, not JSON, or does not list this task.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError('train.strategy: "multi_worker" needs TF_CONFIG, e.g. {"cluster": {"worker": '
                          '["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}')
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config["task"]
        tasks = [("chief", i) for i in range(len(cluster.get("chief", [])))]
        tasks += [("worker", i) for i in range(len(cluster.get("worker", [])))]
        return len(tasks), tasks.index((task["type"], int(task["index"])))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"TF_CONFIG: not a cluster that lists this task ({e}): {raw[:200]}") from None


def _patch_keras_multi_worker_logs() -> None:
    """Keras 3.15 averages a step's logs over workers with ``strategy.reduce("MEAN", v, axis=0)``,
    which fails on the scalar losses and metrics ("Invalid reduction dimension 0 for input with
    0 dimensions"): no multi-worker `fit` gets past its first step. Scalars are reduced across
    replicas with ``axis=None``; everything else goes the Keras way."""
    from keras.src.backend.tensorflow import trainer

    original = getattr(trainer, "reduce_per_replica", None)
    if original is None or getattr(original, "tfvision_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(strategy):
            return original(values, strategy, reduction)

        def one(v):
            if v.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original(v, strategy, reduction)

        return keras.tree.map_structure(one, values)

    reduce_per_replica.tfvision_patched = True
    trainer.reduce_per_replica = reduce_per_replica


# --------------------------------------------------------------------------- TPU checks


def check_tpu_config(cfg) -> None:
    """Refuse (ConfigError) what a TPU cannot run, before any work is done.

    The input pipeline runs on the TPU host inside TensorFlow's runtime; code that
    leaves the graph for Python (`tf.numpy_function`) cannot go with it. Whole training
    steps are XLA-compiled by TPUStrategy, so other jit settings conflict.
    """
    t, a = cfg.train, cfg.augment
    if t.mixed_precision == "mixed_float16":
        raise ConfigError("train.mixed_precision: TPUs compute in bfloat16, not float16; use "
                          "'mixed_bfloat16' or 'float32' (strategy 'tpu' trains in mixed_bfloat16 either way)")
    if a.enabled and a.albumentations is not None:
        raise ConfigError("augment.albumentations: runs per image in Python (tf.numpy_function), which a "
                          "TPU input pipeline cannot run; use the native augment.params ops with strategy 'tpu'")
    flags = os.environ.get("TF_XLA_FLAGS", "")
    auto_jit = [f for f in flags.split() if f.startswith("--tf_xla_auto_jit=") and f.split("=")[1] not in ("0", "-1")]
    if auto_jit or tf.config.optimizer.get_jit():
        raise ConfigError(f"TF_XLA_FLAGS {' '.join(auto_jit) or '(tf.config.optimizer.set_jit)'}: XLA "
                          "auto-clustering conflicts with TPUStrategy, which compiles each training step "
                          "itself; unset it for strategy 'tpu'")


DICOM_MAGIC = (128, b"DICM")


def check_host_decoders(paths) -> None:
    """Refuse DICOM files for a TPU run: pydicom decodes them outside the graph.

    Raises:
        ConfigError: naming the first DICOM file.
    """
    offset, magic = DICOM_MAGIC
    for path in paths:
        path = str(path)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                is_dicom = f.read(len(magic)) == magic
        except OSError:
            continue  # unreadable files are the data check's business
        if is_dicom or path.lower().endswith(".dcm"):
            raise ConfigError(f"train.strategy: 'tpu' cannot read DICOM ({path}): pydicom decodes it in "
                              "Python (tf.numpy_function), outside the TPU input pipeline; convert the "
                              "images to PNG first or train with another strategy")


def check_static(element_spec, what: str) -> None:
    """Refuse (ConfigError) a dataset element with an unknown dimension: XLA compiles a TPU
    step for one shape, and a batch dimension of None (a last partial batch) or a variable
    image size would recompile or fail."""
    for spec in tf.nest.flatten(element_spec):
        if not spec.shape.is_fully_defined():
            raise ConfigError(f"train.strategy 'tpu': the {what} batches have a dynamic shape {spec.shape} "
                              f"({spec.name or spec.dtype.name}); TPUs need static shapes: fixed image size "
                              "and train.batch_size at most the number of samples per worker")


# --------------------------------------------------------------------------- run folder


_SKIP = shutil.ignore_patterns(".*", "tensorboard", "last.keras", "*.png")
WORKER_MARKER = PROCESS_MARKER  # a worker's folder is the scratch folder of its process


@contextmanager
def write_folder(runtime: Runtime | None, run_dir: Path):
    """The folder this process writes its run into: `run_dir` on the chief; on other workers a
    temporary folder of their own, removed at the end.

    Every worker saves what the chief saves (Keras reads variables collectively), so each
    needs a run folder. When the chief's has trained before, a worker's starts as a copy of
    it (shared storage, as for BackupAndRestore in any multi-worker run), so that a restarted
    cluster resumes every worker at the chief's epoch. Only folders made here are removed: this
    one at the end, and those of killed workers, known by their marker and dead process.
    """
    if runtime is None or runtime.is_chief:
        yield Path(run_dir)
        return
    prefix = f"tfvision-worker{runtime.worker}-"
    with process_dir(tempfile.gettempdir(), prefix) as tmp:
        folder = tmp / "run"  # beside the marker, not with it
        # Only a run that has trained before: a new one's chief is writing its split and data
        # report right now, and a copy could catch half of them (this worker derives the same).
        started = Path(run_dir, "backup").is_dir() or Path(run_dir, "progress.json").is_file()
        if started:
            shutil.copytree(run_dir, folder, ignore=_SKIP)
        log.info("worker %d of %d writes to %s (removed at the end)", runtime.worker, runtime.workers, folder)
        yield folder
