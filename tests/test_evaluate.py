"""Evaluate: every reported number against scikit-learn, temperature scaling, decisions, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from tests.eval_helpers import copy_run, load_images, model_logits, softmax, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_root):
    return trained_run(tmp_path_factory, digits_root)


def _split(run, name):
    frame = pd.read_csv(run / "splits" / f"{name}.csv", dtype=str)
    names = json.loads((run / "run.json").read_text())["class_names"]
    return frame["path"].tolist(), np.array([names.index(v) for v in frame["label"]])


def test_metrics_match_sklearn_on_the_models_own_predictions(run, tmp_path):
    from tfvision import metrics as M
    from tfvision.evaluate import evaluate

    r = copy_run(run, tmp_path / "run")
    out = evaluate(r, "test", ordinal=True)
    m = json.loads((out / "metrics.json").read_text())
    temperature = json.loads((r / "calibration.json").read_text())["temperature"]

    # Oracle: logits straight from the checkpoint on independently decoded test images.
    paths, y = _split(r, "test")
    probs = softmax(model_logits(r, load_images(paths)), temperature)
    pred = probs.argmax(1)
    k = probs.shape[1]
    assert m["n"] == len(y) == 60 and set(y) == set(range(k))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-9)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-9)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-9)
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0), abs=1e-9)
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-5)
    onehot = np.eye(k)[y]
    assert m["pr_auc_macro"] == pytest.approx(average_precision_score(onehot, probs, average="macro"), abs=1e-5)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(k)).tolist()
    assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-9)
    p, rc, f1, support = precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0)
    for c, name in enumerate(json.loads((r / "run.json").read_text())["class_names"]):
        pc = m["per_class"][name]
        assert pc["support"] == support[c] and pc["f1"] == pytest.approx(f1[c], abs=1e-9)
        assert (pc["recall"] or 0.0) == pytest.approx(rc[c], abs=1e-9)
        assert (pc["precision"] or 0.0) == pytest.approx(p[c], abs=1e-9)
        assert pc["roc_auc"] == pytest.approx(roc_auc_score(y == c, probs[:, c]), abs=1e-5)
        assert pc["pr_auc"] == pytest.approx(average_precision_score(y == c, probs[:, c]), abs=1e-5)
    # ECE / MCE from scikit-learn's reliability curve of the top-1 confidence, 15 bins.
    conf, correct = probs.max(1), (pred == y).astype(float)
    acc_bin, conf_bin = calibration_curve(correct, conf, n_bins=15, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], conf), minlength=15)
    gaps = np.abs(acc_bin - conf_bin)
    assert m["ece"] == pytest.approx(float((counts[counts > 0] * gaps).sum() / len(y)), abs=1e-6)
    assert m["mce"] == pytest.approx(float(gaps.max()), abs=1e-6)

    # Temperature and cut points come from val only.
    vpaths, vy = _split(r, "val")
    vlogits = model_logits(r, load_images(vpaths))
    assert temperature == pytest.approx(M.fit_temperature(vlogits, vy), rel=1e-3)
    rule = json.loads((r / "thresholds.json").read_text())
    assert rule["tuned_on"] == "val"
    # The kappa-maximising cuts are kept only when they beat argmax on val.
    candidate = rule if rule["kind"] == "ordinal" else rule["rejected"]
    vprobs = softmax(vlogits, temperature)
    expected = M.OptimizedRounder(k).fit(vprobs @ np.arange(k), vy).coef_
    np.testing.assert_allclose(candidate["cuts"], expected, atol=1e-3)
    kappa_cuts = cohen_kappa_score(vy, np.digitize(vprobs @ np.arange(k), expected), weights="quadratic")
    kappa_argmax = cohen_kappa_score(vy, vprobs.argmax(1), weights="quadratic")
    assert (rule["kind"] == "ordinal") == (kappa_cuts > kappa_argmax + 1e-12)
    tuned = np.digitize(probs @ np.arange(k), rule["cuts"]) if rule["kind"] == "ordinal" else pred
    after = m["decision"]["test"]["after"]["quadratic_kappa"]
    assert after == pytest.approx(cohen_kappa_score(y, tuned, weights="quadratic"), abs=1e-6)

    for name in ("report.md", "roc.png", "pr.png", "confusion_matrix.png", "confusion_matrix_normalized.png",
                 "reliability.png", "reliability_uncalibrated.png", "per_class_f1.png", "per_class_roc_auc.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    for section in ("## Data", "## Config", "## Metrics", "## Plots", "## Worst-confused classes",
                    "## Calibration", "## Decision rule", "](roc.png)", "quadratic_kappa"):
        assert section in report, section


def test_temperature_scaling_lowers_nll_of_an_overconfident_model(run, tmp_path):
    import keras

    from tfvision import metrics as M
    from tfvision.evaluate import main

    hot = copy_run(run, tmp_path / "hot")
    model = keras.saving.load_model(hot / "checkpoints" / "best.keras", compile=False)
    dense = model.get_layer("logits")
    dense.set_weights([w * 8.0 for w in dense.get_weights()])  # logits x8: same ranking, far too sure
    model.save(hot / "checkpoints" / "best.keras")

    assert main(["--run", str(hot), "--split", "test"]) == 0  # the CLI, once
    m = json.loads((hot / "eval" / "test" / "metrics.json").read_text())
    cal = m["calibration"]
    vpaths, vy = _split(run, "val")
    t_plain = M.fit_temperature(model_logits(run, load_images(vpaths)), vy)
    assert cal["temperature"] == pytest.approx(8.0 * t_plain, rel=1e-3)  # it undoes exactly the x8
    for split in ("val", "test"):  # fitted on val, and it helps on the held-out test split too
        assert cal[split]["after"]["nll"] < 0.8 * cal[split]["before"]["nll"]
    saved = json.loads((hot / "calibration.json").read_text())
    assert saved["nll_after"] < saved["nll_before"] and saved["tuned_on"] == "val"
    assert saved["temperature"] == cal["temperature"]


def test_ensemble_averages_member_probabilities(run, tmp_path):
    from tfvision.inference import Ensemble, load_run, predict_files

    a, b = copy_run(run, tmp_path / "a"), copy_run(run, tmp_path / "b")
    (b / "calibration.json").write_text(json.dumps({"temperature": 3.0}))
    paths, _ = _split(run, "val")
    paths = paths[:12]
    ra, rb = load_run(a), load_run(b)
    assert rb.temperature == 3.0
    both, errors = predict_files(Ensemble([ra, rb]), paths)
    pa, _ = predict_files(Ensemble([ra]), paths)
    pb, _ = predict_files(Ensemble([rb]), paths)
    assert errors == [""] * 12
    np.testing.assert_allclose(both, (pa + pb) / 2, atol=1e-6)
    np.testing.assert_allclose(pb, softmax(model_logits(b, load_images(paths)), 3.0), atol=1e-5)


def test_multilabel_scorer_skips_unknown_labels_and_tunes_thresholds():
    from tfvision.tasks import get_task

    rng = np.random.default_rng(0)
    n, k = 400, 3
    y = (rng.random((n, k)) < [0.2, 0.5, 0.1]).astype(float)
    logits = (2 * y - 1) * rng.gamma(2.0, 1.0, (n, k)) + rng.normal(0, 1.5, (n, k))
    y[rng.random((n, k)) < 0.2] = -1  # unknown: never a negative
    scorer = get_task("multilabel").scorer(["a", "b", "c"])
    probs = 1 / (1 + np.exp(-logits))
    m = scorer.metrics(y, probs)
    for c, name in enumerate("abc"):
        known = y[:, c] != -1
        assert m["per_class"][name]["n_known"] == known.sum()
        assert m["per_class"][name]["roc_auc"] == pytest.approx(roc_auc_score(y[known, c], probs[known, c]))
        assert m["per_class"][name]["pr_auc"] == pytest.approx(
            average_precision_score(y[known, c], probs[known, c]))
        assert m["per_class"][name]["f1"] == pytest.approx(f1_score(y[known, c], probs[known, c] >= 0.5))
    rule = scorer.tune(y, probs, None)
    assert rule["kind"] == "multilabel" and len(rule["thresholds"]) == k
    before, after = scorer.decision_metrics(y, probs, None), scorer.decision_metrics(y, probs, rule)
    assert after["macro_f1"] >= before["macro_f1"]
    # Temperature over known binary entries: x6 logits -> T about 6x the plain fit.
    t1 = scorer.fit_temperature(logits, y)
    t6 = scorer.fit_temperature(6 * logits, y)
    assert t6 == pytest.approx(6 * t1, rel=1e-3)
    hot = 1 / (1 + np.exp(-6 * logits))
    cooled = 1 / (1 + np.exp(-6 * logits / t6))
    assert scorer.calibration(y, cooled)["nll"] < scorer.calibration(y, hot)["nll"]


def test_inconsistent_run_and_missing_split_are_clear_errors(run, tmp_path):
    from tfvision.errors import UserError
    from tfvision.evaluate import main

    r = copy_run(run, tmp_path / "seg")
    info = json.loads((r / "run.json").read_text())
    (r / "run.json").write_text(json.dumps({**info, "task": "segmentation"}))
    with pytest.raises(UserError, match="segmentation"):
        from tfvision.evaluate import evaluate

        evaluate(r)
    assert main(["--run", str(tmp_path / "nothing")]) == 2
    assert main(["--run", str(run), "--tta", "99"]) == 2


def _as_multilabel_run(run, dest):
    """The digits run turned into a 2-label run ("even", "big") without training: the new
    logits are signed sums of the digit logits. Some truths are unknown (-1) or blank."""
    import keras

    r = copy_run(run, dest / "run")
    frame = pd.concat([pd.read_csv(run / "splits" / f"{s}.csv", dtype=str) for s in ("train", "val", "test")])
    digit = frame["label"].astype(int).to_numpy()
    rng = np.random.default_rng(0)
    even, big = (digit % 2 == 0).astype(int).astype(str), (digit >= 5).astype(int).astype(str)
    big[rng.random(len(big)) < 0.2] = "-1"
    even[rng.random(len(even)) < 0.1] = ""
    pd.DataFrame({"path": frame["path"], "group": frame["group"], "even": even, "big": big}).to_csv(
        dest / "ml.csv", index=False)
    cfg = json.loads((r / "config.json").read_text())
    cfg["task"] = "multilabel"
    cfg["data"].update(root=str(dest), csv="ml.csv", label_columns=["even", "big"], label_column="label")
    (r / "config.json").write_text(json.dumps(cfg))
    info = json.loads((r / "run.json").read_text())
    (r / "run.json").write_text(json.dumps({**info, "task": "multilabel", "activation": "sigmoid",
                                            "class_names": ["even", "big"]}))
    model = keras.saving.load_model(r / "checkpoints" / "best.keras", compile=False)
    old = model.get_layer("logits")
    sign = np.stack([np.where(np.arange(10) % 2 == 0, 1.0, -1.0), np.where(np.arange(10) >= 5, 1.0, -1.0)], 1)
    w, b = old.get_weights()
    new = keras.layers.Dense(2, name="logits")
    model = keras.Model(model.input, new(old.input))
    new.set_weights([(w @ sign / 5).astype("float32"), (b @ sign / 5).astype("float32")])
    model.save(r / "checkpoints" / "best.keras")
    return r, dict(zip(frame["path"], zip(even, big, strict=True), strict=True))


def test_multilabel_run_end_to_end_with_unknown_labels(run, tmp_path):
    from tfvision.evaluate import evaluate
    from tfvision.predict import main

    r, truth = _as_multilabel_run(run, tmp_path)
    m = json.loads((evaluate(r, "test") / "metrics.json").read_text())
    t = json.loads((r / "calibration.json").read_text())["temperature"]
    paths = pd.read_csv(r / "splits" / "test.csv")["path"].tolist()
    probs = 1 / (1 + np.exp(-model_logits(r, load_images(paths)) / t))
    for c, name in enumerate(["even", "big"]):
        raw = np.array([truth[p][c] for p in paths])
        known = (raw == "0") | (raw == "1")  # uncertain -1 ignored; blank "even" -> 0 (default policy)
        if name == "even":
            known |= raw == ""
        y = (raw[known] == "1").astype(int)
        pc = m["per_class"][name]
        assert pc["n_known"] == known.sum() and pc["support"] == y.sum()
        assert pc["roc_auc"] == pytest.approx(roc_auc_score(y, probs[known, c]), abs=1e-5)
        assert pc["pr_auc"] == pytest.approx(average_precision_score(y, probs[known, c]), abs=1e-5)
    assert "ece" in m and "confusion_matrix" not in m
    rule = json.loads((r / "thresholds.json").read_text())
    assert rule["kind"] == "multilabel" and len(rule["thresholds"]) == 2

    out = tmp_path / "p.csv"
    assert main(["--run", str(r), "--input-dir", str(Path(paths[0]).parent), "--output", str(out)]) == 0
    frame = pd.read_csv(out, dtype={"pred": str}, keep_default_na=False).set_index("path").loc[paths]
    expected = [";".join(n for n, on in zip(["even", "big"], row >= rule["thresholds"], strict=True) if on)
                for row in probs]
    assert frame["pred"].tolist() == expected
