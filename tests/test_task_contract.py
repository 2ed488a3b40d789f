"""The Task contract: every registered task runs through every generic command.

Each task in `tfvision.tasks.TASKS` (evaluated at collection, so a new task joins
automatically) gets a tiny real dataset and goes through the real CLI, one
subprocess per command: ``train -> evaluate -> predict -> export --verify``.
The expected outputs are derived from the task's own hooks (its scorer, its
`summarize`, its `Output`), not from a table per task name, so a hook that
breaks or stops agreeing with the generic commands fails here.

Data: scikit-learn's digits (classification; regression with the digit as the
grade; multilabel "even"/"small" with uncertain and blank entries) and
nilearn's MNI152 template as NIfTI volumes (segmentation, `tests.layouts`).

The four CLI runs take a few minutes on two cores, so they are marked
``configs`` (``pytest -m configs``); the contract checks without a CLI run in
the fast suite.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests import layouts
from tests.conftest import run_cli
from tfvision.config_loader import config_from_dict
from tfvision.tasks import get_task, task_names
from tfvision.tasks.outputs import Output

TASKS = task_names()  # at collection: a newly registered task gets its own parameters

IMAGES = 200  # training images of the per-image tasks
TRAIN = {"epochs": 1, "batch_size": 16, "steps_per_epoch": 4, "tensorboard": False,
         "optimizer": {"lr": 0.003}, "schedule": {"name": "constant"}}
COMMON_EVAL = {"run", "split", "n", "task", "skipped"}  # what evaluate writes for every task


# --------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    """How one task runs on tiny data. `config(root)` only names files under `root` (so the fast
    test can validate it against empty files); `make_data(base, digits_root)` writes the data and
    returns its `layouts.Layout` (root, and what predict gets: an image folder or a volume)."""

    config: Callable[[Path], dict]
    make_data: Callable[[Path, Callable[[], Path]], layouts.Layout]


def _digits(digits_root: Path, rows: slice = slice(0, IMAGES), max_digit: int = 4) -> pd.DataFrame:
    frame = pd.read_csv(digits_root / "digits.csv")
    frame = frame[frame["label"] <= max_digit].iloc[rows].reset_index(drop=True)
    frame["path"] = [str(digits_root / p) for p in frame["path"]]
    return frame


def _to_predict(base: Path, digits_root: Path) -> Path:
    """Unseen digits (any value) plus one file that is not an image: predict must still answer."""
    folder = base / "to_predict"
    folder.mkdir()
    for p in _digits(digits_root, slice(1000, 1006), max_digit=9)["path"]:
        shutil.copy(p, folder / Path(p).name)
    (folder / "broken.png").write_bytes(b"this is not an image")
    return folder


def _image_config(task: str, root: Path, csv: str, **data) -> dict:
    return {"task": task, "seed": 0,
            "data": {"source": "csv", "root": str(root), "csv": csv, "image_size": 32, "channels": 1,
                     "normalization": "none", **data},
            "model": {"backbone": "small_cnn", "weights": None}, "augment": {"enabled": False},
            "train": dict(TRAIN)}


def _classification_data(base, digits):
    root = base / "classification"
    root.mkdir()
    _digits(digits())[["path", "label"]].to_csv(root / "digits.csv", index=False)
    return layouts.Layout(root, _to_predict(base, digits()))


def _regression_data(base, digits):
    root = base / "regression"
    root.mkdir()
    frame = _digits(digits())
    pd.DataFrame({"path": frame["path"], "grade": frame["label"]}).to_csv(root / "grades.csv", index=False)
    return layouts.Layout(root, _to_predict(base, digits()))


def _multilabel_data(base, digits):
    root = base / "multilabel"
    root.mkdir()
    frame = _digits(digits(), max_digit=9)
    rng = np.random.default_rng(0)
    out = pd.DataFrame({"path": frame["path"]})
    for name, value in (("even", frame["label"] % 2 == 0), ("small", frame["label"] < 5)):
        col = np.where(value, "1", "0").astype(object)
        col[rng.random(len(col)) < 0.1] = "-1"  # uncertain
        col[rng.random(len(col)) < 0.05] = ""  # blank
        out[name] = col
    out.to_csv(root / "multi.csv", index=False)
    return layouts.Layout(root, _to_predict(base, digits()))


def _segmentation_data(base, digits):
    # Three NIfTI "patients" of 12 axial slices each: whole-volume predict needs a volumes run.
    return layouts.mni_volumes(base, n_patients=3, z=(30, 42))


def _instance_data(base, digits):
    layout = layouts.sartorius(base, n_images=16)
    folder = base / "to_predict"
    shutil.copytree(layout.predict_input, folder)
    (folder / "broken.png").write_bytes(b"this is not an image")
    return layouts.Layout(layout.root, folder)


# A Mask R-CNN at a CPU-test size: P2-P4, narrow heads, few samples (tests/test_maskrcnn_model.py's TINY).
TINY_MASKRCNN = {"max_level": 4, "fpn_filters": 16, "box_fc_dims": 32, "mask_filters": 16, "mask_convs": 2,
                 "rpn_samples": 64, "roi_samples": 32, "max_mask_rois": 8, "rpn_pre_nms_top_k_train": 200,
                 "rpn_post_nms_top_k_train": 100, "rpn_pre_nms_top_k_test": 200, "rpn_post_nms_top_k_test": 100}

CASES: dict[str, Case] = {
    "classification": Case(lambda root: _image_config("classification", root, "digits.csv"), _classification_data),
    "regression": Case(lambda root: _image_config("regression", root, "grades.csv", label_column="grade"),
                       _regression_data),
    "multilabel": Case(lambda root: _image_config("multilabel", root, "multi.csv", label_columns=["even", "small"]),
                       _multilabel_data),
    "segmentation": Case(lambda root: {
        "task": "segmentation", "seed": 0,
        "data": {"source": "volumes", "root": str(root), "csv": "volumes.csv", "path_column": "image",
                 "mask_column": "mask", "group_column": "patient", "class_names": ["background", "brain"],
                 "windows": ["minmax"], "channels": 1, "image_size": 32, "empty_slices": "drop",
                 "normalization": "none", "split": {"method": "grouped", "val_fraction": 0.34}},
        "model": {"backbone": "unet", "weights": None,
                  "unet": {"base_filters": 4, "depth": 2, "upsampling": "bilinear", "norm": "group", "groups": 2}},
        "augment": {"enabled": False},
        "train": {**TRAIN, "batch_size": 8, "steps_per_epoch": 3}}, _segmentation_data),
    "instance_segmentation": Case(lambda root: {
        "task": "instance_segmentation", "seed": 0,
        "data": {"source": "sartorius", "root": str(root), "csv": "train.csv", "label_column": "cell_type",
                 "image_size": [64, 96], "split": {"method": "random", "val_fraction": 0.25}},
        "model": {"backbone": "small_cnn", "weights": None},
        "augment": {"enabled": False},
        "instance_segmentation": {"max_instances": 6, "max_detections": 10, "maskrcnn": TINY_MASKRCNN},
        "train": {**TRAIN, "batch_size": 4, "steps_per_epoch": 3}}, _instance_data),
}


# --------------------------------------------------------------------------- fast: the contract itself


def test_every_task_has_a_case():
    assert TASKS, "no task is registered"
    missing = sorted(set(TASKS) - set(CASES))
    assert not missing, f"registered task(s) without a contract case in tests/test_task_contract.py: {missing}"


@pytest.mark.parametrize("name", TASKS)
def test_task_defines_the_contract(name, tmp_path):
    task = get_task(name)
    assert task.name == name
    assert task.options is None or (isinstance(task.options, type) and dataclasses.is_dataclass(task.options))
    assert task.losses and all(isinstance(x, str) for x in task.losses)
    assert task.sources and all(isinstance(x, str) for x in task.sources)
    assert isinstance(task.output, Output)
    for hook in ("activate", "decide", "rule", "serve"):
        assert callable(getattr(task.output, hook, None)), f"{name}: output has no {hook}()"
    assert task.label_layout in ("index", "multi_hot", None)
    assert isinstance(task.dense, bool)
    rules = type(task).schema_rules()
    assert rules["properties"]["data"]["properties"]["source"]["enum"] == list(task.sources)

    # A minimal valid config (the CLI case's, over empty files) passes the loader and check_config.
    case = CASES.get(name)
    if case is None:
        pytest.fail(f"task {name!r} has no case in CASES")
    root = tmp_path / "data"
    root.mkdir()
    raw = case.config(root)
    (root / raw["data"]["csv"]).write_text("")
    cfg = config_from_dict(raw)
    assert cfg.task == name
    assert cfg.train.loss.name in task.losses  # the loader fills the task's default loss
    assert (cfg.task_options is None) == (task.options is None)
    configured = get_task(name, cfg)
    configured.check_config(cfg)  # idempotent on a config it already accepted
    assert cfg.data.source in task.sources
    names = ["a", "b", "c"]
    scorer = task.scorer(names)
    assert scorer is None or callable(getattr(scorer, "metrics", None))
    assert isinstance(task.output.rule(None, names), dict)


# --------------------------------------------------------------------------- the CLI, per task


def _cli(*args) -> None:
    r = run_cli(*args, timeout=600)
    assert r.returncode == 0, f"{' '.join(map(str, args[:2]))} exited {r.returncode}:\n{r.stderr[-3000:]}"


def _load(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


@pytest.mark.configs
@pytest.mark.parametrize("name", TASKS)
def test_task_runs_train_evaluate_predict_export(name, tmp_path, request):
    case = CASES.get(name)
    if case is None:
        pytest.fail(f"task {name!r} has no case in CASES")
    layout = case.make_data(tmp_path, lambda: request.getfixturevalue("digits_root"))
    cfg_path = tmp_path / f"{name}.json"
    cfg_path.write_text(json.dumps(case.config(layout.root)))
    run = tmp_path / "run"
    task = get_task(name)

    # ---- train
    _cli("-m", "tfvision.train", "--config", str(cfg_path), "--output-dir", str(run), "--quiet")
    info = _load(run / "run.json")
    names = info["class_names"]
    assert info["task"] == name and info["activation"] == task.activation
    trained = _load(run / "metrics.json")
    assert trained["n_val"] > 0

    # ---- evaluate
    _cli("-m", "tfvision.evaluate", "--run", str(run))
    scores = _load(run / "eval" / "val" / "metrics.json")
    assert (run / "eval" / "val" / "report.md").is_file()
    assert COMMON_EVAL <= set(scores) and scores["task"] == name and scores["n"] == trained["n_val"]
    scorer = task.scorer(names)
    assert (run / "thresholds.json").is_file() == (scorer is not None)
    if scorer is None:
        # Scored by `score` alone: training's summary and evaluate's are the same hook on the same data.
        assert set(trained) - {"n_val", "checkpoint"} == {f"val_{k}" for k in set(scores) - COMMON_EVAL}
        assert task.report_lines({k: scores[k] for k in set(scores) - COMMON_EVAL}, names)
    else:
        _check_scored(task, scorer, run, names, trained, scores)

    # ---- predict
    out = tmp_path / ("pred.nii.gz" if task.dense else "pred.csv")
    if task.dense:
        _cli("-m", "tfvision.predict", "--run", str(run), "--volume", str(layout.predict_input), "--output", str(out))
        _check_volume(layout.predict_input, out, len(names))
    else:
        _cli("-m", "tfvision.predict", "--run", str(run), "--input-dir", str(layout.predict_input),
             "--output", str(out))
        if task.predict_table is not None:
            _check_instance_table(layout.predict_input, out, names)
        else:
            decision = json.loads((run / "thresholds.json").read_text()) if scorer is not None else None
            _check_predictions(task, layout.predict_input, out, names, decision)

    # ---- export
    exported = tmp_path / "export"
    export = ("-m", "tfvision.export", "--run", str(run), "--format", "all", "--verify", "--output", str(exported),
              "--n-images", "8")
    _cli(*export)
    report = _load(exported / "export_report.json")
    assert report["verified"] and report["images"], report
    failed = [e for e in report["exports"] if not e["passed"]]
    assert report["passed"] and report["exports"] and not failed, failed or report
    # A format the task's graph cannot be converted to is left out with its reason, never silently.
    assert {e["format"] for e in report["exports"]} | {x["format"] for x in report["not_exported"]} == {
        "savedmodel", "onnx", "tflite"}
    assert {x["format"]: x["reason"] for x in report["not_exported"]} == task.unsupported_formats
    for fmt, reason in task.unsupported_formats.items():  # asked for by name: refused, with the reason
        r = run_cli(*export[:5], fmt, "--output", str(tmp_path / fmt), timeout=600)
        assert r.returncode == 2 and reason in r.stderr and not (tmp_path / fmt).exists(), r.stderr[-2000:]


def _val_data(task, run: Path, names: list[str]):
    """The run's val targets through the task's own hooks, and logits of the model's output shape."""
    from tfvision import inference
    from tfvision.run import load_run_config, read_splits

    frame = read_splits(run)
    val = frame[frame["split"] == "val"].reset_index(drop=True)
    configured = get_task(task.name, load_run_config(run))
    targets = configured.targets(val, names)[0]
    outputs = inference.load_run(run).model.output_shape[-1]
    logits = np.random.default_rng(0).normal(size=(len(val), outputs))
    return configured, targets, configured.eval_targets(val, names), logits


