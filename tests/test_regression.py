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
from tfvision.config_loader import config_from_dict, load_config
from tfvision.errors import ConfigError, DataError
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
    rng = np.random.default_rng(4)
    grade = np.r_[np.arange(K), rng.integers(0, K, 7)]  # every grade, then some more
    n = len(grade)
    batch = {"image": np.zeros((n, 8, 8, 1), np.float32), "target": np.eye(K, dtype=np.float32)[grade],
             "weight": rng.uniform(0.1, 3.0, n).astype(np.float32)}
    x, y, w = _task(mode).format_batch(batch)
    y = np.asarray(y)
    if mode == "regression":  # the grade's index, one column
        assert y.shape == (n, 1)
        np.testing.assert_array_equal(y[:, 0], grade)
    else:  # P(grade > k) for k = 0..K-2
        assert y.shape == (n, K - 1)
        np.testing.assert_array_equal(y, (grade[:, None] > np.arange(K - 1)[None, :]).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(w), batch["weight"])
    assert np.asarray(x).shape == batch["image"].shape
    # No weight in the batch: (image, target) only.
    assert len(_task(mode).format_batch({k: v for k, v in batch.items() if k != "weight"})) == 2


@pytest.mark.parametrize("mode", ["regression", "coral"])
def test_a_mixup_blend_of_grades_is_the_blend_of_their_targets(mode):
    """MixUp mixes one-hot targets; the task's targets are linear in them, so a blend of two images
    trains on the same blend of their grades (regression) or of their cumulative targets (coral)."""
    rng = np.random.default_rng(5)
    a, b, lam = rng.integers(0, K, 16), rng.integers(0, K, 16), rng.uniform(0, 1, 16)
    eye = np.eye(K)
    mixed = (lam[:, None] * eye[a] + (1 - lam[:, None]) * eye[b]).astype(np.float32)
    _, y = _task(mode).format_batch({"image": np.zeros((16, 8, 8, 1), np.float32), "target": mixed})
    cum = lambda g: (g[:, None] > np.arange(K - 1)[None, :]).astype(np.float64)  # noqa: E731
    want = (lam * a + (1 - lam) * b)[:, None] if mode == "regression" else \
        lam[:, None] * cum(a) + (1 - lam[:, None]) * cum(b)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-6)


def test_grades_are_ordered_by_value_not_as_text():
    task = _task("regression")
    frame = pd.DataFrame({"label": ["10", "2", "0", "9", "2", "1.5"]})
    assert task.class_names(frame, task.cfg) == ["0", "1.5", "2", "9", "10"]
    with pytest.raises(DataError, match="regression needs numeric grades, got 'mild'"):
        task.class_names(pd.DataFrame({"label": ["0", "mild", "2"]}), task.cfg)
    # A listed order is the order the model learns, so it must be the grades' own.
    frame = pd.DataFrame({"label": ["0", "2", "4"]})
    task.cfg.data.class_names = ["0", "2", "4"]
    assert task.class_names(frame, task.cfg) == ["0", "2", "4"]
    for listed in (["4", "0", "2"], ["0", "2", "4", "x"]):
        task.cfg.data.class_names = listed
        with pytest.raises(DataError, match="data.class_names"):
            task.class_names(frame, task.cfg)


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
             ({**base, "data": {**base["data"], "source": "folders"}}, "task 'regression' reads"),
             ({**base, "train": {"loss": {"label_smoothing": 0.1}}}, "do not apply to regression"),
             ({**base, "regression": {"mode": "coral"}, "train": {"loss": {"focal_gamma": 3.0}}},
              "do not apply to regression")]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            config_from_dict(raw)
    for loss in ("huber", "smooth_l1"):  # the other losses of regression mode
        assert config_from_dict({**base, "train": {"loss": {"name": loss}}}).train.loss.name == loss

    # The same rules through the file loader and --set overrides, as the CLI reads a config.
    path = tmp_path / "grades.json"
    path.write_text(json.dumps({**base, "regression": {"mode": "coral"}}))
    cfg = load_config(path)
    assert cfg.task == "regression" and cfg.task_options.mode == "coral" and cfg.train.loss.name == "crossentropy"
    assert load_config(path, ["regression.mode=regression"]).train.loss.name == "mse"
    with pytest.raises(ConfigError, match=r"grades\.json: train\.loss\.name: 'mse' does not fit"):
        load_config(path, ["train.loss.name=mse"])
    with pytest.raises(ConfigError, match="did you mean 'mode'"):
        load_config(path, ["regression.mdoe=coral"])
    path.write_text(json.dumps({**base, "task": "classification", "regression": {"mode": "coral"}}))
    with pytest.raises(ConfigError, match="this section is for task 'regression'"):
        load_config(path)


def test_cli_refuses_a_loss_that_does_not_fit_the_mode(tmp_path):
    path = tmp_path / "grades.json"
    path.write_text(json.dumps({"task": "regression", "regression": {"mode": "coral"},
                                "data": {"source": "csv", "root": str(tmp_path), "csv": "grades.csv"},
                                "model": {"backbone": "small_cnn", "weights": None}}))
    r = run_cli("-m", "tfvision.train", "--config", str(path), "--set", "train.loss.name=mse", "--output-dir",
                str(tmp_path / "run"))
    assert r.returncode == 2 and "train.loss.name" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything is written


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


