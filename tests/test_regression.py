"""Ordinal regression (`task: "regression"`): grades, CORAL, cut points, against scikit-learn.

The learning test grades real images: scikit-learn's digits 0-4, the digit's value as the grade.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score, mean_absolute_error, mean_squared_error

from tests.conftest import run_cli
from tfvision.config_loader import config_from_dict
from tfvision.errors import ConfigError
from tfvision.tasks import get_task
from tfvision.tasks.regression import GradeOutput, default_cuts, grade_metrics

K = 5


def _grades(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    return y, y + rng.normal(0, 0.8, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grade_metrics_match_scikit_learn(seed):
    y, score = _grades(seed)
    cuts = np.sort(np.random.default_rng(seed + 10).uniform(0, K - 1, K - 1))
    for c in (None, cuts):
        m = grade_metrics(y, score, K, c)
        pred = np.digitize(score, default_cuts(K) if c is None else c)
        assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-9)
        assert m["accuracy"] == pytest.approx(np.mean(pred == y), abs=1e-12)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, score), abs=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, score)), abs=1e-12)


def test_scorer_tunes_cut_points_that_do_not_lose_kappa():
    y, score = _grades(3)
    score = 0.7 * score + 0.4  # a biased, shrunk score: rounding is not the best rule
    scorer = get_task("regression").scorer([str(g) for g in range(K)])
    onehot = np.eye(K)[y]
    rule = scorer.tune(onehot, score[:, None], None)
    assert rule["kind"] == "cuts" and len(rule["cuts"]) == K - 1 and np.all(np.diff(rule["cuts"]) > 0)
    tuned, plain = (scorer.decision_metrics(onehot, score[:, None], r)["quadratic_kappa"] for r in (rule, None))
    assert tuned > plain
    assert tuned == pytest.approx(cohen_kappa_score(y, np.digitize(score, rule["cuts"]), weights="quadratic"),
                                  abs=1e-9)


def _task(mode: str):
    cfg = config_from_dict({"task": "regression", "regression": {"mode": mode},
                            "data": {"source": "csv", "prepare": "sklearn_digits", "csv": "digits.csv"},
                            "model": {"backbone": "small_cnn", "weights": None}})
    return get_task("regression", cfg)


@pytest.mark.parametrize("mode", ["regression", "coral"])
def test_format_batch_gives_the_grade_or_its_cumulative_targets(mode):
    grade = np.array([0, 3, 4, 1])
    batch = {"image": np.zeros((4, 8, 8, 1), np.float32), "target": np.eye(K, dtype=np.float32)[grade],
             "weight": np.array([1.0, 2.0, 0.5, 1.0], np.float32)}
    x, y, w = _task(mode).format_batch(batch)
    y = np.asarray(y)
    if mode == "regression":
        np.testing.assert_array_equal(y[:, 0], grade)
    else:  # P(grade > k) for k = 0..K-2
        np.testing.assert_array_equal(y, (grade[:, None] > np.arange(K - 1)[None, :]).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(w), batch["weight"])


def test_grade_output_decides_like_digitize_in_numpy_and_in_the_graph():
    import tensorflow as tf

    out, names = GradeOutput(), [str(g) for g in range(K)]
    score = np.random.default_rng(0).uniform(-1, K + 1, (200, 1))
    cuts = [0.3, 1.1, 2.9, 3.2]
    np.testing.assert_array_equal(out.decide(score, {"cuts": cuts}, names), np.digitize(score[:, 0], cuts))
    np.testing.assert_array_equal(out.decide(score, None, names), np.clip(np.floor(score[:, 0] + 0.5), 0, K - 1))
    graph = out.serve(tf.constant(score, tf.float32), 1.0, out.rule({"cuts": cuts}, names))
    np.testing.assert_array_equal(graph["labels"].numpy(), np.digitize(score[:, 0].astype(np.float32), cuts))
    z = np.random.default_rng(1).normal(0, 2, (50, K - 1))  # coral: the expected grade
    np.testing.assert_allclose(out.activate(z)[:, 0], (1 / (1 + np.exp(-z))).sum(1), atol=1e-12)


def test_config_rules_of_the_regression_section(tmp_path):
    base = {"task": "regression", "data": {"source": "csv", "prepare": "sklearn_digits", "csv": "digits.csv"},
            "model": {"backbone": "small_cnn", "weights": None}}
    assert config_from_dict({**base, "regression": {"mode": "coral"}}).train.loss.name == "crossentropy"
    assert config_from_dict(base).train.loss.name == "mse"
    cases = [({**base, "regression": {"mode": "coral"}, "train": {"loss": {"name": "mse"}}}, "train.loss.name"),
             ({**base, "regression": {"mdoe": "coral"}}, "did you mean 'mode'"),
             ({**base, "task": "classification", "regression": {}}, "this section is for task 'regression'"),
             ({**base, "train": {"loss": {"name": "dice"}}}, "not a loss of task 'regression'"),
             ({**base, "data": {**base["data"], "source": "folders"}}, "task 'regression' reads")]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            config_from_dict(raw)


def _grade_dataset(digits_root, tmp_path, label="grade"):
    frame = pd.read_csv(digits_root / "digits.csv")
    frame = frame[frame["label"] <= 4].iloc[:400]
    root = tmp_path / "grades"
    root.mkdir()
    pd.DataFrame({"path": [str(digits_root / p) for p in frame["path"]], label: frame["label"]}).to_csv(
        root / "grades.csv", index=False)
    return root


def _config(root, tmp_path, mode="regression", **train):
    cfg = {"task": "regression", "regression": {"mode": mode},
           "data": {"source": "csv", "root": str(root), "csv": "grades.csv", "label_column": "grade",
                    "image_size": 32, "channels": 1, "normalization": "none"},
           "model": {"backbone": "small_cnn", "weights": None}, "augment": {"enabled": False},
           "train": {"epochs": 8, "batch_size": 32, "optimizer": {"lr": 0.003}, "schedule": {"name": "constant"},
                     "tensorboard": False, **train}}
    path = tmp_path / f"{mode}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("mode", ["regression", "coral"])
def test_a_tiny_model_learns_digit_grades_end_to_end(mode, digits_root, tmp_path):
    """train -> evaluate (QWK >= 0.9 on val, tuned cuts) -> predict -> export --verify, through the CLI."""
    root = _grade_dataset(digits_root, tmp_path)
    run = tmp_path / "run"
    r = run_cli("-m", "tfvision.train", "--config", str(_config(root, tmp_path, mode)), "--output-dir", str(run),
                "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"val_quadratic_kappa", "val_mae", "val_rmse"} <= set(json.loads((run / "metrics.json").read_text()))
    r = run_cli("-m", "tfvision.evaluate", "--run", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert metrics["quadratic_kappa"] >= 0.9
    cuts = json.loads((run / "thresholds.json").read_text())["cuts"]
    assert len(cuts) == K - 1 and np.all(np.diff(cuts) > 0)

    images = tmp_path / "to_grade"
    images.mkdir()
    val = pd.read_csv(run / "splits" / "val.csv").iloc[:20]
    for p in val["path"]:
        (images / p.rsplit("/", 1)[-1]).write_bytes(open(p, "rb").read())
    out = tmp_path / "pred.csv"
    r = run_cli("-m", "tfvision.predict", "--run", str(run), "--input-dir", str(images), "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    pred = pd.read_csv(out)
    assert len(pred) == 20 and set(pred["pred"]) <= set(range(K)) and "score" in pred
    # The predicted grade is the score cut by thresholds.json's points.
    np.testing.assert_array_equal(pred["pred"], np.digitize(pred["score"], cuts))

    r = run_cli("-m", "tfvision.export", "--run", str(run), "--format", "all", "--verify", "--output",
                str(tmp_path / "export"), "--n-images", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert report["passed"] and len(report["exports"]) == 4 and all(e["passed"] for e in report["exports"])


def test_grades_train_from_tfrecord_shards(digits_root, tmp_path):
    root = _grade_dataset(digits_root, tmp_path)
    cfg = _config(root, tmp_path, epochs=1)
    shards = tmp_path / "shards"
    r = run_cli("-m", "tfvision.convert", "--config", str(cfg), "--output", str(shards))
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run"
    r = run_cli("-m", "tfvision.train", "--config", str(cfg), "--set", "data.source=tfrecord",
                "--set", f"data.root={shards}", "--output-dir", str(run), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["class_names"] == [str(g) for g in range(K)]


def test_non_numeric_grades_are_refused_with_the_column(digits_root, tmp_path):
    root = _grade_dataset(digits_root, tmp_path)
    frame = pd.read_csv(root / "grades.csv")
    frame["grade"] = np.where(frame["grade"] == 2, "two", frame["grade"].astype(str))
    frame.to_csv(root / "grades.csv", index=False)
    r = run_cli("-m", "tfvision.train", "--config", str(_config(root, tmp_path)), "--output-dir",
                str(tmp_path / "run"))
    assert r.returncode == 2 and "regression needs numeric grades, got 'two'" in r.stderr
