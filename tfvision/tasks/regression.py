"""Ordinal regression: one grade per image (diabetic retinopathy 0-4, ISUP 0-5, ...).

Grades come from a numeric CSV column; their sorted values are the classes, so a
grade travels through the shared pipeline as one-hot over K grades, exactly like
a class (TFRecord, tiers, class weights and MixUp/CutMix need nothing new; a
MixUp blend becomes a blended grade). The model sees it in one of two forms:

- ``mode: "regression"``: one output, the grade itself, with an MSE, Huber or
  smooth-L1 loss;
- ``mode: "coral"``: K-1 cumulative logits, ``P(grade > k)``, each a binary
  cross-entropy (CORAL, Cao, Mirjalili and Raschka 2020, shared weights in the
  head but one bias per cut). The score is the expected grade ``sum_k P(grade > k)``.

Either way the model's score is continuous. `evaluate` tunes K-1 cut points on
validation that maximise quadratic kappa (the playbook's `OptimizedRounder`) and
saves them to thresholds.json; predict and the exported graph cut with them.
Without tuned cuts the grade is the score rounded to the nearest grade.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tfvision import metrics as M
from tfvision.config import opt
from tfvision.errors import ConfigError, DataError
from tfvision.tasks.base import TASKS
from tfvision.tasks.classification import Classification
from tfvision.tasks.outputs import Output, count_below
from tfvision.tasks.scoring import Scorer, headline


@dataclass(kw_only=True)
class RegressionOptions:
    mode: Literal["regression", "coral"] = opt(
        "regression", help="regression: one output, the grade (loss mse, huber or smooth_l1); coral: K-1 "
        "cumulative logits P(grade > k), binary cross-entropy (loss crossentropy)")
    delta: float = opt(1.0, min=1e-6, help="huber: the delta; smooth_l1: the beta (Huber(beta) / beta)")


def default_cuts(k: int) -> list[float]:
    """Rounding to the nearest grade: cuts halfway between grades."""
    return [i + 0.5 for i in range(k - 1)]


class GradeOutput(Output):
    """A continuous grade score -> a grade index through cut points (thresholds.json ``cuts``).

    `activate` returns the score [N, 1]: the output itself (regression), or the expected grade
    ``sum sigmoid(z)`` over K-1 cumulative logits (coral). A temperature does not apply.
    """

    activation = "grade"
    compared = "scores"

    def activate(self, logits, temperature=1.0):
        z = np.asarray(logits, np.float64)
        return z if z.shape[-1] == 1 else M.sigmoid(z).sum(axis=-1, keepdims=True)

    def activate_graph(self, logits):
        import tensorflow as tf

        return logits if logits.shape[-1] == 1 else tf.reduce_sum(tf.sigmoid(logits), axis=-1, keepdims=True)

    def rule(self, decision, class_names):
        cuts = (decision or {}).get("cuts") or default_cuts(len(class_names))
        return {"kind": "cuts", "cuts": [float(c) for c in cuts]}

    def decide(self, probs, decision, class_names):
        cuts = self.rule(decision, class_names)["cuts"]
        return np.digitize(np.asarray(probs, np.float64)[:, 0], np.asarray(cuts, np.float64))

    def serve(self, logits, temperature, rule):
        import tensorflow as tf

        score = self.activate_graph(tf.cast(logits, tf.float32))
        return {"scores": score, "labels": count_below(score[..., 0], rule["cuts"])}

    def describe(self):
        return {"scores": "float32 [N, 1]: the continuous grade score (expected grade for coral models)",
                "labels": "int64 [N]: grade index, the number of thresholds.json cut points the score reaches"}

    def agree(self, got, ref):
        return np.rint(got) == np.rint(ref)

    def columns(self, probs, class_names):
        return {"score": probs[:, 0]}


@TASKS.register("regression")
class Regression(Classification):
    name = "regression"
    options = RegressionOptions
    losses = ("mse", "huber", "smooth_l1", "crossentropy")
    sources = ("csv", "tfrecord")
    output = GradeOutput()

    def check_config(self, cfg):
        o = cfg.task_options
        coral = o.mode == "coral"
        if cfg.train.loss.name is None:
            cfg.train.loss.name = "crossentropy" if coral else "mse"
        super().check_config(cfg)
        if coral != (cfg.train.loss.name == "crossentropy"):
            raise ConfigError(f"train.loss.name: {cfg.train.loss.name!r} does not fit regression.mode {o.mode!r} "
                              "(coral: crossentropy; regression: mse, huber or smooth_l1)")
        lc = cfg.train.loss
        if lc.label_smoothing or lc.focal_gamma != type(lc)().focal_gamma or lc.alpha != "none":
            # These shape classification losses; a grade's loss would ignore them silently.
            raise ConfigError("train.loss: label_smoothing, focal_gamma and alpha do not apply to regression; "
                              "leave them out (regression.delta shapes huber and smooth_l1)")

    # ---- data: grades are classes in grade order (one-hot targets, tiers and checks of Classification)
    def sort_labels(self, labels, cfg):
        return sorted(labels, key=lambda v: _grade_value(v, f"data.label_column {cfg.data.label_column!r}"))

    def class_names(self, frame, cfg):
        names = super().class_names(frame, cfg)
        # A listed order is the grade order the model learns: it must be the grades' own.
        values = [_grade_value(n, "data.class_names") for n in names]
        if values != sorted(values) or len(set(values)) != len(values):
            raise DataError(f"data.class_names: regression grades must be listed in increasing order, "
                            f"got {names}")
        return names

    # ---- model
    def _coral(self, cfg) -> bool:
        return cfg.task_options.mode == "coral"

    def build_model(self, cfg, num_classes, norm):
        from tfvision.models.heads import build_image_model

        outputs = num_classes - 1 if self._coral(cfg) else 1
        return build_image_model(cfg.model.backbone, cfg.data.channels, outputs, cfg.model.weights,
                                 cfg.model.head, norm, clahe=cfg.data.clahe)

    def loss(self, cfg, inputs=None):
        import keras

        name, delta = cfg.train.loss.name, cfg.task_options.delta
        if name == "crossentropy":
            return keras.losses.BinaryCrossentropy(from_logits=True)
        if name == "mse":
            return keras.losses.MeanSquaredError()
        return keras.losses.Huber(delta=delta)  # smooth_l1 = Huber(beta) / beta: see compile_args

    def compile_args(self, cfg, inputs, model):
        args = super().compile_args(cfg, inputs, model)
        if cfg.train.loss.name == "smooth_l1":
            args["loss_weights"] = 1.0 / cfg.task_options.delta
        return args

    def metrics(self, num_classes, class_names=None):
        import keras

        if self._coral(self.cfg):
            return [keras.metrics.BinaryAccuracy(name="cut_accuracy", threshold=0.0)]  # logits: cut at 0
        return [keras.metrics.MeanAbsoluteError(name="mae"), keras.metrics.RootMeanSquaredError(name="rmse")]

    def format_batch(self, batch):
        """One-hot grades -> the grade [B, 1] (regression) or P(grade > k) [B, K-1] (coral)."""
        import keras

        onehot = batch["target"]
        k = onehot.shape[-1]
        if self._coral(self.cfg):
            y = 1.0 - keras.ops.cumsum(onehot, axis=-1)[:, : k - 1]
        else:
            y = keras.ops.sum(onehot * keras.ops.arange(k, dtype="float32"), axis=-1, keepdims=True)
        return (batch["image"], y, batch["weight"]) if "weight" in batch else (batch["image"], y)

    # ---- scoring
    def summarize(self, targets, logits, class_names):
        m = grade_metrics(targets.argmax(1), self.output.activate(logits)[:, 0], len(class_names))
        return {k: m[k] for k in ("quadratic_kappa", "mae", "rmse")}

    def scorer(self, class_names, *, ordinal=False, match=False):
        if match:
            raise ConfigError("--match-distribution: a regression run tunes cut points on val instead")
        return GradeScorer(self.output, class_names)


def _grade_value(label: str, where: str) -> float:
    try:
        return float(label)
    except ValueError:
        raise DataError(f"{where}: regression needs numeric grades, got {label!r}") from None


def grade_metrics(y: np.ndarray, score: np.ndarray, k: int, cuts=None) -> dict:
    """QWK, accuracy and MAE of the grades cut from `score` (default: rounded), and MAE/RMSE of the
    score itself. QWK is scikit-learn's ``cohen_kappa_score(weights="quadratic")`` over all K grades."""
    from sklearn.metrics import confusion_matrix

    pred = np.digitize(score, np.asarray(cuts if cuts is not None else default_cuts(k), np.float64))
    err = score - y
    n = len(y)
    return {"quadratic_kappa": M.quadratic_weighted_kappa(y, pred, k),
            "accuracy": float(np.mean(pred == y)) if n else None,
            "grade_mae": float(np.mean(np.abs(pred - y))) if n else None,
            "mae": float(np.mean(np.abs(err))) if n else None,
            "rmse": float(np.sqrt(np.mean(err**2))) if n else None,
            "confusion_matrix": confusion_matrix(y, pred, labels=np.arange(k)).tolist()}


