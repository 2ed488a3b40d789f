"""The TensorFlow half of `tfvision.train`: check data, build, fit phases, evaluate.

Separate from `train.py` so that the CLI validates configs without importing
TensorFlow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tfvision import __version__, distribute
from tfvision.callbacks import (
    AtomicCheckpoint,
    LearningRateLogger,
    ResumableEarlyStopping,
    ResumablePlateau,
    monitor_mode,
    save_weights,
)
from tfvision.config import Config, default_phases
from tfvision.data import batch_augment
from tfvision.data.inputs import FileInputs, check_data
from tfvision.data.pipeline import PipelineSpec
from tfvision.data.tfrecord import RecordInputs
from tfvision.errors import ConfigError
from tfvision.fileio import write_json
from tfvision.models.backbones import get_spec, set_trainable
from tfvision.models.heads import input_norm
from tfvision.optimizers import build_optimizer
from tfvision.run import mark_phase_done, progress
from tfvision.schedules import build_schedule
from tfvision.tasks import get_task

log = logging.getLogger("tfvision.train")


# --------------------------------------------------------------------------- runtime


def setup_runtime(cfg: Config) -> distribute.Runtime:
    keras.utils.set_random_seed(cfg.seed)
    if cfg.data.deterministic:
        tf.config.experimental.enable_op_determinism()
    return distribute.setup(cfg)  # the strategy and the mixed-precision policy


def _callbacks(cfg: Config, run_dir: Path, phase: int, lr_groups: dict, sync=None):
    tr = cfg.train
    cbs = [
        LearningRateLogger(lr_groups),
        keras.callbacks.BackupAndRestore(str(run_dir / "backup" / f"phase{phase}")),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        AtomicCheckpoint(run_dir / "checkpoints", tr.monitor, monitor_mode(tr.monitor)),
        keras.callbacks.TerminateOnNaN(),
    ]
    if tr.early_stopping.patience:
        cbs.append(ResumableEarlyStopping(
            run_dir / "backup" / f"phase{phase}-early_stopping.json", monitor=tr.monitor,
            patience=tr.early_stopping.patience, min_delta=tr.early_stopping.min_delta,
            mode=monitor_mode(tr.monitor)))
    if tr.schedule.name == "plateau":
        cbs.append(ResumablePlateau(
            run_dir / "backup" / f"phase{phase}-plateau.json", monitor=tr.monitor,
            factor=tr.schedule.plateau_factor, patience=tr.schedule.plateau_patience,
            min_lr=tr.schedule.min_lr, mode=monitor_mode(tr.monitor)))
    if tr.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False))
    if sync is not None:  # last: it publishes what the others wrote this epoch (a gs:// run folder)
        cbs.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: sync()))
    return cbs


# --------------------------------------------------------------------------- fit


def fit_run(cfg, run_dir, frame, missing, resuming, check_only=False, verbose=2, sync=None) -> int:
    """Check the data, then train every phase not yet done into `run_dir`; `sync()` (if given)
    publishes the folder after each epoch and phase (`tfvision.run.working_copy`)."""
    task = get_task(cfg.task, cfg)
    records = RecordInputs(cfg, task) if cfg.data.source == "tfrecord" else None
    if records:  # shards were decoded and checked at conversion; the report comes from the manifest
        report = records.write_report(run_dir)
    else:
        frame, report = check_data(cfg, run_dir, frame, missing, resuming)
    if check_only:
        log.info("checked %d images, %d rejected; report in %s",
                 report["n_samples"] + report["n_rejected"], report["n_rejected"], run_dir / "data_report.json")
        return 0

    runtime = setup_runtime(cfg)
    strategy = runtime.strategy
    inputs = records or FileInputs(cfg, task, frame)
    class_names = inputs.class_names
    spec = PipelineSpec.from_config(cfg)
    stats = inputs.channel_stats(spec) if cfg.data.normalization == "dataset" else None
    norm = input_norm(cfg.model.backbone, cfg.data.normalization, cfg.data.channels, stats)
    write_json(run_dir / "run.json", {
        "tfvision_version": __version__, "task": cfg.task, "activation": task.activation,
        "class_names": class_names, "image_size": list(cfg.data.size), "channels": cfg.data.channels,
        "normalization": {"mean": list(norm.mean), "std": list(norm.std), "bgr": norm.bgr},
        "class_weights": None if inputs.weights is None else inputs.weights.tolist(),
        "class_tiers": None if inputs.tiers is None else inputs.tiers.tolist(),
        "replicas": runtime.replicas, "mixed_precision": runtime.policy,
        "oversampling": inputs.oversampling,
        "medical": ({"windows": cfg.data.windows, "slice_axis": cfg.data.slice_axis}
                    if cfg.data.source == "volumes" else None),
    })

    with strategy.scope():
        model = task.build_model(cfg, len(class_names), norm)
    backbone = _backbone_of(model)
    pattern = get_spec(cfg.model.backbone).stage_pattern if backbone is not None else None
    phases = default_phases(cfg)
    done = progress(run_dir)
    if done:
        model.load_weights(run_dir / "checkpoints" / f"phase{done - 1}.weights.h5")
    start_epoch = sum(p.epochs for p in phases[:done])
    for i, phase in enumerate(phases):
        if i < done:
            continue
        end_epoch = start_epoch + phase.epochs
        size = phase.image_size or cfg.data.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        pspec = PipelineSpec.from_config(cfg, image_size=size)
        train_ds, val_ds, steps, val_steps = runtime.fit_data(inputs, pspec, task.format_batch,
                                                              cfg.train.steps_per_epoch)
        lr = runtime.scale_lr(phase.lr if phase.lr is not None else cfg.train.optimizer.lr)
        if backbone is None and phase.trainable != "all":
            raise ConfigError(f"train.phases[{i}].trainable: {cfg.model.backbone!r} has no pretrained "
                              "backbone to freeze; use 'all'")
        with strategy.scope():
            if backbone is not None:
                set_trainable(backbone, pattern, phase.trainable, phase.n_blocks)
            schedule = build_schedule(cfg.train.schedule, lr, steps * phase.epochs, steps)
            mult = cfg.train.optimizer.backbone_lr_mult if phase.trainable != "head" else 1.0
            backbone_vars = backbone.trainable_variables if backbone is not None else []
            optimizer = build_optimizer(cfg.train.optimizer, schedule, backbone_vars, mult)
            # JAX has no graph mode but XLA: an unjitted step runs op by op, many times slower.
            model.compile(optimizer=optimizer, jit_compile=keras.backend.backend() == "jax",
                          steps_per_execution=runtime.execution_steps(steps),
                          **task.compile_args(cfg, inputs, model))
            if pspec.augment_on_device:  # augment.placement "accelerator": batches augmented in the step
                batch_augment.install(model, pspec, task.format_batch, phase=i)
        # The backbone's own rate gets a column in every phase of a run that gives it one.
        lr_groups = ({"lr_backbone": backbone_vars}
                     if backbone is not None and cfg.train.optimizer.backbone_lr_mult != 1.0 else {})
        log.info("phase %d/%d: epochs %d-%d, trainable=%s, lr=%g, size=%s, %d trainable weights",
                 i + 1, len(phases), start_epoch + 1, end_epoch, phase.trainable, lr, size,
                 len(model.trainable_weights))
        runtime.adapt(model)
        model._initial_epoch = None  # BackupAndRestore leaves this set from an earlier phase
        history = model.fit(
            train_ds, validation_data=val_ds, epochs=end_epoch, initial_epoch=start_epoch,
            steps_per_epoch=steps, validation_steps=val_steps, callbacks=_callbacks(cfg, run_dir, i, lr_groups, sync),
            verbose=verbose, shuffle=False,
        )
        if any(np.isnan(v).any() for v in history.history.values() if v):
            raise RuntimeError("training diverged (NaN loss); TerminateOnNaN stopped it")
        save_weights(model, run_dir / "checkpoints" / f"phase{i}.weights.h5")
        mark_phase_done(run_dir, i + 1)
        if sync is not None:
            sync()
        start_epoch = end_epoch

    if runtime.is_chief:  # the other workers' run folders are temporary
        finish(cfg, run_dir, task, model, inputs)
    return 0


def _backbone_of(model: keras.Model):
    """The nested pretrained encoder ("backbone"), or None (classic U-Net)."""
    try:
        return model.get_layer("backbone")
    except ValueError:  # Mask R-CNN nests it in its pyramid and names it as a property
        return getattr(model, "backbone", None)


def finish(cfg, run_dir: Path, task, model, inputs):
    """Evaluate the best checkpoint on validation; write metrics.json and the curves."""
    from tfvision import plots

    best = run_dir / "checkpoints" / "best.keras"
    if best.exists():
        # compile=False: inference only; safe_mode stays on (only registered tfvision layers).
        model = keras.saving.load_model(best, compile=False)
    spec = PipelineSpec.from_config(cfg)
    summary = task.score(model, inputs.dataset("val", spec, training=False, format_batch=task.format_batch),
                         inputs, "val")
    metrics = {f"val_{k}": v for k, v in summary.items()}
    metrics["n_val"] = int(inputs.sizes["val"])
    metrics["checkpoint"] = str(best.relative_to(run_dir)) if best.exists() else None
    write_json(run_dir / "metrics.json", metrics)
    history = pd.read_csv(run_dir / "history.csv")
    history = history.drop_duplicates("epoch", keep="last")  # a resumed epoch may be logged twice
    plots.training_curves(history, run_dir / "training_curves.png")
    log.info("validation: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                          if isinstance(v, float)))
    if not best.exists():
        raise ConfigError(f"train.monitor: {cfg.train.monitor!r} never appeared in the training logs")
