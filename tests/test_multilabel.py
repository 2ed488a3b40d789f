"""Multi-label: policies, masked loss and metrics, oversampling, CheXpert layout, end to end."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from tests import layouts
from tfvision.config import DataConfig, LabelPolicy, OversampleConfig
from tfvision.data.pipeline import PipelineSpec, Samples, build_dataset
from tfvision.data.sampling import positive_factors, positive_rates, sample_weights
from tfvision.data.sources import load_samples
from tfvision.data.splits import assign_splits, leaked_groups
from tfvision.keras_metrics import MaskedAUC
from tfvision.losses import MaskedBinaryLoss, multilabel_loss
from tfvision.tasks.multilabel import encode


def test_masked_loss_equals_hand_computation_and_ignores_unknown():
    target = np.array([[1.0, 0.0, 1.0]], np.float32)
    known = np.array([[1.0, 1.0, 0.0]], np.float32)
    logits = np.array([[2.0, -1.0, -30.0]], np.float32)  # the unknown one is badly wrong
    y = np.concatenate([target, known], 1)
    p = 1 / (1 + np.exp(-logits[0, :2]))
    bce = -np.log(p[0]), -np.log(1 - p[1])
    assert float(MaskedBinaryLoss(3)(y, logits)) == pytest.approx(np.mean(bce), rel=1e-5)
    focal = bce[0] * (1 - p[0]) ** 2, bce[1] * p[1] ** 2
    assert float(MaskedBinaryLoss(3, gamma=2.0)(y, logits)) == pytest.approx(np.mean(focal), rel=1e-5)
    alpha = [4.0, 1.0, 9.0]
    weighted = (4.0 * bce[0] + bce[1]) / 2
    assert float(MaskedBinaryLoss(3, alpha=alpha)(y, logits)) == pytest.approx(weighted, rel=1e-5)


def test_masked_logits_get_exactly_zero_gradient():
    y = tf.constant([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]])  # class 1 unknown
    logits = tf.Variable([[0.3, 5.0, -2.0]])
    with tf.GradientTape() as tape:
        loss = MaskedBinaryLoss(3, gamma=2.0, label_smoothing=0.1)(y, logits)
    g = tape.gradient(loss, logits).numpy()
    assert g[0, 1] == 0.0 and g[0, 0] != 0.0 and g[0, 2] != 0.0


def test_masked_loss_matches_keras_focal_when_all_known():
    rng = np.random.default_rng(0)
    target = (rng.random((8, 4)) < 0.4).astype(np.float32)
    logits = rng.normal(size=(8, 4)).astype(np.float32)
    ours = MaskedBinaryLoss(4, gamma=2.0)(np.concatenate([target, np.ones_like(target)], 1), logits)
    ref = keras.losses.BinaryFocalCrossentropy(gamma=2.0, from_logits=True)(target, logits)
    assert float(ours) == pytest.approx(float(ref), rel=1e-4)


def test_neg_pos_alpha_from_counts():
    from tfvision.config import LossConfig

    loss = multilabel_loss(LossConfig(name="focal", alpha="neg_pos"), 2, positives=[10, 50], negatives=[90, 50])
    assert loss.alpha == [9.0, 1.0] and loss.gamma == 2.0


def test_uncertainty_policies_map_a_handcrafted_csv(tmp_path):
    raw = pd.DataFrame({"y:A": ["1", "0", "-1", "", "-1"], "y:B": ["-1", "", "1", "-1", "0"]})
    unc = LabelPolicy(default="ignore", per_class={"B": "smooth"}, smooth_value=0.6)
    blank = LabelPolicy(default="zeros", per_class={"B": "ignore"})
    t, k = encode(raw, ["A", "B"], unc, blank)
    np.testing.assert_array_equal(t[:, 0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(k[:, 0], [1, 1, 0, 1, 0])
    np.testing.assert_allclose(t[:, 1], [0.6, 0, 1, 0.6, 0])
    np.testing.assert_array_equal(k[:, 1], [1, 0, 1, 1, 1])
    t, k = encode(raw, ["A", "B"], LabelPolicy(default="ones"), LabelPolicy(default="zeros"))
    np.testing.assert_array_equal(t[:, 0], [1, 0, 1, 0, 1])
    assert k.min() == 1


def test_masked_auc_matches_sklearn_on_known_entries():
    rng = np.random.default_rng(1)
    target = (rng.random((300, 3)) < 0.3).astype(np.float32)
    known = (rng.random((300, 3)) < 0.7).astype(np.float32)
    logits = (rng.normal(size=(300, 3)) + target).astype(np.float32)
    y = np.concatenate([target, known], 1)
    macro = MaskedAUC(3, num_thresholds=2000)
    macro.update_state(y, logits)
    per = [roc_auc_score(target[known[:, j] > 0, j], logits[known[:, j] > 0, j]) for j in range(3)]
    assert float(macro.result()) == pytest.approx(np.mean(per), abs=2e-3)
    one = MaskedAUC(3, class_index=2, num_thresholds=2000)
    one.update_state(y, logits)
    assert float(one.result()) == pytest.approx(per[2], abs=2e-3)


def test_oversampling_raises_the_rare_positive_rate_to_target(tmp_path):
    n = 400
    rng = np.random.default_rng(0)
    targets = np.zeros((n, 2), np.float32)
    targets[:20, 0] = 1  # rare: 5 %
    targets[:, 1] = rng.random(n) < 0.5
    known = np.ones_like(targets)
    cfg = OversampleConfig(enabled=True, rare_below=0.1, target_rate=0.25)
    f = positive_factors(targets, known, cfg, ["rare", "common"])
    w = sample_weights(targets, known, f)
    assert f[1] == 1.0 and positive_rates(targets, known, w)[0] == pytest.approx(0.25, abs=1e-6)
    # Observed through tf.data, over many batches (files are never duplicated on disk).
    paths = np.array([f"img{i}.png" for i in range(n)])
    from tfvision.data.sampling import weighted_dataset

    ds = weighted_dataset({"path": paths, "target": targets}, w, seed=3).batch(64).take(60)
    seen = np.concatenate([b["target"].numpy() for b in ds])
    assert seen[:, 0].mean() == pytest.approx(0.25, abs=0.02)


def test_chexpert_layout_is_patient_wise_and_filters_views(tmp_path):
    root = layouts.chexpert(tmp_path, ["Edema", "Atelectasis"], n_patients=12).root
    data = DataConfig(source="chexpert", root=str(root), label_columns=["Edema", "Atelectasis"], views="frontal")
    table = load_samples(data)
    frame = table.frame
    assert len(frame) == 12 * 2 and frame["path"].str.contains("frontal").all()
    assert set(frame[frame["split"] == "val"]["group"]) == {"patient00010", "patient00011"}
    assert set(frame["y:Edema"]) <= {"1", "0", "-1", ""}
    from tfvision.config import SplitConfig

    frame["split"] = ""  # re-split everything patient-wise
    out = assign_splits(frame, SplitConfig(method="grouped", val_fraction=0.25), seed=0)
    assert leaked_groups(out) == set()


def _digits_multilabel(root):
    """Real digits with targets 'even' and 'greater than 4', some entries -1 or blank."""
    frame = pd.read_csv(root / "digits.csv")
    rng = np.random.default_rng(0)
    digit = frame["label"].to_numpy()
    for name, value in (("even", digit % 2 == 0), ("gt4", digit > 4)):
        col = np.where(value, "1", "0").astype(object)
        col[rng.random(len(col)) < 0.15] = "-1"
        col[rng.random(len(col)) < 0.05] = ""
        frame[name] = col
    frame.to_csv(root / "multi.csv", index=False)
    return frame


def test_multilabel_run_end_to_end_with_masked_metrics(small_digits, tmp_path):
    from tfvision.train import main

    _digits_multilabel(small_digits)
    cfg = {
        "task": "multilabel", "seed": 0,
        "data": {"source": "csv", "root": str(small_digits), "csv": "multi.csv", "label_columns": ["even", "gt4"],
                 "image_size": 32, "uncertain": {"default": "ignore"}, "blank": {"default": "ignore"},
                 "oversample": {"enabled": True, "target_rate": 0.6, "rare_below": 0.55}},
        "model": {"backbone": "small_cnn", "weights": None},
        "augment": {"mix": {"mixup_alpha": 0.2, "p": 0.3}},
        "train": {"epochs": 2, "batch_size": 16, "steps_per_epoch": 6, "monitor": "val_auc", "tensorboard": False,
                  "loss": {"name": "focal", "alpha": "neg_pos"}, "schedule": {"name": "onecycle"}},
    }
    p = tmp_path / "ml.json"
    p.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    assert main(["--config", str(p), "--output-dir", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert info["activation"] == "sigmoid" and info["class_names"] == ["even", "gt4"]
    assert set(info["oversampling"]) == {"even", "gt4"}
    history = pd.read_csv(run / "history.csv")
    assert {"val_auc", "val_auc_even", "val_auc_gt4"} <= set(history.columns)

    # Oracle: sklearn AUC on known entries only, from the best checkpoint's predictions.
    val = pd.read_csv(run / "splits" / "val.csv", dtype=str)
    full = pd.read_csv(small_digits / "multi.csv", dtype=str, keep_default_na=False)
    full["abs"] = full["path"].map(lambda q: str(small_digits / q))
    raw = full.set_index("abs").loc[val["path"]]
    model = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    spec = PipelineSpec(image_size=(32, 32), channels=3, batch_size=32, tiers=[])
    from tfvision.config import AugmentParams

    spec.tiers = [AugmentParams()]
    ds = build_dataset(Samples(val["path"].to_numpy(), np.zeros((len(val), 2), np.float32)), spec, training=False)
    logits = np.concatenate([np.asarray(model(x)) for x, _ in ds])
    per = {}
    for j, c in enumerate(["even", "gt4"]):
        ok = raw[c].isin(["0", "1"]).to_numpy()
        per[c] = roc_auc_score(raw[c][ok].astype(int), logits[ok, j])
        assert metrics["val_roc_auc_per_class"][c] == pytest.approx(per[c], abs=1e-6)
    assert metrics["val_roc_auc"] == pytest.approx(np.mean(list(per.values())), abs=1e-6)


def test_split_lists_keep_multilabel_columns_for_resume(tmp_path):
    from tfvision.run import read_splits, write_splits

    frame = pd.DataFrame({"path": ["a", "b"], "label": ["x", "none"], "group": ["p1", "p2"],
                          "split": ["train", "val"], "y:x": ["1", "-1"], "y:z": ["", "0"]})
    write_splits(tmp_path, frame)
    back = read_splits(tmp_path)
    assert back.sort_values("path").reset_index(drop=True)[frame.columns.tolist()].equals(frame)


def test_class_weights_weigh_labels_and_never_drop_a_sample(small_digits, tmp_path):
    from tfvision.config_loader import load_config
    from tfvision.data.inputs import FileInputs
    from tfvision.tasks import get_task

    frame = _digits_multilabel(small_digits)
    frame["even"] = np.where(frame["label"] == 0, "1", "0")  # rare: 1 in 10
    frame.loc[::7, "gt4"] = "-1"  # unknown entries stay out of the loss
    frame.to_csv(small_digits / "multi.csv", index=False)
    cfg_file = tmp_path / "ml.json"
    cfg_file.write_text(json.dumps({
        "task": "multilabel", "data": {"source": "csv", "root": str(small_digits), "csv": "multi.csv",
                                       "label_columns": ["even", "gt4"], "image_size": 16},
        "model": {"backbone": "small_cnn", "weights": None},
        "train": {"loss": {"name": "crossentropy", "class_weights": "inverse"}}}))
    cfg = load_config(cfg_file)
    frame = load_samples(cfg.data).frame
    frame["split"] = np.where(np.arange(len(frame)) < 240, "train", "val")
    task = get_task("multilabel", cfg)
    inputs = FileInputs(cfg, task, frame)
    loss = task.loss(cfg, inputs)
    spec = PipelineSpec(image_size=(16, 16), channels=3, batch_size=64, tiers=[], augment=False)
    from tfvision.config import AugmentParams

    spec.tiers = [AugmentParams()]
    # What fit minimises per sample: the loss at the (here constant) logits times the sample weight.
    per_sample, y_all = [], []
    for batch in inputs.dataset("train", spec, training=False, format_batch=task.format_batch):
        y = batch[1].numpy()
        w = batch[2].numpy() if len(batch) > 2 else np.ones(len(y))
        per_sample.append(np.asarray(loss.call(y, np.zeros((len(y), 2), np.float32))) * w)
        y_all.append(y)
    per_sample, y = np.concatenate(per_sample), np.concatenate(y_all)
    target, known = y[:, :2], y[:, 2:]
    no_positive = ((target >= 0.5) & (known > 0)).sum(1) == 0
    assert no_positive.sum() > 50 and (per_sample[no_positive] > 0).all()

    # Oracle (numpy): inverse weights of the training positives, scaled to mean 1 over labels,
    # on each known label's BCE (log 2 at logit 0), averaged over the sample's known labels.
    positives = ((target >= 0.5) & (known > 0)).sum(0)
    w = positives.sum() / (2 * positives)
    w = w / w.mean()
    expected = (known * w * np.log(2.0)).sum(1) / np.maximum(known.sum(1), 1)
    np.testing.assert_allclose(per_sample, expected, rtol=1e-5)
    assert w[0] > 3 * w[1]  # the rare finding counts for more
    assert MaskedBinaryLoss.from_config(loss.get_config()).class_weights == pytest.approx(w.tolist())


def test_unknown_oversample_class_is_a_data_error_with_a_hint(small_digits, tmp_path, capsys):
    from tfvision.train import main

    _digits_multilabel(small_digits)
    cfg = {"task": "multilabel",
           "data": {"source": "csv", "root": str(small_digits), "csv": "multi.csv", "label_columns": ["even", "gt4"],
                    "image_size": 16, "oversample": {"enabled": True, "factors": {"evn": 3}}},
           "model": {"backbone": "small_cnn", "weights": None}}
    p = tmp_path / "ml.json"
    p.write_text(json.dumps(cfg))
    assert main(["--config", str(p), "--output-dir", str(tmp_path / "run"), "--quiet"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "data.oversample.factors.evn" in lines[0] and "did you mean 'even'" in lines[0]
