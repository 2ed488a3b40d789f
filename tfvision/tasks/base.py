"""The Task interface the trainer uses."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tfvision.config import Config


class Task:
    name = "base"
    activation = "softmax"  # applied to logits by evaluate / predict / export

    def class_names(self, frame: pd.DataFrame, cfg: Config) -> list[str]:
        raise NotImplementedError

    def targets(self, frame: pd.DataFrame, class_names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(targets [N, K] float32, known mask [N, K] or None)."""
        raise NotImplementedError

    def class_counts(self, targets: np.ndarray) -> np.ndarray:
        return targets.sum(axis=0)

    def tiers(self, targets: np.ndarray, class_tier: np.ndarray) -> np.ndarray:
        """Augmentation tier per sample from the per-class tier."""
        raise NotImplementedError

    def build_model(self, cfg: Config, num_classes: int, norm):
        raise NotImplementedError

    def loss(self, cfg: Config):
        raise NotImplementedError

    def metrics(self, num_classes: int) -> list:
        raise NotImplementedError

    def summarize(self, targets: np.ndarray, logits: np.ndarray, class_names: list[str]) -> dict:
        """Validation metrics for metrics.json (keys prefixed by the caller)."""
        raise NotImplementedError

    format_batch = None  # default (image, target[, weight])
