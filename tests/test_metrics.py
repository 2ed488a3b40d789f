"""tfvision.metrics against scikit-learn, plus the decision helpers and PNG plots."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import special
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.preprocessing import label_binarize

from tfvision import metrics, plots

K = 5
ABSENT = 3  # class never present in y_true, but predicted now and then
NAMES = ["normal", "benign", "malignant", "artefact", "other"]


@pytest.fixture(scope="module")
def multiclass_case():
    rng = np.random.default_rng(0)
    y = rng.choice([0, 1, 2, 4], size=400, p=[0.4, 0.3, 0.2, 0.1])
    logits = rng.normal(size=(400, K))
    logits[np.arange(400), y] += 1.5
    # Two decimals force many tied scores, where AUC/AP implementations usually differ.
    probs = np.round(special.softmax(logits, axis=1), 2)
    return y, probs


@pytest.fixture(scope="module")
def multilabel_case():
    rng = np.random.default_rng(1)
    n, k = 300, 4
    y = (rng.random((n, k)) < [0.3, 0.5, 0.1, 0.6]).astype(float)
    probs = np.clip(0.35 * y + rng.random((n, k)) * 0.65, 0, 1).round(3)
    y_obs = y.copy()
    unknown = rng.random((n, k)) < 0.25
    y_obs[unknown] = -1
    # Unknown entries get misleading scores: if they leaked in as negatives, AUC would drop.
    probs[unknown] = np.where(rng.random(unknown.sum()) < 0.5, 0.99, 0.95)
    return y_obs, probs, unknown


# sklearn warns that the absent class is predicted: that is the case under test.
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_matches_sklearn(multiclass_case):
    y, probs = multiclass_case
    m = metrics.multiclass_metrics(y, probs, NAMES)
    pred = probs.argmax(1)
    assert ABSENT in pred and ABSENT not in y  # the fixture really exercises the edge case
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        for key, fn in (("precision", skm.precision_score), ("recall", skm.recall_score),
                        ("f1", skm.f1_score)):
            expected = fn(y, pred, average=avg, zero_division=0)
            assert m[f"{avg}_{key}"] == pytest.approx(expected), (avg, key)
    np.testing.assert_array_equal(m["confusion_matrix"],
                                  skm.confusion_matrix(y, pred, labels=range(K)))

    present = [c for c in range(K) if c != ABSENT]
    onehot = label_binarize(y, classes=present)
    assert m["roc_auc_macro"] == pytest.approx(
        skm.roc_auc_score(onehot, probs[:, present], average="macro"))
    assert m["pr_auc_macro"] == pytest.approx(
        skm.average_precision_score(onehot, probs[:, present], average="macro"))

    prec, rec, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=range(K), zero_division=0)
    for c, name in enumerate(NAMES):
        row = m["per_class"][name]
        assert row["support"] == support[c]
        assert row["precision"] == pytest.approx(prec[c])
        assert row["f1"] == pytest.approx(f1[c])
        if c == ABSENT:
            assert row["recall"] is None and row["roc_auc"] is None and row["pr_auc"] is None
            continue
        assert row["recall"] == pytest.approx(rec[c])
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))
        assert row["pr_auc"] == pytest.approx(skm.average_precision_score(y == c, probs[:, c]))


def test_normalized_confusion_rows(multiclass_case):
    y, probs = multiclass_case
    m = metrics.multiclass_metrics(y, probs, NAMES)
    cm, norm = np.array(m["confusion_matrix"]), np.array(m["confusion_matrix_normalized"])
    np.testing.assert_array_equal(norm[ABSENT], 0.0)  # zero support: zeros, not NaN
    present = cm.sum(1) > 0
    np.testing.assert_allclose(norm[present], cm[present] / cm[present].sum(1, keepdims=True))
    np.testing.assert_allclose(norm[present].sum(1), 1.0)


def test_multiclass_is_plain_json(multiclass_case):
    y, probs = multiclass_case
    m = metrics.multiclass_metrics(y, probs, NAMES, ordinal=True)
    expected_keys = {
        "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc_macro",
        "pr_auc_macro", "confusion_matrix", "confusion_matrix_normalized", "per_class",
        "macro_precision", "macro_recall", "weighted_precision", "weighted_recall",
        "quadratic_kappa"}
    assert set(m) == expected_keys
    json.dumps(m, allow_nan=False)  # raises on NaN/inf or numpy scalars

    def leaves(x):
        if isinstance(x, dict):
            return [v for val in x.values() for v in leaves(val)]
        if isinstance(x, list):
            return [v for val in x for v in leaves(val)]
        return [x]

    assert all(type(v) in (float, int, type(None)) for v in leaves(m))


def test_quadratic_kappa_matches_sklearn(multiclass_case):
    y, probs = multiclass_case
    m = metrics.multiclass_metrics(y, probs, NAMES, ordinal=True)
    expected = skm.cohen_kappa_score(y, probs.argmax(1), weights="quadratic", labels=range(K))
    assert m["quadratic_kappa"] == pytest.approx(expected)
    assert "quadratic_kappa" not in metrics.multiclass_metrics(y, probs, NAMES)


def test_auc_none_with_single_class_present():
    probs = np.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    m = metrics.multiclass_metrics([0, 0, 0], probs, ["a", "b"])
    assert m["roc_auc_macro"] is None
    assert m["pr_auc_macro"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_multiclass_rejects_bad_labels():
    with pytest.raises(ValueError, match="class indices"):
        metrics.multiclass_metrics([0, 2], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"])
    with pytest.raises(ValueError, match="class names"):
        metrics.multiclass_metrics([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "a"])


def test_multilabel_uses_known_entries_only(multilabel_case):
    y, probs, unknown = multilabel_case
    names = list("abcd")
    th = np.array([0.5, 0.4, 0.6, 0.5])
    m = metrics.multilabel_metrics(y, probs, names, thresholds=th)
    aucs, f1s = [], []
    for c, name in enumerate(names):
        keep = ~unknown[:, c]
        yc, pc = y[keep, c], probs[keep, c]
        pred = pc >= th[c]
        row = m["per_class"][name]
        assert row["n_known"] == keep.sum() and row["support"] == yc.sum()
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(yc, pc))
        assert row["pr_auc"] == pytest.approx(skm.average_precision_score(yc, pc))
        assert row["precision"] == pytest.approx(skm.precision_score(yc, pred))
        assert row["recall"] == pytest.approx(skm.recall_score(yc, pred))
        assert row["f1"] == pytest.approx(skm.f1_score(yc, pred))
        # Treating -1 as a negative label gives a different (wrong) answer.
        assert row["roc_auc"] != pytest.approx(skm.roc_auc_score(y[:, c] == 1, probs[:, c]))
        aucs.append(row["roc_auc"])
        f1s.append(row["f1"])
    assert m["roc_auc_macro"] == pytest.approx(np.mean(aucs))
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))

    # A separate mask is equivalent to writing -1 into y.
    y_full = np.where(unknown, 0.0, y)
    via_mask = metrics.multilabel_metrics(y_full, probs, names, thresholds=th, known=~unknown)
    assert via_mask == m


def test_multilabel_macro_skips_undefined():
    y = np.array([[1, 0], [0, 0], [1, -1]], dtype=float)
    probs = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.9]])
    m = metrics.multilabel_metrics(y, probs, ["a", "b"])
    assert m["per_class"]["b"]["roc_auc"] is None  # only negatives known
    assert m["per_class"]["b"]["f1"] is None  # no positives, none predicted
    assert m["roc_auc_macro"] == pytest.approx(1.0)
    assert m["macro_f1"] == pytest.approx(1.0)
    json.dumps(m, allow_nan=False)


def test_calibration_matches_sklearn_binary():
    rng = np.random.default_rng(2)
    p1 = rng.beta(2, 2, size=500)
    y = (rng.random(500) < p1 ** 1.5).astype(int)  # deliberately miscalibrated
    probs = np.stack([1 - p1, p1], axis=1)
    cal = metrics.calibration(y, probs, n_bins=15)
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(int)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=15, strategy="uniform")
    filled = [b for b in cal["bins"] if b["count"]]
    np.testing.assert_allclose([b["accuracy"] for b in filled], prob_true)
    np.testing.assert_allclose([b["confidence"] for b in filled], prob_pred)

    counts = np.array([b["count"] for b in filled])
    assert counts.sum() == 500 and len(cal["bins"]) == 15
    gaps = np.abs(prob_true - prob_pred)
    assert cal["ece"] == pytest.approx(np.sum(counts / 500 * gaps))
    assert cal["mce"] == pytest.approx(gaps.max())
    assert all(b["accuracy"] is None for b in cal["bins"] if not b["count"])
    json.dumps(cal, allow_nan=False)


def test_calibration_bins_close_on_the_right():
    # Confidences exactly on an edge belong to the bin below, as in calibration_curve.
    conf = np.array([0.5, 0.75, 0.75, 1.0, 0.6, 0.9])
    y = np.array([0, 0, 1, 0, 0, 1])
    cal = metrics.calibration(y, np.stack([conf, 1 - conf], axis=1), n_bins=4)
    assert [b["count"] for b in cal["bins"]] == [0, 1, 3, 2]
    prob_true, prob_pred = calibration_curve((y == 0).astype(int), conf, n_bins=4)
    filled = [b for b in cal["bins"] if b["count"]]
    np.testing.assert_allclose([b["accuracy"] for b in filled], prob_true)
    np.testing.assert_allclose([b["confidence"] for b in filled], prob_pred)


def test_calibration_hand_computed():
    # Confidences 0.9 (right) and 0.6 (right): gaps 0.1 and 0.4 in separate bins.
    cal = metrics.calibration([0, 1], [[0.9, 0.1], [0.4, 0.6]], n_bins=10)
    assert cal["ece"] == pytest.approx(0.25) and cal["mce"] == pytest.approx(0.4)


def _nll(logits, y, t=1.0):
    return float(np.mean(-np.log(metrics.softmax(logits, t)[np.arange(len(y)), y])))


def test_temperature_recovers_overconfidence():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(3000, 4))
    # Labels drawn from softmax(logits): those logits are calibrated by construction.
    p = metrics.softmax(logits)
    y = (rng.random((3000, 1)) > np.cumsum(p, axis=1)).sum(1)
    hot = 5.0 * logits
    t = metrics.fit_temperature(hot, y)
    assert t == pytest.approx(5.0, rel=0.12)
    assert _nll(hot, y, t) < _nll(hot, y) - 0.1
    assert metrics.fit_temperature(logits, y) == pytest.approx(1.0, rel=0.12)


def test_softmax_and_sigmoid_are_stable():
    p = metrics.softmax([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]], temperature=2.0)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(p[1], np.exp([0.5, 1, 1.5]) / np.exp([0.5, 1, 1.5]).sum())
    np.testing.assert_allclose(metrics.sigmoid([-1000.0, 0.0, 2.0]),
                               [0.0, 0.5, 1 / (1 + np.exp(-2.0))])
    with pytest.raises(ValueError):
        metrics.softmax([[1.0, 2.0]], temperature=0)


def test_f1_thresholds_are_optimal(multilabel_case):
    y, probs, unknown = multilabel_case
    th = metrics.tune_f1_thresholds(y, probs)
    assert th.shape == (4,)
    for c in range(4):
        keep = ~unknown[:, c]
        yc, pc = y[keep, c], probs[keep, c]

        def f1_at(t, yc=yc, pc=pc):
            return skm.f1_score(yc, pc >= t, zero_division=0)

        brute = max(f1_at(t) for t in np.unique(pc))
        assert f1_at(th[c]) == pytest.approx(brute)
        assert f1_at(th[c]) >= f1_at(0.5)
    # Scores of unknown entries must not move the thresholds.
    noisy = probs.copy()
    noisy[unknown] = 0.0
    np.testing.assert_array_equal(metrics.tune_f1_thresholds(y, noisy), th)


def test_optimized_rounder_beats_naive_rounding():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 5, size=600)
    # A regressor that shrinks towards the mean: naive rounding under-uses the end grades.
    scores = 2.0 + 0.55 * (y - 2.0) + rng.normal(scale=0.25, size=600)
    naive = skm.cohen_kappa_score(y, np.clip(np.rint(scores), 0, 4), weights="quadratic")
    rounder = metrics.OptimizedRounder().fit(scores, y)
    tuned = skm.cohen_kappa_score(y, rounder.predict(scores), weights="quadratic")
    assert tuned > naive + 0.02
    assert rounder.coef_.shape == (4,) and np.all(np.diff(rounder.coef_) >= 0)
    with pytest.raises(RuntimeError):
        metrics.OptimizedRounder().predict(scores)


def test_kappa_helper_matches_sklearn():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    assert metrics.quadratic_weighted_kappa(a, b) == pytest.approx(
        skm.cohen_kappa_score(a, b, weights="quadratic"))


@pytest.mark.parametrize("two_d", [False, True])
def test_match_distribution_hits_target(two_d):
    rng = np.random.default_rng(6)
    n, target = 203, np.array([0.5, 0.3, 0.15, 0.05])
    values = rng.dirichlet(np.ones(4), size=n) if two_d else rng.normal(size=n)
    labels = metrics.match_distribution(values, target * 1000)  # counts work as well
    counts = np.bincount(labels, minlength=4)
    assert counts.sum() == n and np.all(np.abs(counts - target * n) <= 1)
    if not two_d:
        # Ranking: every class-1 score is above every class-0 score.
        assert values[labels == 0].max() < values[labels == 1].min()
        cuts = metrics.distribution_cuts(values, target)
        np.testing.assert_array_equal(np.digitize(values, cuts), labels)


def test_match_distribution_rounds_to_nearest_count():
    # 7 x [0.2, 0.5, 0.3] = [1.4, 3.5, 2.1]: the spare sample goes to the largest remainder.
    labels = metrics.match_distribution(np.arange(7.0), [0.2, 0.5, 0.3])
    np.testing.assert_array_equal(np.bincount(labels), [1, 4, 2])


def test_match_distribution_keeps_argmax_when_it_already_fits():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    np.testing.assert_array_equal(metrics.match_distribution(probs, [0.5, 0.5]), [0, 0, 1, 1])
    # Asking for 3 of class 0 moves the least confident class-1 sample.
    np.testing.assert_array_equal(metrics.match_distribution(probs, [0.75, 0.25]), [0, 0, 1, 0])


def test_metrics_do_not_import_tensorflow():
    code = "import sys, tfvision.metrics, tfvision.plots; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------ plots
def _assert_png(path, width=None, height=None):
    import matplotlib.image as mpimg

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    if width:
        assert abs(img.shape[1] - width) <= 2 and abs(img.shape[0] - height) <= 2
    assert img.std() > 0  # something was drawn
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]


def test_training_curves_png(tmp_path):
    hist = {"epoch": [0, 1, 2], "loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.9, 0.8],
            "accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.4, 0.6, 0.7],
            "lr": [1e-3, 5e-4, 1e-4], "note": ["a", "b", "c"]}
    # loss, accuracy, lr: three panels side by side at 4.5 x 3.2 inches, 100 dpi.
    _assert_png(plots.training_curves(hist, tmp_path / "a.png"), width=1350, height=320)
    import pandas as pd

    no_lr = pd.DataFrame(hist).drop(columns="lr")
    _assert_png(plots.training_curves(no_lr, tmp_path / "b.png"), width=900, height=320)


def test_families_pair_val_metrics():
    fam = plots._families(["accuracy", "val_loss", "loss", "val_accuracy", "auc", "val_iou"])
    assert fam == [["loss", "val_loss"], ["accuracy", "val_accuracy"], ["auc"], ["val_iou"]]


def test_curve_plots_png(tmp_path, multiclass_case, multilabel_case):
    y, probs = multiclass_case
    _assert_png(plots.roc_curves(y, probs, NAMES, tmp_path / "roc.png"), 650, 550)
    _assert_png(plots.pr_curves(y, probs, NAMES, tmp_path / "pr.png"), 650, 550)
    ym, pm, unknown = multilabel_case
    _assert_png(plots.roc_curves(ym, pm, list("abcd"), str(tmp_path / "roc_ml.png")))
    _assert_png(plots.pr_curves(ym, pm, list("abcd"), str(tmp_path / "pr_ml.png")))
    name, yc, sc = next(plots._one_vs_rest(ym, pm, list("abcd")))
    assert name == "a" and yc.size == sc.size == (~unknown[:, 0]).sum()


def test_confusion_and_bars_png(tmp_path, multiclass_case):
    y, probs = multiclass_case
    m = metrics.multiclass_metrics(y, probs, NAMES)
    _assert_png(plots.confusion_matrix_plot(m["confusion_matrix"], NAMES, tmp_path / "c.png"))
    _assert_png(plots.confusion_matrix_plot(m["confusion_matrix"], NAMES, tmp_path / "n.png",
                                            normalized=True))
    _assert_png(plots.per_class_bars(m["per_class"], "roc_auc", tmp_path / "bars.png"))
    cal = metrics.calibration(y, probs)
    _assert_png(plots.reliability_diagram(cal, tmp_path / "rel.png"), 550, 650)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(plots.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        plots.per_class_bars({"a": {"f1": 0.5}}, "f1", tmp_path / "x.png")
    assert os.listdir(tmp_path) == []
