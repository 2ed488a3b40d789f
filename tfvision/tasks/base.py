"""The Task interface the trainer uses."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tfvision.config import Config
from tfvision.inference import predict_logits
from tfvision.registry import Registry

TASKS = Registry("task")


class Task:
    name = "base"
    activation = "softmax"  # applied to logits by evaluate / predict / export
    sample_class_weights = True  # class weights become per-sample weights in the pipeline

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg

    def check_config(self, cfg: Config) -> None:
        """Refuse (ConfigError) settings this task cannot honour, before a run folder is written."""

    def class_names(self, frame: pd.DataFrame, cfg: Config) -> list[str]:
        raise NotImplementedError

    def targets(self, frame: pd.DataFrame, class_names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(targets [N, K] float32, known mask [N, K] or None)."""
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

    def build_model(self, cfg: Config, num_classes: int, norm):
        raise NotImplementedError

    def loss(self, cfg: Config, inputs=None):
        raise NotImplementedError

    def metrics(self, num_classes: int, class_names: list[str] | None = None) -> list:
        raise NotImplementedError

    def summarize(self, targets: np.ndarray, logits: np.ndarray, class_names: list[str]) -> dict:
        """Validation metrics for metrics.json (keys prefixed by the caller)."""
        raise NotImplementedError

    def mask_paths(self, frame: pd.DataFrame) -> np.ndarray | None:
        """Label images travelling with the images (segmentation)."""
        return None

    def compile_args(self, cfg: Config, inputs, model) -> dict:
        """Keyword arguments for `model.compile` besides the optimizer."""
        return {"loss": self.loss(cfg, inputs), "metrics": self.metrics(len(inputs.class_names), inputs.class_names)}

    def score(self, model, dataset, inputs, split: str) -> dict:
        """Validation summary of `model` on `split` (metrics.json, keys without the val_ prefix)."""
        return self.summarize(inputs.targets(split), predict_logits(model, dataset), inputs.class_names)

    format_batch = None  # default (image, target[, weight])
