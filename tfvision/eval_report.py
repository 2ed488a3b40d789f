"""``eval/<split>/report.md``: what `tfvision.evaluate` found, for a person to read.

Sections: data, config, metrics tables, plots (embedded PNGs next to the
report), worst-confused classes, calibration and decision-rule decisions with
their before/after numbers. Everything comes from the metrics dict already
written to metrics.json; nothing is recomputed here.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfvision.fileio import read_json, write_text


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]
    return out + [""]


def _data(run_dir: Path, inputs, split: str, metrics: dict) -> list[str]:
    lines = ["## Data", ""]
    sizes = [[s, inputs.sizes.get(s, 0)] for s in ("train", "val", "test")]
    lines += _table(["split", "images"], sizes)
    per_class = metrics.get("per_class", {})
    if per_class:
        lines += [f"Positives (support) per class in `{split}`:", ""]
        lines += _table(["class", "support"], [[c, v.get("support")] for c, v in per_class.items()])
    report = run_dir / "data_report.json"
    if report.is_file():
        rejected = read_json(report).get("rejected", [])
        lines += [f"{len(rejected)} file(s) were rejected as unreadable before training"
                  + (" (see `data_report.json`)." if rejected else "."), ""]
    return lines


def _config(cfg, run) -> list[str]:
    c = cfg.to_dict()
    t, m, d = c["train"], c["model"], c["data"]
    epochs = sum(p["epochs"] for p in t["phases"]) if t["phases"] else t["epochs"]
    rows = [
        ["task", f"{c['task']} ({run.task.activation})"], ["backbone", m["backbone"]], ["weights", json.dumps(m["weights"])],
        ["head", json.dumps(m["head"])], ["image size", run.image_size], ["channels", run.channels],
        ["normalization", d["normalization"]], ["epochs", epochs], ["batch size", t["batch_size"]],
        ["optimizer", f"{t['optimizer']['name']} lr={t['optimizer']['lr']}"],
        ["schedule", t["schedule"]["name"]], ["loss", json.dumps(t["loss"])],
        ["mixed precision", t["mixed_precision"]],
    ]
    full = json.dumps(c, indent=2, default=str)
    return (["## Config", ""] + _table(["key", "value"], rows)
            + ["<details><summary>config.json</summary>", "", "```json", full, "```", "", "</details>", ""])


_PER_CLASS = ["precision", "recall", "f1", "support", "roc_auc", "pr_auc"]


def _metrics(metrics: dict, scorer) -> list[str]:
    lines = ["## Metrics", "", scorer.about + " The tuned rule is under *Decision rule*.", ""]
    lines += _table(["metric", "value"], [[k, metrics[k]] for k in scorer.summary if k in metrics])
    per_class = metrics.get("per_class", {})
    if per_class:
        lines += ["### Per class", ""]
        lines += _table(["class"] + _PER_CLASS, [[c] + [v.get(k) for k in _PER_CLASS] for c, v in per_class.items()])
    return lines


def _confused(metrics: dict) -> list[str]:
    pairs = metrics.get("worst_confused")
    if pairs is None:
        return []
    lines = ["## Worst-confused classes", ""]
    if not pairs:
        return lines + ["No confusions: every image was classified correctly.", ""]
    return lines + _table(["true", "predicted as", "images", "share of true class"],
                          [[p["true"], p["pred"], p["count"], p["rate"]] for p in pairs])


def _calibration(metrics: dict) -> list[str]:
    cal = metrics["calibration"]
    if cal["val"]["before"]["nll"] is None:  # the task's outputs are not probabilities (regression)
        return []
    t = cal["temperature"]
    verdict = ("over-confident: probabilities are softened" if t > 1.05 else
               "under-confident: probabilities are sharpened" if t < 0.95 else "already close to calibrated")
    lines = ["## Calibration", "",
             f"Temperature **T = {t:.4f}**, fitted on the val split ({cal['n_val']} images) by minimising "
             f"the negative log-likelihood: the model was {verdict}. Saved in `calibration.json`; "
             "`tfvision.predict` divides the logits by T.", ""]
    rows = []
    for split in (s for s in ("val", "test") if s in cal):
        b, a = cal[split]["before"], cal[split]["after"]
        rows.append([split, b["nll"], a["nll"], b["ece"], a["ece"], b["mce"], a["mce"]])
    lines += _table(["split", "NLL before", "NLL after", "ECE before", "ECE after", "MCE before", "MCE after"], rows)
    if cal.get("members_temperature"):
        lines += [f"Other ensemble members keep their own saved temperatures: {cal['members_temperature']}.", ""]
    return lines + ["ECE and MCE use 15 equal-width confidence bins.", ""]


def _decision(metrics: dict, describe) -> list[str]:
    dec = metrics["decision"]
    rule = dec["rule"]
    text = describe(rule)
    lines = ["## Decision rule", "", f"Tuned on val only, saved in `thresholds.json`, applied by "
             f"`tfvision.predict`: {text}", ""]
    if "rejected" in rule:
        r = rule["rejected"]
        lines += [f"The kappa-maximising cut points ({', '.join(f'{c:.3f}' for c in r['cuts'])}) reached a val "
                  f"quadratic kappa of {_f(r['val_quadratic_kappa'])}, not above argmax's "
                  f"{_f(rule['val_quadratic_kappa'])}: argmax is kept.", ""]
    rows = []
    for split in (s for s in ("val", "test") if s in dec):
        for k, before in dec[split]["before"].items():
            rows.append([split, k, before, dec[split]["after"][k]])
    return lines + _table(["split", "metric", "before (default)", "after (tuned)"], rows)


def write_report(path: Path, run_dir: Path, cfg, inputs, run, metrics: dict, plots: list, split: str,
                 scorer) -> None:
    """Write the markdown report next to the PNGs it embeds; `scorer` (the task's) words its rule."""
    lines = [f"# Evaluation of `{run_dir.name}` on {split}", "",
             f"{metrics['n']} images, task {metrics['task']}, checkpoint `checkpoints/best.keras`, "
             f"TTA views: {', '.join(metrics['tta'])}"
             + (f"; ensemble with {', '.join(metrics['ensemble'])}" if metrics["ensemble"] else "") + ".", ""]
    if metrics["ensemble"] and split == "val":
        lines += ["> Ensemble members evaluated on this run's val split: for K folds, each member "
                  "trained on part of it, so these numbers are optimistic. Prefer `--split test`.", ""]
    lines += _data(run_dir, inputs, split, metrics) + _config(cfg, run) + _metrics(metrics, scorer)
    lines += ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for title, name in plots]
    lines += _confused(metrics) + _calibration(metrics) + _decision(metrics, scorer.describe_rule)
    if (run_dir / "training_curves.png").is_file():
        lines += ["## Training curves", "", "![training curves](../../training_curves.png)", ""]
    write_text(path, "\n".join(lines))
