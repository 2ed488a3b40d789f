"""Trained runs -> probabilities: the half that evaluate and predict share.

    run folder -> LoadedRun: best.keras, run.json, calibration.json (temperature),
                  thresholds.json (the decision rule, applied by the task's `Output.decide`)
    images     -> the training pipeline's decode + resize (no augmentation)
               -> one compiled tf.function: a forward pass per TTA view -> logits [V, N, K]
               -> activation(logits / T), averaged over views, then over ensemble members

Probabilities are averaged, not logits: each member of an ensemble has its own
temperature, and an average of calibrated probabilities stays calibrated far
better than a probability of averaged logits.

>>> ens = Ensemble([load_run("runs/a"), load_run("runs/b")], tta_views(4))
>>> probs, errors = predict_files(ens, ["x.png", "broken.jpg"])
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfvision.config import AugmentParams
from tfvision.data.check import check_files
from tfvision.data.pipeline import PipelineSpec, from_elements
from tfvision.errors import UserError
from tfvision.models import layers as _layers  # noqa: F401  (registers tfvision layers for loading)
from tfvision.models import unet_blocks as _unet_blocks  # noqa: F401  (U-Net checkpoints: PadToMultiple, CropTo)
from tfvision.run import read_run
from tfvision.tasks import Task, get_task

# --------------------------------------------------------------------------- TTA views
CROP = 0.875  # side fraction of the five crops (the classic 224-of-256)


def _crop(fy: float, fx: float):
    """Crop CROP of each side, its top-left corner at (fy, fx) of the slack; resize back."""

    def view(x):
        hw = tf.shape(x)[1:3]
        size = tf.cast(tf.round(tf.cast(hw, tf.float32) * CROP), tf.int32)
        y0 = tf.cast(tf.round(tf.cast(hw[0] - size[0], tf.float32) * fy), tf.int32)
        x0 = tf.cast(tf.round(tf.cast(hw[1] - size[1], tf.float32) * fx), tf.int32)
        return tf.image.resize(x[:, y0 : y0 + size[0], x0 : x0 + size[1]], hw)

    return view


def _scale(s: float):
    def view(x):
        hw = tf.cast(tf.round(tf.cast(tf.shape(x)[1:3], tf.float32) * s), tf.int32)
        return tf.image.resize(x, tf.maximum(hw, 8))  # the model takes any size

    return view


VIEWS = {
    "identity": lambda x: x,
    "hflip": lambda x: tf.reverse(x, [2]),
    "vflip": lambda x: tf.reverse(x, [1]),
    "crop_center": _crop(0.5, 0.5),
    "scale1.25": _scale(1.25),
    "scale0.8": _scale(0.8),
    "rot180": lambda x: tf.reverse(x, [1, 2]),
    "crop_tl": _crop(0.0, 0.0),
    "crop_tr": _crop(0.0, 1.0),
    "crop_bl": _crop(1.0, 0.0),
    "crop_br": _crop(1.0, 1.0),
}


def tta_views(spec: int | str | list[str] | None) -> list[str]:
    """TTA views from ``--tta``: N (the first N of `VIEWS`' order) or comma-separated names.

    >>> tta_views(2), tta_views("identity,vflip")
    (['identity', 'hflip'], ['identity', 'vflip'])

    Vertical flips and rotations suit dermoscopy and histology, not chest X-rays:
    name the views explicitly where the default order does not fit.
    """
    if spec is None:
        return ["identity"]
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec)
    if isinstance(spec, int):
        if not 1 <= spec <= len(VIEWS):
            raise UserError(f"--tta: N must be 1..{len(VIEWS)}, got {spec}")
        return list(VIEWS)[:spec]
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in VIEWS]
    if unknown or not names:
        raise UserError(f"--tta: unknown view(s) {unknown}; choose from {list(VIEWS)} or give a number")
    return names


# --------------------------------------------------------------------------- runs
@dataclasses.dataclass
class LoadedRun:
    """A trained run ready for inference."""

    run_dir: Path
    model: keras.Model
    info: dict  # `run.read_run`: run.json plus temperature and decision
    task: Task  # the run's task: its output decides what probabilities and labels are

    @property
    def temperature(self) -> float:
        return self.info["temperature"]

    @property
    def decision(self) -> dict | None:
        return self.info["decision"]  # thresholds.json

    @property
    def task_name(self) -> str:
        return self.info["task"]

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.info["image_size"])

    @property
    def channels(self) -> int:
        return int(self.info["channels"])


def load_run(run_dir, checkpoint: str = "best") -> LoadedRun:
    """Load a run folder's checkpoint, run.json, and saved temperature and thresholds.

    Raises:
        UserError: not a finished run folder.
    """
    run_dir = Path(run_dir)
    info = read_run(run_dir, checkpoint)
    task = get_task(info["task"])
    # compile=False: inference only. safe_mode stays on: models hold only registered layers.
    model = keras.saving.load_model(run_dir / "checkpoints" / f"{checkpoint}.keras", compile=False,
                                    custom_objects=task.custom_objects())
    return LoadedRun(run_dir, model, info, task)


class Ensemble:
    """One or more runs with the same classes, evaluated under the same TTA views."""

    def __init__(self, runs: list[LoadedRun], views: list[str] | None = None):
        if not runs:
            raise UserError("no runs to predict with")
        first = runs[0]
        for r in runs[1:]:
            if (r.class_names, r.task_name, r.channels) != (first.class_names, first.task_name, first.channels):
                raise UserError(f"--ensemble: {r.run_dir} has another task, classes or channels than "
                                f"{first.run_dir}; only runs of the same task and classes can be averaged")
        self.runs = runs
        self.views = views or ["identity"]
        self._steps = {}

    @property
    def main(self) -> LoadedRun:
        return self.runs[0]

    def _step(self, i: int):
        if i not in self._steps:
            model, fns = self.runs[i].model, [VIEWS[v] for v in self.views]

            @tf.function(reduce_retracing=True)
            def step(x):
                x = tf.cast(x, tf.float32)
                return tf.stack([tf.cast(model(f(x), training=False), tf.float32) for f in fns])

            self._steps[i] = step
        return self._steps[i]

    def logits(self, i: int, dataset) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits [V, N, K] of member `i` over a dataset of ``x`` or ``(x, extra, ...)`` batches.

        Returns ``(logits, extra)`` where ``extra`` concatenates the batches' second
        element (targets, or the sample index of `image_dataset`), None if absent.
        """
        step, outs, extras = self._step(i), [], []
        for batch in dataset:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            outs.append(step(x).numpy())
            if isinstance(batch, tuple | list) and len(batch) > 1:
                extras.append(batch[1].numpy())
        k = int(self.runs[i].model.outputs[0].shape[-1])
        logits = np.concatenate(outs, axis=1) if outs else np.zeros((len(self.views), 0, k), np.float32)
        return logits, (np.concatenate(extras, axis=0) if extras else None)

    def combine(self, member_logits: list[np.ndarray], temperatures: list[float] | None = None) -> np.ndarray:
        """Mean over members and views of ``activate(logits / T)`` -> probabilities [N, K]."""
        temps = temperatures or [r.temperature for r in self.runs]
        output = self.main.task.output
        return np.mean([output.activate(z, t).mean(axis=0) for z, t in zip(member_logits, temps, strict=True)],
                       axis=0)


# --------------------------------------------------------------------------- files
def image_spec(run: LoadedRun, batch_size: int = 32) -> PipelineSpec:
    return PipelineSpec(image_size=run.image_size, channels=run.channels, batch_size=batch_size,
                        tiers=[AugmentParams()], augment=False)


def image_dataset(paths: list[str], spec: PipelineSpec) -> tf.data.Dataset:
    """Batches of ``(image, index)`` through the shared pipeline tail, unaugmented.

    The pipeline skips a file it cannot decode; carrying each file's index through
    it tells which ones were skipped, without decoding anything twice.
    """
    n = len(paths)
    ds = tf.data.Dataset.from_tensor_slices({
        "path": np.asarray(paths, dtype=str), "target": np.zeros((n, 1), np.float32),
        "tier": np.zeros(n, np.int32), "index": np.arange(n, dtype=np.int64)})
    return from_elements(ds, spec, training=False, format_batch=lambda b: (b["image"], b["index"]),
                         size_hint=n)


def predict_files(ens: Ensemble, paths: list[str], batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Probabilities [N, ...] for image files (NaN rows where unreadable) and an error per file.

    Errors are "" for files that were predicted, else "unreadable image: <the decoder's reason>".
    """
    paths = [str(p) for p in paths]
    n = len(paths)
    member_logits, seen = [], np.ones(n, bool)
    for i, run in enumerate(ens.runs):
        z, index = ens.logits(i, image_dataset(paths, image_spec(run, batch_size)))
        full = np.full((len(ens.views), n, *z.shape[2:]), np.nan, np.float32)
        if index is not None:
            full[:, index] = z
        member_logits.append(full)
        seen &= ~np.isnan(full[0].reshape(n, -1)[:, 0])
    combined = ens.combine([z[:, seen] for z in member_logits])
    probs = np.full((n, *combined.shape[1:]), np.nan)
    probs[seen] = combined
    errors = [""] * n
    failed = [paths[j] for j in np.flatnonzero(~seen)]
    if failed:
        reasons = {r["path"]: r["reason"] for r in check_files(failed, ens.main.channels, progress=False)}
        for j in np.flatnonzero(~seen):
            errors[j] = f"unreadable image: {reasons.get(paths[j], 'decoding failed')}"
    return probs, errors
