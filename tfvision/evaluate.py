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

Tasks plug in through `Task.scorer` (`tfvision.tasks.scoring.Scorer`); a task
without one (segmentation) is scored by its own `Task.score`, batch by batch.

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
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run folder, or its gs:// URL")
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
    from tfvision.backend import use_tensorflow

    use_tensorflow("evaluate")  # before Keras is imported
    from tfvision import remote
    from tfvision.run import local_run, local_runs

    # A gs:// run is evaluated on a local copy; its eval/ folder and calibration go back there.
    with local_run(args.run, publish=True) as run_dir, local_runs(args.ensemble) as ensemble:
        out = evaluate(run_dir, args.split, tta=args.tta, ensemble=ensemble, ordinal=args.ordinal,
                       match_distribution=args.match_distribution, batch_size=args.batch_size)
        report = remote.join(args.run, *(out / "report.md").relative_to(run_dir).parts)
    log.info("report: %s", report)
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
    cfg = load_run_config(run_dir)
    if cfg.task != main_run.task_name:
        raise UserError(f"{run_dir}: run.json says task {main_run.task_name!r} but config.json says {cfg.task!r}")
    task = get_task(cfg.task, cfg)
    scorer = task.scorer(main_run.class_names, ordinal=ordinal, match=match_distribution)
    if scorer is None:  # scored batch by batch (e.g. per-pixel tasks): no calibration or tuned rule
        return evaluate_streamed(run_dir, main_run, cfg, task, split, batch_size)
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
    temperature = fit_temperature(scorer, z["val"][0], y["val"])
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
    metrics = {"run": str(run_dir), "split": split, "n": int(len(y[split])), "task": main_run.task_name,
               "tta": views, "ensemble": members[1:], "skipped": skipped, **metrics,
               "calibration": calibration, "decision": {"rule": decision, **decisions}}

    out = run_dir / "eval" / split
    out.mkdir(parents=True, exist_ok=True)
    plots = scorer.plots(y[split], probs[split], raw[split], metrics, out)
    tuned = {"tuned_on": "val", "n_val": int(len(y["val"])), "tta": views, "ensemble": members[1:]}
    write_json(run_dir / "calibration.json", {
        "temperature": temperature, "activation": task.activation, **tuned,
        "nll_before": calibration["val"]["before"]["nll"], "nll_after": calibration["val"]["after"]["nll"],
        "ece_before": calibration["val"]["before"]["ece"], "ece_after": calibration["val"]["after"]["ece"]})
    write_json(run_dir / "thresholds.json", {**decision, **tuned})
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.md", run_dir, cfg, inputs, main_run, metrics, plots, split, scorer)
    log.info("%s (%d images): %s; temperature %.3f", split, metrics["n"], scorer.headline(metrics), temperature)
    return out


def evaluate_streamed(run_dir: Path, run, cfg, task, split: str, batch_size: int | None) -> Path:
    """Score `split` with the task's own `score`, accumulated batch by batch, so that no full-split
    tensor of per-pixel outputs is ever held; metrics.json and the task's report.md."""
    from tfvision.data.pipeline import PipelineSpec
    from tfvision.fileio import write_json, write_text

    inputs, skipped = eval_inputs(cfg, task, run_dir)
    if not inputs.sizes.get(split):
        raise UserError(f"--split {split}: {run_dir} has no {split} images")
    spec = PipelineSpec.from_config(cfg)
    spec.batch_size = batch_size or cfg.train.batch_size
    scores = task.score(run.model, inputs.dataset(split, spec, training=False, format_batch=task.format_batch),
                        inputs, split)
    out = run_dir / "eval" / split
    metrics = {"run": str(run_dir), "split": split, "n": int(inputs.sizes[split]), "task": task.name,
               "skipped": skipped, **scores}
    write_json(out / "metrics.json", metrics)
    figures = task.report_figures(run.model, inputs.dataset(split, spec, training=False,
                                                            format_batch=task.format_batch),
                                  inputs.class_names, out)
    write_text(out / "report.md", "\n".join([
        f"# Evaluation: {run_dir.name}, {split} ({metrics['n']} images, task {task.name})", "",
        *task.report_lines(scores, inputs.class_names), "",
        *(f"## {title}\n\n![{title}]({Path(name).name})\n" for title, name in figures)]))
    log.info("%s (%d images): %s", split, metrics["n"], task.headline(scores))
    return out


def fit_temperature(scorer, logits: np.ndarray, y, bounds=(0.01, 100.0)) -> float:
    """Temperature minimising the val NLL of ``mean_v activate(logits_v / T)``.

    One view: exactly the scorer's own fit (`metrics.fit_temperature`). Several TTA views: the
    same bounded search over log T, on the averaged probabilities that predict outputs, since a T
    fitted per view leaves the average under-confident. A task with no NLL keeps T = 1.
    """
    from scipy import optimize

    if logits.shape[0] == 1:
        return scorer.fit_temperature(logits[0], y)

    def nll(log_t: float) -> float:
        return scorer.calibration(y, scorer.output.activate(logits, float(np.exp(log_t))).mean(axis=0),
                                  bins=False)["nll"]

    if nll(0.0) is None:
        return 1.0
    res = optimize.minimize_scalar(nll, bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x)) if np.isfinite(res.fun) and res.fun <= nll(0.0) else 1.0


if __name__ == "__main__":
    sys.exit(main())
