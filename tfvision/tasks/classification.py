"""Multi-class classification: one label per image, softmax over K classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tfvision import metrics as M
from tfvision.errors import DataError
from tfvision.tasks.base import TASKS, Task
from tfvision.tasks.scoring import Scorer, headline, nll_single, worst_confused


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    losses = ("crossentropy", "focal")
    sources = ("ham10000", "csv", "folders", "tfrecord")

    def class_names(self, frame: pd.DataFrame, cfg) -> list[str]:
        found = self.sort_labels(frame["label"].unique().tolist(), cfg)
        if cfg.data.class_names is None:
            return found
        unknown = sorted(set(found) - set(cfg.data.class_names))
        if unknown:
            raise DataError(f"data.class_names: labels {unknown[:10]} in the data are not listed")
        return list(cfg.data.class_names)

    def sort_labels(self, labels: list[str], cfg) -> list[str]:
        """The class order when data.class_names does not fix it: sorted names."""
        return sorted(labels)

    def targets(self, frame, class_names):
        index = {c: i for i, c in enumerate(class_names)}
        y = frame["label"].map(index).to_numpy()
        return np.eye(len(class_names), dtype=np.float32)[y], None

    def tiers(self, targets, class_tier):
        return class_tier[targets.argmax(axis=1)].astype(np.int32)

    def build_model(self, cfg, num_classes, norm):
        from tfvision.models.heads import build_image_model

        return build_image_model(cfg.model.backbone, cfg.data.channels, num_classes, cfg.model.weights,
                                 cfg.model.head, norm, clahe=cfg.data.clahe)

    def loss(self, cfg, inputs=None):
        from tfvision.losses import classification_loss

        return classification_loss(cfg.train.loss)

    def metrics(self, num_classes, class_names=None):
        import keras

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

    def scorer(self, class_names, *, ordinal=False, match=False):
        return SingleLabelScorer(self.output, class_names, ordinal=ordinal, match=match)


class SingleLabelScorer(Scorer):
    """One class per image (softmax); targets arrive one-hot. `ordinal`: the classes are ordered
    grades (quadratic kappa, kappa-maximising cut points); `match`: quotas from the training split."""

    def __init__(self, output, class_names, ordinal=False, match=False):
        super().__init__(output, class_names)
        self.ordinal, self.match = ordinal, match

    @staticmethod
    def _idx(y):
        return np.asarray(y).argmax(axis=1)

    def fit_temperature(self, logits, y) -> float:
        return M.fit_temperature(logits, self._idx(y))

    def calibration(self, y, probs, bins=True) -> dict:
        yi = self._idx(y)
        c = M.calibration(yi, probs, n_bins=15)
        c["nll"] = nll_single(yi, probs)
        if not bins:
            c.pop("bins")
        return c

    def metrics(self, y, probs) -> dict:
        m = M.multiclass_metrics(self._idx(y), probs, self.names, ordinal=self.ordinal)
        m["worst_confused"] = worst_confused(m["confusion_matrix"], self.names)
        return m

    def tune(self, y, probs, train_counts) -> dict:
        fractions = np.asarray(train_counts, np.float64)
        fractions = (fractions / fractions.sum()).tolist()
        if self.ordinal:
            score = probs @ np.arange(len(self.names))
            if self.match:
                return {"kind": "ordinal", "method": "distribution", "fractions": fractions,
                        "cuts": M.distribution_cuts(score, fractions).tolist()}
            rounder = M.OptimizedRounder(len(self.names)).fit(score, self._idx(y))
            rule = {"kind": "ordinal", "method": "optimized_rounder", "cuts": rounder.coef_.tolist()}
            tuned = self.decision_metrics(y, probs, rule)["quadratic_kappa"]
            plain = self.decision_metrics(y, probs, None)["quadratic_kappa"]
            if tuned is None or plain is not None and tuned <= plain:
                # Cut points on the expected grade can lose to argmax when the probability mass
                # is not unimodal along the grades; keep the better rule on val.
                return {"kind": "argmax", "method": "argmax", "val_quadratic_kappa": plain,
                        "rejected": {**rule, "val_quadratic_kappa": tuned}}
            return rule
        if self.match:
            return {"kind": "distribution", "method": "match_distribution", "fractions": fractions}
        return {"kind": "argmax", "method": "argmax"}

    def decision_metrics(self, y, probs, decision) -> dict:
        pred = self.output.decide(probs, decision, self.names)
        m = M.multiclass_metrics(self._idx(y), np.eye(len(self.names))[pred], self.names, ordinal=True)
        keys = ["accuracy", "balanced_accuracy", "macro_f1"] + (["quadratic_kappa"] if self.ordinal else [])
        return {k: m[k] for k in keys}

    def headline(self, m) -> str:
        return headline(m, ["accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "ece"])

    def describe_rule(self, rule):
        if rule["kind"] == "ordinal":
            return (f"cut points on the expected grade ({rule.get('method')}): "
                    + ", ".join(f"{c:.3f}" for c in rule["cuts"]) + ".")
        if rule["kind"] == "distribution":
            return "classes assigned so that their proportions match the training split's."
        return "the most probable class" + ("." if "rejected" in rule else
                                            " (no tuning asked; see `--ordinal`, `--match-distribution`).")

    def plots(self, y, probs, raw, metrics, out: Path) -> list[tuple[str, str]]:
        from tfvision import plots as P

        yi = self._idx(y)
        P.roc_curves(yi, probs, self.names, out / "roc.png")
        P.pr_curves(yi, probs, self.names, out / "pr.png")
        P.confusion_matrix_plot(metrics["confusion_matrix"], self.names, out / "confusion_matrix.png")
        P.confusion_matrix_plot(metrics["confusion_matrix"], self.names, out / "confusion_matrix_normalized.png",
                                normalized=True)
        P.reliability_diagram(M.calibration(yi, probs, 15), out / "reliability.png")
        P.reliability_diagram(M.calibration(yi, raw, 15), out / "reliability_uncalibrated.png")
        P.per_class_bars(metrics["per_class"], "f1", out / "per_class_f1.png")
        P.per_class_bars(metrics["per_class"], "roc_auc", out / "per_class_roc_auc.png")
        return [("ROC curves", "roc.png"), ("Precision-recall curves", "pr.png"),
                ("Confusion matrix", "confusion_matrix.png"),
                ("Confusion matrix, row-normalised", "confusion_matrix_normalized.png"),
                ("Reliability (calibrated)", "reliability.png"),
                ("Reliability (before temperature scaling)", "reliability_uncalibrated.png"),
                ("F1 per class", "per_class_f1.png"), ("ROC-AUC per class", "per_class_roc_auc.png")]
