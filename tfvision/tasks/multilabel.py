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

from pathlib import Path

import numpy as np
import pandas as pd

from tfvision import metrics as M
from tfvision.data.sources import Y
from tfvision.errors import ConfigError, UserError
from tfvision.tasks.base import TASKS, Task, slug
from tfvision.tasks.outputs import Sigmoid
from tfvision.tasks.scoring import Scorer, headline, nll_single


def _apply(raw: np.ndarray, policy: str, smooth: float) -> tuple[np.ndarray, np.ndarray]:
    value = {"ones": 1.0, "zeros": 0.0, "smooth": smooth, "ignore": 0.0}[policy]
    return np.full(raw.shape, value, np.float32), np.full(raw.shape, policy != "ignore", np.float32)


def encode(raw: pd.DataFrame, class_names: list[str], uncertain, blank):
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
    losses = ("crossentropy", "focal")
    sources = ("chexpert", "csv", "tfrecord")
    output = Sigmoid()
    label_layout = "multi_hot"
    sample_class_weights = False  # weights live in the loss, per label (losses.label_weights)

    def check_config(self, cfg):
        super().check_config(cfg)
        if cfg.data.source == "csv" and not cfg.data.label_columns:
            raise ConfigError("data.label_columns: required for a multilabel CSV")

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
        from tfvision.models.heads import build_image_model

        return build_image_model(cfg.model.backbone, cfg.data.channels, num_classes, cfg.model.weights,
                                 cfg.model.head, norm, clahe=cfg.data.clahe)

    def loss(self, cfg, inputs=None):
        from tfvision.losses import multilabel_loss

        pos = neg = None
        if inputs is not None:
            pos, neg = inputs.counts, inputs.known_counts - inputs.counts
        return multilabel_loss(cfg.train.loss, len(inputs.class_names) if inputs else 0, pos, neg)

    def metrics(self, num_classes, class_names=None):
        from tfvision.keras_metrics import MaskedAUC

        per_class = [MaskedAUC(num_classes, i, name=f"auc_{slug(c)}") for i, c in enumerate(class_names or [])]
        return [MaskedAUC(num_classes, name="auc"), *per_class]

    @staticmethod
    def format_batch(batch):
        import keras

        return batch["image"], keras.ops.concatenate([batch["target"], batch["known"]], axis=-1)

    def summarize(self, targets, logits, class_names):
        m = M.multilabel_metrics(targets, M.sigmoid(logits), class_names)
        return {
            "roc_auc": m["roc_auc_macro"], "pr_auc": m["pr_auc_macro"], "macro_f1": m["macro_f1"],
            "roc_auc_per_class": {c: v["roc_auc"] for c, v in m["per_class"].items()},
        }

    def scorer(self, class_names, *, ordinal=False, match=False):
        if ordinal or match:
            raise UserError("--ordinal and --match-distribution apply to single-label runs; "
                            "a multilabel run gets per-class F1 thresholds")
        return MultiLabelScorer(self.output, class_names)


class MultiLabelScorer(Scorer):
    """K independent labels (sigmoid); -1 marks an unknown truth, never a negative.

    Calibration treats every known (image, label) entry as one binary prediction.
    """

    @staticmethod
    def _binary(y, values):
        """Known entries only, flattened: (labels [M], values [M])."""
        y = np.asarray(y)
        known = y != -1
        return y[known].astype(np.int64), np.asarray(values)[known]

    def fit_temperature(self, logits, y) -> float:
        yk, zk = self._binary(y, logits)
        z2 = np.stack([np.zeros(zk.size), zk], axis=1)  # softmax([0, z]) = [1 - s(z), s(z)]
        return M.fit_temperature(z2, yk)

    def calibration(self, y, probs, bins=True) -> dict:
        yk, pk = self._binary(y, probs)
        c = M.calibration(yk, np.stack([1 - pk, pk], axis=1), n_bins=15)
        c["nll"] = nll_single(yk, np.stack([1 - pk, pk], axis=1))
        if not bins:
            c.pop("bins")
        return c

    def metrics(self, y, probs) -> dict:
        return M.multilabel_metrics(y, probs, self.names)

    def tune(self, y, probs, train_counts) -> dict:
        return {"kind": "multilabel", "method": "f1", "thresholds": M.tune_f1_thresholds(y, probs).tolist()}

    def decision_metrics(self, y, probs, decision) -> dict:
        th = None if decision is None else decision["thresholds"]
        m = M.multilabel_metrics(y, probs, self.names, thresholds=th)
        return {k: m[k] for k in ("macro_f1", "macro_precision", "macro_recall")}

    def headline(self, m) -> str:
        return headline(m, ["roc_auc_macro", "pr_auc_macro", "macro_f1", "ece"])

    def describe_rule(self, rule):
        return "per-class thresholds maximising F1 on val: " + ", ".join(f"{t:.3f}" for t in rule["thresholds"]) + "."

    def plots(self, y, probs, raw, metrics, out: Path) -> list[tuple[str, str]]:
        from tfvision import plots as P

        P.roc_curves(y, probs, self.names, out / "roc.png")
        P.pr_curves(y, probs, self.names, out / "pr.png")
        P.reliability_diagram(self.calibration(y, probs), out / "reliability.png")
        P.reliability_diagram(self.calibration(y, raw), out / "reliability_uncalibrated.png")
        P.per_class_bars(metrics["per_class"], "roc_auc", out / "per_class_roc_auc.png")
        P.per_class_bars(metrics["per_class"], "f1", out / "per_class_f1.png")
        return [("ROC curves", "roc.png"), ("Precision-recall curves", "pr.png"),
                ("Reliability, all known labels (calibrated)", "reliability.png"),
                ("Reliability (before temperature scaling)", "reliability_uncalibrated.png"),
                ("ROC-AUC per class", "per_class_roc_auc.png"), ("F1 per class (threshold 0.5)", "per_class_f1.png")]
