"""Evaluate a trained run: ``python -m tfvision.evaluate --run RUN_DIR [--split val|test]``.

Reads top to bottom: load the run (and any ensemble members), rebuild its val
and evaluated splits from the saved split lists, get logits under the TTA
views, fit the temperature on val, tune the decision rule on val, score the
split, then write under the run folder:

    calibration.json           temperature (fitted on val; predict uses it)
    thresholds.json            decision rule (tuned on val; predict uses it)
    eval/<split>/metrics.json  metrics of the calibrated probabilities + before/after
    eval/<split>/report.md     data, config, tables, plots, confusions, decisions
    eval/<split>/*.png         ROC, PR, confusion matrices, reliability, per-class bars

Tasks plug in through `SCORERS` (classification and multilabel now; segmentation
adds a scorer with Dice/IoU and its own plots).

Exit codes: 0 success, 2 run/data/usage error (one line on stderr), 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from tfvision.cli import run_command
from tfvision.errors import DataError, UserError

log = logging.getLogger("tfvision.evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tfvision.evaluate",
        description="Evaluate a run folder: metrics, calibration, thresholds, plots and report.md "
                    "under RUN/eval/<split>/. Exit 0 ok, 2 run/data error, 1 other.")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run folder")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--tta", default="1", help="test-time augmentation: N views (1 = none) or "
                   "comma-separated names (identity,hflip,vflip,crop_center,scale1.25,...)")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="RUN_DIR",
                   help="more runs (e.g. other folds) whose probabilities are averaged with --run's")
    p.add_argument("--ordinal", action="store_true",
                   help="classes are ordered grades (class_names order): report quadratic kappa and "
                        "tune kappa-maximising cut points")
    p.add_argument("--match-distribution", action="store_true",
                   help="decide so that predicted class proportions match the training split's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_command(_command, parse_args, argv)


def _command(args) -> int:
    out = evaluate(args.run, args.split, tta=args.tta, ensemble=args.ensemble, ordinal=args.ordinal,
                   match_distribution=args.match_distribution, batch_size=args.batch_size)
    log.info("report: %s", out / "report.md")
    return 0


# --------------------------------------------------------------------------- data
def eval_frame(cfg, run_dir: Path):
    """The run's sample table: saved splits (minus rejected files) plus the source's
    task columns (multi-label entries are not in the split lists)."""
    from tfvision.data.sources import load_samples
    from tfvision.fileio import read_json
    from tfvision.run import read_splits

    saved = read_splits(run_dir)
    if saved is None:
        raise UserError(f"{run_dir}: no splits/*.csv; was the run trained?")
    table = load_samples(cfg.data).frame.drop_duplicates("path")
    extra = ["path"] + [c for c in table.columns if c not in saved.columns]
    frame = saved.merge(table[extra], on="path", how="inner")
    if len(frame) < len(saved):
        log.warning("%d files of the saved splits are no longer in the data source; left out",
                    len(saved) - len(frame))
    report = run_dir / "data_report.json"
    if report.is_file():
        rejected = {r["path"] for r in read_json(report)["rejected"]}
        frame = frame[~frame["path"].isin(rejected)].reset_index(drop=True)
    return frame


def unreadable(frame, channels: int) -> list[dict]:
    """``[{"path", "reason"}]`` for the scored splits' images that no longer decode.

    Files can break after training checked them (a partial copy, a disk error); evaluate
    scores the rest and names these, rather than failing after the model ran."""
    from tfvision.data.check import check_files

    scored = frame[frame["split"].isin(["val", "test"])]["path"].tolist()
    bad = check_files(scored, channels, progress=False)
    for r in bad:
        log.warning("skipped %s: %s", r["path"], r["reason"])
    return bad


def eval_inputs(cfg, task, run_dir: Path):
    """The run's data behind the `Inputs` interface, chosen as training chose it, and the
    images left out because they no longer decode."""
    if cfg.data.source == "tfrecord":
        from tfvision.data.tfrecord import RecordInputs

        return RecordInputs(cfg, task), []
    from tfvision.data.inputs import FileInputs

    frame = eval_frame(cfg, run_dir)
    skipped = unreadable(frame, cfg.data.channels)
    frame = frame[~frame["path"].isin({r["path"] for r in skipped})].reset_index(drop=True)
    return FileInputs(cfg, task, frame), skipped


def member_logits(ens, inputs, cfg, split: str, batch_size: int) -> list[np.ndarray]:
    """Logits [V, N, K] of every ensemble member on `split`, in `inputs.targets` order."""
    from tfvision.data.pipeline import PipelineSpec

    out = []
    for i, run in enumerate(ens.runs):
        spec = PipelineSpec.from_config(cfg, image_size=run.image_size)
        spec.batch_size = batch_size
        z, _ = ens.logits(i, inputs.dataset(split, spec, training=False))
        if z.shape[1] != inputs.sizes[split]:
            raise DataError(f"{split}: only {z.shape[1]} of {inputs.sizes[split]} images could be read; "
                            f"re-check the data with `python -m tfvision.train --resume RUN --check-data`")
        out.append(z)
    return out


# --------------------------------------------------------------------------- evaluate
def evaluate(run_dir, split: str = "val", tta=None, ensemble=(), ordinal: bool = False,
             match_distribution: bool = False, batch_size: int | None = None) -> Path:
    """Evaluate `run_dir` on `split`; returns the output folder ``RUN/eval/<split>``.

    >>> out = evaluate("runs/digits", "test", tta=2)
    >>> json.loads((out / "metrics.json").read_text())["accuracy"]
    0.97

    Raises:
        UserError: not a run folder, missing split, unsupported task, bad option.
    """
    from tfvision import inference
    from tfvision.eval_report import write_report
    from tfvision.fileio import write_json
    from tfvision.run import load_run_config
    from tfvision.tasks import get_task

    run_dir = Path(run_dir)
    views = inference.tta_views(tta)
    ens = inference.Ensemble([inference.load_run(run_dir)] + [inference.load_run(d) for d in ensemble], views)
    main_run = ens.main
    if main_run.task == "segmentation":
        return evaluate_segmentation(run_dir, main_run, split, batch_size)
    if main_run.task not in SCORERS:
        raise UserError(f"evaluate: task {main_run.task!r} has no evaluator yet (available: {sorted(SCORERS)}); "
                        "segmentation metrics (Dice, IoU per class) are planned")
    scorer = SCORERS[main_run.task](main_run.class_names, ordinal=ordinal, match=match_distribution)
    cfg = load_run_config(run_dir)
    task = get_task(cfg.task, cfg)
    inputs, skipped = eval_inputs(cfg, task, run_dir)
    if list(inputs.class_names) != main_run.class_names:
        raise DataError(f"{run_dir}: the data's classes {inputs.class_names[:10]} differ from run.json's "
                        f"{main_run.class_names[:10]}")
    if not inputs.sizes.get(split):
        raise UserError(f"--split {split}: {run_dir} has no {split} images"
                        + (" (set data.split.test_fraction when training)" if split == "test" else ""))
    bs = batch_size or cfg.train.batch_size
    splits = ["val"] + ([split] if split != "val" else [])
    y = {s: inputs.targets(s) for s in splits}
    z = {s: member_logits(ens, inputs, cfg, s, bs) for s in splits}

    # Calibration: the main run's temperature, for its probabilities as predict outputs them.
    temperature = fit_temperature(scorer, z["val"][0], y["val"], main_run.activation)
    temps = [temperature] + [r.temperature for r in ens.runs[1:]]
    probs = {s: ens.combine(z[s], temps) for s in splits}
    raw = {s: ens.combine(z[s], [1.0] * len(ens.runs)) for s in splits}
    calibration = {"temperature": temperature, "fitted_on": "val", "n_val": int(len(y["val"])),
                   "members_temperature": temps[1:],
                   **{s: {"before": scorer.calibration(y[s], raw[s], bins=False),
                          "after": scorer.calibration(y[s], probs[s], bins=False)} for s in splits}}

    # Decision rule: tuned on val, applied to both.
    decision = scorer.tune(y["val"], probs["val"], inputs.counts)
    decisions = {s: {"before": scorer.decision_metrics(y[s], probs[s], None),
                     "after": scorer.decision_metrics(y[s], probs[s], decision)} for s in splits}

    metrics = scorer.metrics(y[split], probs[split])
    cal = scorer.calibration(y[split], probs[split])
    metrics.update(ece=cal["ece"], mce=cal["mce"], nll=cal["nll"], reliability_bins=cal["bins"])
    members = [str(r.run_dir) for r in ens.runs]
    metrics = {"run": str(run_dir), "split": split, "n": int(len(y[split])), "task": main_run.task,
               "tta": views, "ensemble": members[1:], "skipped": skipped, **metrics,
               "calibration": calibration, "decision": {"rule": decision, **decisions}}

    out = run_dir / "eval" / split
    out.mkdir(parents=True, exist_ok=True)
    plots = scorer.plots(y[split], probs[split], raw[split], metrics, out)
    tuned = {"tuned_on": "val", "n_val": int(len(y["val"])), "tta": views, "ensemble": members[1:]}
    write_json(run_dir / "calibration.json", {
        "temperature": temperature, "activation": main_run.activation, **tuned,
        "nll_before": calibration["val"]["before"]["nll"], "nll_after": calibration["val"]["after"]["nll"],
        "ece_before": calibration["val"]["before"]["ece"], "ece_after": calibration["val"]["after"]["ece"]})
    write_json(run_dir / "thresholds.json", {**decision, **tuned})
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.md", run_dir, cfg, inputs, main_run, metrics, plots, split)
    log.info("%s (%d images): %s; temperature %.3f", split, metrics["n"], scorer.headline(metrics), temperature)
    return out


def evaluate_segmentation(run_dir: Path, run, split: str, batch_size: int | None) -> Path:
    """Per-class Dice and IoU on `split`, accumulated batch by batch (the task's own scorer)."""
    from tfvision.data.pipeline import PipelineSpec
    from tfvision.fileio import write_json, write_text
    from tfvision.run import load_run_config
    from tfvision.tasks import get_task

    cfg = load_run_config(run_dir)
    if cfg.task != "segmentation":
        raise UserError(f"{run_dir}: run.json says task 'segmentation' but config.json says {cfg.task!r}")
    task = get_task(cfg.task, cfg)
    task.output_names = ["logits"]  # score the main output; aux heads are training-only
    inputs, skipped = eval_inputs(cfg, task, run_dir)
    if not inputs.sizes.get(split):
        raise UserError(f"--split {split}: {run_dir} has no {split} slices")
    spec = PipelineSpec.from_config(cfg)
    spec.batch_size = batch_size or cfg.train.batch_size
    scores = task.score(run.model, inputs.dataset(split, spec, training=False, format_batch=task.format_batch),
                        inputs, split)
    out = run_dir / "eval" / split
    metrics = {"run": str(run_dir), "split": split, "n": int(inputs.sizes[split]), "task": "segmentation",
               "skipped": skipped, **scores}
    write_json(out / "metrics.json", metrics)
    rows = ["| class | Dice | IoU |", "|---|---|---|"] + [
        f"| {c} | {_fmt(scores['dice_per_class'][c])} | {_fmt(scores['iou_per_class'][c])} |"
        for c in inputs.class_names]
    write_text(out / "report.md", "\n".join([
        f"# Segmentation evaluation: {run_dir.name}, {split} ({metrics['n']} slices)", "",
        f"Macro Dice {_fmt(scores['dice_macro'])}, macro IoU {_fmt(scores['iou_macro'])} "
        "(classes absent from both truth and prediction are left out of the means).", "", *rows, ""]))
    log.info("%s (%d slices): dice_macro=%s iou_macro=%s", split, metrics["n"], _fmt(scores["dice_macro"]),
             _fmt(scores["iou_macro"]))
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def fit_temperature(scorer, logits: np.ndarray, y, activation: str, bounds=(0.01, 100.0)) -> float:
    """Temperature minimising the val NLL of ``mean_v activation(logits_v / T)``.

    One view: exactly `metrics.fit_temperature` (softmax; the [0, z] form for sigmoid).
    Several TTA views: the same bounded search over log T, on the averaged probabilities
    that predict outputs, since a T fitted per view leaves the average under-confident.
    """
    from scipy import optimize

    from tfvision.inference import activate

    if logits.shape[0] == 1:
        return scorer.fit_temperature(logits[0], y)

    def nll(log_t: float) -> float:
        return scorer.calibration(y, activate(logits, activation, float(np.exp(log_t))).mean(axis=0),
                                  bins=False)["nll"]

    res = optimize.minimize_scalar(nll, bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x)) if np.isfinite(res.fun) and res.fun <= nll(0.0) else 1.0