# Regression mode learns in 5 epochs (val QWK about 0.97 here) in about a minute, so it runs with the
# CLI suites (`-m configs`); CORAL's run takes about 2 minutes on 2 cores and is marked slow.
@pytest.mark.parametrize("mode,epochs", [pytest.param("regression", 5, marks=pytest.mark.configs),
                                         pytest.param("coral", 8, marks=pytest.mark.slow)])
def test_a_tiny_model_learns_digit_grades_end_to_end(mode, epochs, digits_root, tmp_path):
    """train -> evaluate (QWK >= 0.9 on val, tuned cuts) -> predict -> export --verify, through the CLI."""
    import tensorflow as tf
    from PIL import Image

    root = _grade_dataset(digits_root, tmp_path)
    run = tmp_path / "run"
    r = run_cli("-m", "tfvision.train", "--config", str(_config(root, tmp_path, mode, epochs=epochs)),
                "--output-dir", str(run), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"val_quadratic_kappa", "val_mae", "val_rmse"} <= set(json.loads((run / "metrics.json").read_text()))
    names = json.loads((run / "run.json").read_text())["class_names"]
    assert names == [str(g) for g in range(K)]
    r = run_cli("-m", "tfvision.evaluate", "--run", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert metrics["quadratic_kappa"] >= 0.9, metrics["quadratic_kappa"]
    thresholds = json.loads((run / "thresholds.json").read_text())
    cuts = thresholds["cuts"]
    assert thresholds["kind"] == "cuts" and len(cuts) == K - 1 and np.all(np.diff(cuts) > 0)
    assert metrics["decision"]["rule"]["cuts"] == cuts

    # predict every val image: the grade is the score cut by thresholds.json's points, and scoring
    # those grades with scikit-learn gives the tuned kappa evaluate reported on val.
    images = tmp_path / "to_grade"
    images.mkdir()
    val = pd.read_csv(run / "splits" / "val.csv")
    for p in val["path"]:
        (images / p.rsplit("/", 1)[-1]).write_bytes(open(p, "rb").read())
    out = tmp_path / "pred.csv"
    r = run_cli("-m", "tfvision.predict", "--run", str(run), "--input-dir", str(images), "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    pred = pd.read_csv(out, dtype={"pred": str}, keep_default_na=False)
    assert len(pred) == len(val) and "score" in pred and (pred["error"] == "").all()
    assert set(pred["pred"]) <= set(names)
    score = pred["score"].to_numpy(float)
    assert pred["pred"].tolist() == [names[i] for i in np.digitize(score, cuts)]
    truth = dict(zip(val["path"].str.rsplit("/", n=1).str[-1], val["label"].astype(str), strict=True))
    y_true = [truth[p.rsplit("/", 1)[-1]] for p in pred["path"]]
    assert cohen_kappa_score(y_true, pred["pred"], labels=names, weights="quadratic") == pytest.approx(
        metrics["decision"]["val"]["after"]["quadratic_kappa"], abs=1e-9)

    export = tmp_path / "export"
    r = run_cli("-m", "tfvision.export", "--run", str(run), "--format", "all", "--verify", "--output",
                str(export), "--n-images", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((export / "export_report.json").read_text())
    assert report["passed"] and {e["format"] for e in report["exports"]} == {"savedmodel", "onnx", "tflite"}
    assert all(e["passed"] and e["n_images"] > 0 for e in report["exports"])
    # The exported graph cuts its own score with thresholds.json's points, and scores like predict.
    batch = np.stack([np.asarray(Image.open(images / p.rsplit("/", 1)[-1]).convert("L")) for p in pred["path"]])
    served = tf.saved_model.load(str(export / "savedmodel")).signatures["serving_default"](
        image=tf.constant(batch[..., None], tf.uint8))
    scores, labels = served["scores"].numpy(), served["labels"].numpy()
    assert scores.shape == (len(pred), 1) and labels.shape == (len(pred),)
    np.testing.assert_array_equal(labels, np.digitize(scores[:, 0], np.float32(cuts)))
    np.testing.assert_allclose(scores[:, 0], score, atol=1e-4)


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
    assert json.loads((run / "config.json").read_text())["data"]["source"] == "tfrecord"
    metrics = json.loads((run / "metrics.json").read_text())  # grades decoded from the shards' targets
    assert metrics["n_val"] > 0 and all(np.isfinite(metrics[k]) for k in ("val_quadratic_kappa", "val_mae", "val_rmse"))


def test_non_numeric_grades_are_refused_with_the_column(digits_root, tmp_path):
    root = _grade_dataset(digits_root, tmp_path)
    frame = pd.read_csv(root / "grades.csv")
    frame["grade"] = np.where(frame["grade"] == 2, "two", frame["grade"].astype(str))
    frame.to_csv(root / "grades.csv", index=False)
    r = run_cli("-m", "tfvision.train", "--config", str(_config(root, tmp_path)), "--output-dir",
                str(tmp_path / "run"))
    assert r.returncode == 2 and "regression needs numeric grades, got 'two'" in r.stderr
