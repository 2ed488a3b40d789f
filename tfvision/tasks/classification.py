"""Multi-class classification: one label per image, softmax over K classes."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd

from tfvision import metrics as M
from tfvision.config import Config
from tfvision.errors import DataError
from tfvision.losses import classification_loss
from tfvision.models.heads import build_image_model
from tfvision.tasks.base import TASKS, Task


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    activation = "softmax"

    def class_names(self, frame: pd.DataFrame, cfg: Config) -> list[str]:
        found = sorted(frame["label"].unique().tolist())
        if cfg.data.class_names is None:
            return found
        unknown = sorted(set(found) - set(cfg.data.class_names))
        if unknown:
            raise DataError(f"data.class_names: labels {unknown[:10]} in the data are not listed")
        return list(cfg.data.class_names)

    def targets(self, frame, class_names):
        index = {c: i for i, c in enumerate(class_names)}
        y = frame["label"].map(index).to_numpy()
        return np.eye(len(class_names), dtype=np.float32)[y], None

    def tiers(self, targets, class_tier):
        return class_tier[targets.argmax(axis=1)].astype(np.int32)

    def build_model(self, cfg, num_classes, norm):
        return build_image_model(cfg.model.backbone, cfg.data.channels, num_classes, cfg.model.weights,
                                 cfg.model.head, norm, clahe=cfg.data.clahe)

    def loss(self, cfg, inputs=None):
        return classification_loss(cfg.train.loss)

    def metrics(self, num_classes, class_names=None):
        return [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc", from_logits=True, multi_label=False),
        ]

    def summarize(self, targets, logits, class_names):
        probs = M.softmax(logits)
        m = M.multiclass_metrics(targets.argmax(1), probs, class_names)
        return {
            "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "macro_f1": m["macro_f1"], "roc_auc": m["roc_auc_macro"],
        }