def _check_scored(task, scorer, run, names, trained, scores):
    configured, targets, y, logits = _val_data(task, run, names)
    # Training's metrics.json: the task's `summarize`, prefixed.
    summary = configured.summarize(targets, logits, names)
    assert set(trained) == {f"val_{k}" for k in summary} | {"n_val", "checkpoint"}, sorted(trained)
    # evaluate's: the scorer's metrics, calibration figures and the tuned rule before/after.
    probs = configured.output.activate(logits)
    expected = set(scorer.metrics(y, probs)) | {"ece", "mce", "nll", "calibration", "decision"}
    assert expected <= set(scores), sorted(expected - set(scores))
    decision_keys = set(scorer.decision_metrics(y, probs, None))
    for when in ("before", "after"):  # per split scored: val, where the rule was tuned
        assert set(scores["decision"]["val"][when]) == decision_keys, scores["decision"]
    rule = _load(run / "thresholds.json")
    assert rule["kind"] == scores["decision"]["rule"]["kind"]
    assert isinstance(configured.output.rule(rule, names), dict)  # what export builds the graph with
    assert _load(run / "calibration.json")["activation"] == task.activation


def _check_predictions(task, folder: Path, out: Path, names: list[str], decision: dict | None):
    pred = pd.read_csv(out, dtype=str, keep_default_na=False)
    images = sorted(p.name for p in folder.iterdir())
    assert sorted(Path(p).name for p in pred["path"]) == images  # one row per input image
    broken = pred["path"].map(lambda p: Path(p).name == "broken.png").to_numpy()
    assert (pred["error"][broken] != "").all() and (pred["pred"][broken] == "").all()
    readable = pred[~broken].reset_index(drop=True)
    assert (readable["error"] == "").all(), readable["error"].tolist()
    # The float columns are the task's `Output.columns`, and `pred` is its decision on them.
    columns = [c for c in pred.columns if c not in ("path", "pred", "error")]
    probs = readable[columns].to_numpy(np.float64)
    assert np.isfinite(probs).all()
    assert list(task.output.columns(probs, names)) == columns
    decided = task.output.decide(probs, decision, names)
    expected = [task.output.label(d, names) for d in decided]
    assert readable["pred"].tolist() == expected
    if task.label_layout != "multi_hot":  # a multi-hot answer may rightly be empty: no label over its threshold
        assert (readable["pred"] != "").all(), readable["pred"].tolist()


