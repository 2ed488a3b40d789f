"""The Task contract: everything that differs between tasks, in one place per task.

The generic code (config loading, data, training, evaluate, predict, export,
extract, convert) calls these hooks and never branches on a task's name. A new
task is one module in this package that subclasses `Task` and registers it:

    @TASKS.register("regression")
    class Regression(Task): ...

Every module of the package is imported when tasks are looked up, so that
registering is all a new task does. Config validation imports every task,
and must stay free of TensorFlow: task modules import Keras and TensorFlow
inside the methods that need them.

``cfg`` below is the run's `tfvision.config.Config`. Tasks do not import the
config module's loader, which imports them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tfvision.errors import ConfigError, did_you_mean
from tfvision.registry import Registry
from tfvision.tasks.outputs import Output, Softmax

TASKS = Registry("task")


class Task:
    name = "base"

    # ---- config ---------------------------------------------------------------------------
    options = None  # a dataclass: the task's own config section, under the key `name` (None: no section)
    losses: tuple[str, ...] = ("crossentropy",)  # train.loss.name values; the first is the default
    sources: tuple[str, ...] = ("csv", "tfrecord")  # data.source values the task can read
    backbones: tuple[str, ...] = ()  # model.backbone names beyond the registered backbones
    mix = True  # MixUp/CutMix allowed (check_config refines)

    # ---- what the generic code reads --------------------------------------------------------
    output: Output = Softmax()  # activation, decision rule, served outputs
    label_layout = "index"  # per-image labels: "index" (one class), "multi_hot", or None (no image label)
    dense = False  # per-pixel outputs: predict works on whole volumes (--volume)
    sample_class_weights = True  # class weights become per-sample weights in the pipeline

    def __init__(self, cfg=None):
        self.cfg = cfg

    @property
    def activation(self) -> str:
        return self.output.activation

    # ---- config rules -----------------------------------------------------------------------
    def check_config(self, cfg) -> None:
        """Refuse (ConfigError) settings this task cannot honour; called by the loader, before TensorFlow
        loads and before anything is written. Subclasses call super() and add their own rules."""
        d = cfg.data
        if d.source not in self.sources:
            raise ConfigError(f"data.source: task {self.name!r} reads {list(self.sources)}, not {d.source!r}")
        loss = cfg.train.loss.name
        if loss is None:
            cfg.train.loss.name = self.losses[0]
        elif loss not in self.losses:
            raise ConfigError(f"train.loss.name: {loss!r} is not a loss of task {self.name!r} "
                              f"(choose from {list(self.losses)}){did_you_mean(loss, self.losses)}")

    @classmethod
    def schema_rules(cls) -> dict:
        """JSON Schema constraints that hold when ``task`` is this task (an ``if``/``then`` branch)."""
        return {"properties": {
            "data": {"properties": {"source": {"enum": list(cls.sources)}}},
            "train": {"properties": {"loss": {"properties": {"name": {"enum": list(cls.losses)}}}}}}}

    # ---- data -------------------------------------------------------------------------------
    def class_names(self, frame: pd.DataFrame, cfg) -> list[str]:
        raise NotImplementedError

    def targets(self, frame: pd.DataFrame, class_names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(targets [N, K] float32, known mask [N, K] or None): what the pipeline, the TFRecord
        ``target``/``known`` features and MixUp/CutMix carry."""
        raise NotImplementedError

    def eval_targets(self, frame: pd.DataFrame, class_names: list[str]) -> np.ndarray:
        """Targets for scoring (multi-label: -1 where the truth is unknown)."""
        return self.targets(frame, class_names)[0]

    def class_counts(self, targets: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
        """Positives per class among the training targets."""
        return targets.sum(axis=0)

    def tiers(self, targets: np.ndarray, class_tier: np.ndarray) -> np.ndarray:
        """Augmentation tier per sample from the per-class tier."""
        raise NotImplementedError

    def mask_paths(self, frame: pd.DataFrame) -> np.ndarray | None:
        """Label images travelling with the images (segmentation)."""
        return None

    def element_columns(self, frame: pd.DataFrame) -> dict | None:
        """Per-sample columns of the task's own (e.g. instance masks as RLE runs) that the pipeline
        carries to `decode_targets`: [N, ...] arrays or `tf.RaggedTensor`s."""
        return None

    decode_targets = None  # (element, window, size) -> element: see `tfvision.data.pipeline.from_elements`

    def record_features(self, frame: pd.DataFrame) -> list[dict] | None:
        """Per row, the task's own TFRecord features (`tfvision.data.features`), written by convert and
        read back into the columns `decode_targets` takes; None: the task has none."""
        return None

    def image_labels(self, targets: np.ndarray) -> np.ndarray:
        """Per-image labels from targets [N, K], for extract's features file (see `label_layout`)."""
        return (targets >= 0.5).astype(np.int64) if self.label_layout == "multi_hot" else targets.argmax(1)

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg, num_classes: int, norm):
        raise NotImplementedError

    def loss(self, cfg, inputs=None):
        raise NotImplementedError

    def metrics(self, num_classes: int, class_names: list[str] | None = None) -> list:
        raise NotImplementedError

    def compile_args(self, cfg, inputs, model) -> dict:
        """Keyword arguments for `model.compile` besides the optimizer."""
        return {"loss": self.loss(cfg, inputs), "metrics": self.metrics(len(inputs.class_names), inputs.class_names)}

    format_batch = None  # batch dict -> (x, y[, w]); None: (image, target[, weight])

    def custom_objects(self) -> dict:
        """Keras classes a saved model of this task needs registered before it loads (safe_mode stays on)."""
        return {}

    # ---- predict ----------------------------------------------------------------------------
    # (run, paths, batch_size, fmt) -> (table, errors, coco_results or None), for a task whose predictions
    # are not one probability row per image; None: `tfvision.predict` tabulates `Output.columns`.
    predict_table = None

    # ---- export -----------------------------------------------------------------------------
    # Formats `tfvision.export` cannot convert this task's serving graph to, each with why (the failing
    # op): `--format all` leaves them out and says so in export_report.json; asking for one is refused.
    unsupported_formats: dict[str, str] = {}

    # ---- end-of-training summary ------------------------------------------------------------
    def summarize(self, targets: np.ndarray, logits: np.ndarray, class_names: list[str]) -> dict:
        """Validation metrics for metrics.json (keys prefixed by the caller)."""
        raise NotImplementedError

    def score(self, model, dataset, inputs, split: str) -> dict:
        """Validation summary of `model` on `split` (metrics.json, keys without the val_ prefix)."""
        from tfvision.models.forward import predict_logits

        return self.summarize(inputs.targets(split), predict_logits(model, dataset), inputs.class_names)

    # ---- evaluate ---------------------------------------------------------------------------
    def scorer(self, class_names: list[str], *, ordinal: bool = False, match: bool = False):
        """The scorer `python -m tfvision.evaluate` calibrates, tunes and reports with (see
        `tfvision.tasks.scoring.Scorer`), or None: the task is scored by `score` alone, batch by
        batch, and reported by `report_lines`."""
        return None

    def report_figures(self, model, dataset, class_names: list[str], out) -> list[tuple[str, str]]:
        """(title, PNG name in `out`) that report.md embeds for a task scored by `score` alone,
        drawn from `dataset` (the split's batches, in order); none by default."""
        return []

    def report_lines(self, metrics: dict, class_names: list[str]) -> list[str]:
        """report.md's body for a task scored by `score` alone."""
        raise NotImplementedError

    def headline(self, metrics: dict) -> str:
        """One log line of the main metrics."""
        return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def slug(name: str) -> str:
    """A class name as a metric-name fragment: ``"Pleural Effusion"`` -> ``pleural_effusion``."""
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
