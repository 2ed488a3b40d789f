"""Multi-label classification: K independent findings per image, some unknown.

Raw entries are 1, 0, -1 (uncertain) or blank. The config's policies turn each
into a training target and a known flag: ``ignore`` masks it out, ``ones`` /
``zeros`` set it, ``smooth`` sets a soft value. Targets travel as
``concat([target, known])`` so the masked loss and metrics see the mask.

Evaluation is stricter than training: only entries that are really 1 or 0
(blank counts when its policy makes it 0 or 1) are scored; uncertain ones are
never counted as negatives.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd

from tfvision import metrics as M
from tfvision.config import Config, LabelPolicy
from tfvision.data.sources import Y
from tfvision.keras_metrics import MaskedAUC
from tfvision.losses import multilabel_loss
from tfvision.models.heads import build_image_model
from tfvision.tasks.base import TASKS, Task


def _apply(raw: np.ndarray, policy: str, smooth: float) -> tuple[np.ndarray, np.ndarray]:
    value = {"ones": 1.0, "zeros": 0.0, "smooth": smooth, "ignore": 0.0}[policy]
    return np.full(raw.shape, value, np.float32), np.full(raw.shape, policy != "ignore", np.float32)


def encode(raw: pd.DataFrame, class_names: list[str], uncertain: LabelPolicy, blank: LabelPolicy):
    """Raw ``y:<class>`` strings -> (targets [N, K], known [N, K]) under the policies."""
    n, k = len(raw), len(class_names)
    targets, known = np.zeros((n, k), np.float32), np.zeros((n, k), np.float32)
    for j, c in enumerate(class_names):
        col = raw[Y + c].to_numpy()
        t, m = targets[:, j], known[:, j]
        for value, hard in (("1", 1.0), ("0", 0.0)):
            sel = col == value
            t[sel], m[sel] = hard, 1.0
        for value, policy in (("-1", uncertain), ("", blank)):
            sel = col == value
            pt, pm = _apply(col[sel], policy.for_class(c), policy.smooth_value)
            t[sel], m[sel] = pt, pm
    return targets, known


@TASKS.register("multilabel")
class MultiLabel(Task):
    name = "multilabel"
    activation = "sigmoid"
    sample_class_weights = False  # weights live in the loss, per label (losses.label_weights)

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg

    def class_names(self, frame, cfg):
        found = [c[len(Y):] for c in frame.columns if c.startswith(Y)]
        return list(cfg.data.class_names or found)

    def targets(self, frame, class_names):
        return encode(frame, class_names, self.cfg.data.uncertain, self.cfg.data.blank)

    def eval_targets(self, frame, class_names):
        """1 / 0 where the label is really known, -1 elsewhere (uncertain, ignored blanks)."""
        targets, known = self.targets(frame, class_names)
        y = np.where(known > 0, np.round(targets), -1.0).astype(np.float32)
        uncertain = np.stack([frame[Y + c].to_numpy() == "-1" for c in class_names], axis=1)
        smooth = (known > 0) & (targets != np.round(targets))
        y[uncertain | smooth] = -1.0
        return y

    def class_counts(self, targets, known=None):
        pos = targets >= 0.5
        return (pos if known is None else pos & (known > 0)).sum(axis=0)

    def tiers(self, targets, class_tier):
        # An image takes the strongest tier among its positive classes (light when none).
        pos = targets >= 0.5
        return np.where(pos, class_tier[None, :], 0).max(axis=1).astype(np.int32)

    def build_model(self, cfg, num_classes, norm):
        return build_image_model(cfg.model.backbone, cfg.data.channels, num_classes, cfg.model.weights,
                                 cfg.model.head, norm, clahe=cfg.data.clahe)

    def loss(self, cfg, inputs=None):
        pos = neg = None
        if inputs is not None:
            pos, neg = inputs.counts, inputs.known_counts - inputs.counts
        return multilabel_loss(cfg.train.loss, len(inputs.class_names) if inputs else 0, pos, neg)

    def metrics(self, num_classes, class_names=None):
        per_class = [MaskedAUC(num_classes, i, name=f"auc_{_slug(c)}") for i, c in enumerate(class_names or [])]
        return [MaskedAUC(num_classes, name="auc"), *per_class]

    @staticmethod
    def format_batch(batch):
        return batch["image"], keras.ops.concatenate([batch["target"], batch["known"]], axis=-1)

    def summarize(self, targets, logits, class_names):
        m = M.multilabel_metrics(targets, M.sigmoid(logits), class_names)
        return {
            "roc_auc": m["roc_auc_macro"], "pr_auc": m["pr_auc_macro"], "macro_f1": m["macro_f1"],
            "roc_auc_per_class": {c: v["roc_auc"] for c, v in m["per_class"].items()},
        }


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