def _check_instance_table(folder: Path, out: Path, names: list[str]):
    """One row per detected instance, or one empty row per image without any; masks decode at the
    image's own size; the broken file has its error."""
    from PIL import Image

    from tfvision.data import rle

    pred = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(pred.columns[:3]) == ["id", "predicted", "path"], pred.columns.tolist()
    assert sorted({Path(p).name for p in pred["path"]}) == sorted(p.name for p in folder.iterdir())
    broken = pred["path"].map(lambda p: Path(p).name == "broken.png").to_numpy()
    assert (pred["error"][broken] != "").all() and (pred["error"][~broken] == "").all()
    for _, row in pred[~broken & (pred["predicted"] != "")].iterrows():
        with Image.open(row["path"]) as im:
            mask = rle.decode(row["predicted"], (im.height, im.width), order="C")
        assert mask.any() and row["class"] in names and 0 <= float(row["score"]) <= 1


def _check_volume(volume: Path, out: Path, k: int):
    import nibabel as nib

    assert out.is_file(), f"{out} was not written"
    src, got = nib.load(volume), nib.load(out)
    assert got.shape == src.shape
    np.testing.assert_allclose(got.affine, src.affine)
    labels = np.unique(np.asarray(got.dataobj))
    assert set(labels.tolist()) <= set(range(k)), labels