# --------------------------------------------------------------------------- scorers
def _nll_single(y, p) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


class SingleLabel:
    """Multi-class (softmax): one class per image; targets arrive one-hot."""

    def __init__(self, class_names, ordinal=False, match=False):
        self.names, self.ordinal, self.match = list(class_names), ordinal, match

    @staticmethod
    def _idx(y):
        return np.asarray(y).argmax(axis=1)

    def fit_temperature(self, logits, y) -> float:
        from tfvision import metrics as M

        return M.fit_temperature(logits, self._idx(y))

    def calibration(self, y, probs, bins=True) -> dict:
        from tfvision import metrics as M

        yi = self._idx(y)
        c = M.calibration(yi, probs, n_bins=15)
        c["nll"] = _nll_single(yi, probs)
        if not bins:
            c.pop("bins")
        return c

    def metrics(self, y, probs) -> dict:
        from tfvision import metrics as M

        m = M.multiclass_metrics(self._idx(y), probs, self.names, ordinal=self.ordinal)
        m["worst_confused"] = worst_confused(m["confusion_matrix"], self.names)
        return m

    def tune(self, y, probs, train_counts) -> dict:
        from tfvision import metrics as M

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
        from tfvision import metrics as M
        from tfvision.inference import decide

        pred = decide(probs, "softmax", decision)
        m = M.multiclass_metrics(self._idx(y), np.eye(len(self.names))[pred], self.names, ordinal=True)
        keys = ["accuracy", "balanced_accuracy", "macro_f1"] + (["quadratic_kappa"] if self.ordinal else [])
        return {k: m[k] for k in keys}

    def headline(self, m) -> str:
        keys = ["accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "ece"]
        return ", ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None)

    def plots(self, y, probs, raw, metrics, out: Path) -> list[tuple[str, str]]:
        from tfvision import metrics as M
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


class MultiLabel:
    """Multi-label (sigmoid): K independent labels; -1 marks an unknown truth, never a negative.

    Calibration treats every known (image, label) entry as one binary prediction.
    """

    def __init__(self, class_names, ordinal=False, match=False):
        if ordinal or match:
            raise UserError("--ordinal and --match-distribution apply to single-label runs; "
                            "a multilabel run gets per-class F1 thresholds")
        self.names = list(class_names)

    @staticmethod
    def _binary(y, values):
        """Known entries only, flattened: (labels [M], values [M])."""
        y = np.asarray(y)
        known = y != -1
        return y[known].astype(np.int64), np.asarray(values)[known]

    def fit_temperature(self, logits, y) -> float:
        from tfvision import metrics as M

        yk, zk = self._binary(y, logits)
        z2 = np.stack([np.zeros(zk.size), zk], axis=1)  # softmax([0, z]) = [1 - s(z), s(z)]
        return M.fit_temperature(z2, yk)

    def calibration(self, y, probs, bins=True) -> dict:
        from tfvision import metrics as M

        yk, pk = self._binary(y, probs)
        c = M.calibration(yk, np.stack([1 - pk, pk], axis=1), n_bins=15)
        c["nll"] = _nll_single(yk, np.stack([1 - pk, pk], axis=1))
        if not bins:
            c.pop("bins")
        return c

    def metrics(self, y, probs) -> dict:
        from tfvision import metrics as M

        return M.multilabel_metrics(y, probs, self.names)

    def tune(self, y, probs, train_counts) -> dict:
        from tfvision import metrics as M

        return {"kind": "multilabel", "method": "f1", "thresholds": M.tune_f1_thresholds(y, probs).tolist()}

    def decision_metrics(self, y, probs, decision) -> dict:
        from tfvision import metrics as M

        th = None if decision is None else decision["thresholds"]
        m = M.multilabel_metrics(y, probs, self.names, thresholds=th)
        return {k: m[k] for k in ("macro_f1", "macro_precision", "macro_recall")}

    def headline(self, m) -> str:
        keys = ["roc_auc_macro", "pr_auc_macro", "macro_f1", "ece"]
        return ", ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None)

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


SCORERS = {"classification": SingleLabel, "multilabel": MultiLabel}


def worst_confused(cm, class_names, top: int = 5) -> list[dict]:
    """The largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    cm = np.asarray(cm)
    off = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j]]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": class_names[i], "pred": class_names[j], "count": c, "rate": c / int(cm[i].sum())}
            for c, i, j in off[:top]]


if __name__ == "__main__":
    sys.exit(main())