class GradeScorer(Scorer):
    """Grades against a continuous score: metrics of the rounded score, cut points tuned for QWK."""

    summary = ["quadratic_kappa", "accuracy", "grade_mae", "mae", "rmse"]
    about = ("Grades from the score rounded to the nearest grade (quadratic kappa, accuracy, grade_mae); "
             "mae and rmse of the score itself.")

    def _yk(self, y, probs):
        return np.asarray(y).argmax(axis=1), np.asarray(probs, np.float64)[:, 0]

    def metrics(self, y, probs):
        yi, score = self._yk(y, probs)
        return grade_metrics(yi, score, len(self.names))

    def tune(self, y, probs, train_counts):
        yi, score = self._yk(y, probs)
        cuts = M.OptimizedRounder(len(self.names)).fit(score, yi).coef_.tolist()
        return {"kind": "cuts", "method": "optimized_rounder", "cuts": cuts}

    def decision_metrics(self, y, probs, decision):
        yi, score = self._yk(y, probs)
        m = grade_metrics(yi, score, len(self.names), (decision or {}).get("cuts"))
        return {k: m[k] for k in ("quadratic_kappa", "accuracy", "grade_mae")}

    def headline(self, m):
        return headline(m, ["quadratic_kappa", "accuracy", "mae", "rmse"])

    def describe_rule(self, rule):
        return ("cut points on the grade score maximising quadratic kappa (OptimizedRounder): "
                + ", ".join(f"{c:.3f}" for c in rule["cuts"]) + ".")

    def plots(self, y, probs, raw, metrics, out: Path):
        from tfvision import plots as P

        P.confusion_matrix_plot(metrics["confusion_matrix"], self.names, out / "confusion_matrix.png")
        return [("Confusion matrix (score rounded to the nearest grade)", "confusion_matrix.png")]
