"""What evaluate asks of a task's scorer, and helpers the scorers share.

`python -m tfvision.evaluate` owns the flow: logits under TTA views, a temperature
fitted on val, a decision rule tuned on val, metrics on the evaluated split, then
calibration.json, thresholds.json, metrics.json, the plots and report.md. A task
supplies the pieces that depend on what its targets mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Scorer:
    """Scores probabilities (the task's `Output.activate`) against targets (`Task.eval_targets`)."""

    # report.md: the metrics of its summary table, and how they were computed
    summary = ["accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall",
               "roc_auc_macro", "pr_auc_macro", "quadratic_kappa", "ece", "mce", "nll"]
    about = ("Computed from the calibrated probabilities (temperature applied), with the default decision "
             "(argmax, or 0.5 per label).")

    def __init__(self, output, class_names):
        self.output, self.names = output, list(class_names)

    def fit_temperature(self, logits: np.ndarray, y) -> float:
        """The temperature minimising the val NLL of one view's logits (1.0: not calibrated)."""
        return 1.0

    def calibration(self, y, probs, bins: bool = True) -> dict:
        """Calibration figures: ``nll`` (minimised over the temperature), ``ece``, ``mce`` and, with
        `bins`, the reliability bins; None where the task has no such figure."""
        return {"nll": None, "ece": None, "mce": None, **({"bins": []} if bins else {})}

    def metrics(self, y, probs) -> dict:
        raise NotImplementedError

    def tune(self, y, probs, train_counts) -> dict:
        """The decision rule tuned on val (thresholds.json; ``kind`` is read by `Output.decide`)."""
        raise NotImplementedError

    def decision_metrics(self, y, probs, decision) -> dict:
        """The metrics a decision rule changes, under `decision` (None: the default rule)."""
        raise NotImplementedError

    def headline(self, m: dict) -> str:
        raise NotImplementedError

    def describe_rule(self, rule: dict) -> str:
        """report.md's sentence for a tuned rule (thresholds.json)."""
        return f"`{rule}`."

    def plots(self, y, probs, raw, metrics: dict, out: Path) -> list[tuple[str, str]]:
        """Write the plots into `out`; returns (title, file name) pairs for report.md."""
        return []


def nll_single(y, p) -> float:
    """Mean negative log-likelihood of the true classes `y` [N] under probabilities `p` [N, K]."""
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def worst_confused(cm, class_names, top: int = 5) -> list[dict]:
    """The largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    cm = np.asarray(cm)
    off = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j]]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": class_names[i], "pred": class_names[j], "count": c, "rate": c / int(cm[i].sum())}
            for c, i, j in off[:top]]


def headline(m: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None)
