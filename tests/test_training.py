"""End-to-end training: run folder contents, metrics against scikit-learn, resume, mirrored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from tests.conftest import REPO, jpeg_bytes, photo, run_cli


def config(root, tmp_path, **train):
    cfg = {
        "seed": 1,
        "data": {"source": "csv", "root": str(root), "csv": "digits.csv", "group_column": "group",
                 "image_size": 32, "split": {"method": "stratified", "val_fraction": 0.25}},
        "model": {"backbone": "small_cnn", "weights": None, "head": {"type": "mlp", "hidden": [32]}},
        "augment": {"mix": {"mixup_alpha": 0.2, "p": 0.5}},
        "train": {"batch_size": 16, "steps_per_epoch": 4, "monitor": "val_accuracy", "tensorboard": False,
                  "optimizer": {"name": "adamw", "lr": 0.003, "backbone_lr_mult": 0.5},
                  "schedule": {"name": "onecycle"}, **train},
    }
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    return p


def test_short_run_fills_the_run_folder_and_metrics_match_sklearn(small_digits, tmp_path):
    from tfvision.train import main

    cfg = config(small_digits, tmp_path, phases=[{"epochs": 1, "trainable": "head"},
                                                  {"epochs": 2, "trainable": "all", "lr": 0.002}],
                 loss={"class_weights": "sqrt_inverse", "label_smoothing": 0.1})
    run = tmp_path / "run"
    assert main(["--config", str(cfg), "--output-dir", str(run), "--quiet"]) == 0
    for name in ("config.json", "run.json", "data_report.json", "history.csv", "metrics.json",
                 "training_curves.png", "splits/train.csv", "splits/val.csv", "checkpoints/best.keras",
                 "checkpoints/last.keras", "checkpoints/phase0.weights.h5", "checkpoints/phase1.weights.h5"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2] and "lr" in history and "val_accuracy" in history
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    assert json.loads((run / "data_report.json").read_text())["rejected"] == []

    # Oracle: recompute the reported metrics with scikit-learn from the best checkpoint.
    metrics = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "run.json").read_text())
    val = pd.read_csv(run / "splits" / "val.csv", dtype=str)
    model = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    import tensorflow as tf

    images = np.stack([
        tf.image.resize(tf.cast(tf.io.decode_png(tf.io.read_file(p), channels=3), tf.float32), (32, 32)).numpy()
        for p in val["path"]])
    logits = np.asarray(model(images))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = np.array([info["class_names"].index(v) for v in val["label"]])
    pred = probs.argmax(1)
    assert metrics["val_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert metrics["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-6)
    assert metrics["val_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert metrics["val_roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-4)


def test_bad_files_are_reported_and_too_many_stop_the_run(small_digits, tmp_path):
    frame = pd.read_csv(small_digits / "digits.csv")
    (small_digits / frame["path"][0]).write_bytes(b"")  # empty
    good = jpeg_bytes(photo(2, 32))
    (small_digits / frame["path"][1]).write_bytes(good[: len(good) // 2])  # truncated JPEG behind .png
    cfg = config(small_digits, tmp_path)
    run = tmp_path / "check"
    r = run_cli("-m", "tfvision.train", "--config", str(cfg), "--output-dir", str(run), "--check-data",
                "--set", "data.max_bad_fraction=0.05")
    assert r.returncode == 0, r.stderr
    report = json.loads((run / "data_report.json").read_text())
    reasons = {os.path.basename(x["path"]): x["reason"] for x in report["rejected"]}
    assert reasons == {os.path.basename(frame["path"][0]): "empty file",
                       os.path.basename(frame["path"][1]): reasons[os.path.basename(frame["path"][1])]}
    assert report["n_samples"] == len(frame) - 2
    r = run_cli("-m", "tfvision.train", "--config", str(cfg), "--output-dir", str(tmp_path / "strict"),
                "--check-data", "--set", "data.max_bad_fraction=0.001")
    assert r.returncode == 2 and "data.max_bad_fraction" in r.stderr


def test_unchecked_run_skips_a_val_file_broken_after_listing(small_digits, tmp_path):
    from tfvision.train import main

    cfg = config(small_digits, tmp_path, epochs=1, steps_per_epoch=2)
    run = tmp_path / "run"
    args = ["--config", str(cfg), "--output-dir", str(run), "--quiet", "--set", "data.check_files=false"]
    assert main([*args, "--check-data"]) == 0  # lists and splits; checks nothing
    val = pd.read_csv(run / "splits" / "val.csv")
    broken = val["path"][3]
    with open(broken, "wb") as f:
        f.write(np.random.default_rng(0).bytes(300))
    assert main(args) == 0  # resumes the listed run
    report = json.loads((run / "data_report.json").read_text())
    assert [r["path"] for r in report["rejected"]] == [broken] and report["rejected"][0]["reason"]
    assert json.loads((run / "metrics.json").read_text())["n_val"] == len(val) - 1


def test_mixed_precision_logs_the_rate_each_group_trains_at(small_digits, tmp_path):
    from tfvision.config_loader import load_config
    from tfvision.schedules import build_schedule
    from tfvision.train import main

    steps, phases = 3, [{"epochs": 1, "trainable": "head"}, {"epochs": 2, "trainable": "all", "lr": 0.002}]
    cfg = config(small_digits, tmp_path, phases=phases, steps_per_epoch=steps, mixed_precision="mixed_float16")
    run = tmp_path / "run"
    try:
        assert main(["--config", str(cfg), "--output-dir", str(run), "--quiet"]) == 0
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the run set it for this process
    history = pd.read_csv(run / "history.csv")
    # Oracle: each phase's schedule object at the step its fresh optimizer reached by the epoch's end.
    sched = load_config(cfg).train.schedule
    head, full = build_schedule(sched, 0.003, steps, steps), build_schedule(sched, 0.002, 2 * steps, steps)
    want = [float(head(steps)), float(full(steps)), float(full(2 * steps))]
    np.testing.assert_allclose(history["lr"], want, rtol=1e-5)
    # The backbone: frozen in the head phase, then at backbone_lr_mult (0.5) of the head's rate.
    np.testing.assert_allclose(history["lr_backbone"], [0.0, 0.5 * want[1], 0.5 * want[2]], rtol=1e-5)
    assert (run / "training_curves.png").stat().st_size > 0


def test_best_checkpoint_and_best_json_stay_a_pair_across_a_kill(tmp_path, monkeypatch):
    from tfvision import callbacks
    from tfvision.callbacks import AtomicCheckpoint

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

    def epoch(cb, number, score):  # the weights name the epoch that made them
        model.set_weights([np.full((1, 1), number, np.float32), np.zeros(1, np.float32)])
        cb.set_model(model)
        cb.on_epoch_end(number - 1, {"val_accuracy": score})

    def saved_epoch():  # what evaluate and export read
        return float(keras.saving.load_model(tmp_path / "best.keras", compile=False).get_weights()[0][0, 0])

    epoch(AtomicCheckpoint(tmp_path, "val_accuracy"), 1, 0.5)
    real_write = callbacks.write_json

    def killed(path, data):
        if path.name == "best.json":
            raise SystemExit("killed")  # the process dies between best.keras and best.json
        real_write(path, data)

    monkeypatch.setattr(callbacks, "write_json", killed)
    with pytest.raises(SystemExit):
        epoch(AtomicCheckpoint(tmp_path, "val_accuracy"), 2, 0.9)
    monkeypatch.setattr(callbacks, "write_json", real_write)
    assert saved_epoch() == 2.0  # the better model did land

    resumed = AtomicCheckpoint(tmp_path, "val_accuracy")
    assert resumed.best == 0.9
    assert json.loads((tmp_path / "best.json").read_text()) == {"monitor": "val_accuracy", "value": 0.9, "epoch": 2}
    epoch(resumed, 3, 0.7)  # worse than the saved best: must not replace it
    assert saved_epoch() == 2.0
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 2
    last = keras.saving.load_model(tmp_path / "last.keras", compile=False)  # every epoch's own weights
    assert float(last.get_weights()[0][0, 0]) == 3.0
    assert callbacks.checkpoint_record(tmp_path / "last.keras") is None  # the record is best's alone


def test_killed_run_resumes_where_it_stopped(small_digits, tmp_path):
    cfg = config(small_digits, tmp_path, epochs=4, steps_per_epoch=12)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tfvision.train", "--config", str(cfg), "--output-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meta = run / "backup" / "phase0" / "training_metadata.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and json.loads(meta.read_text() or "{}").get("epoch", 0) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "run finished before it could be killed"
    assert not (run / "metrics.json").exists()
    from tfvision.models import layers  # noqa: F401  (registers tfvision's layers, as predict's loader does)

    keras.saving.load_model(run / "checkpoints" / "last.keras", compile=False)  # never half-written

    r = run_cli(*cmd[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "resuming" in out and "Epoch 1/4" not in out and "Epoch 4/4" in out
    epochs = pd.read_csv(run / "history.csv")["epoch"].drop_duplicates().tolist()
    assert epochs == [0, 1, 2, 3]
    assert (run / "metrics.json").exists() and not (run / "backup" / "phase0").exists()


def test_rerun_with_a_different_config_refuses_the_folder(small_digits, tmp_path):
    from tfvision.train import main

    cfg = config(small_digits, tmp_path, epochs=1)
    run = tmp_path / "run"
    assert main(["--config", str(cfg), "--output-dir", str(run), "--check-data"]) == 0
    assert main(["--config", str(cfg), "--output-dir", str(run), "--check-data", "--set", "seed=5"]) == 2


MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfvision.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_mirrored_training_on_two_logical_cpus(small_digits, tmp_path):
    cfg = config(small_digits, tmp_path, epochs=1, strategy="mirrored")
    run = tmp_path / "run"
    r = run_cli("-c", MIRRORED, "--config", str(cfg), "--output-dir", str(run), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["replicas"] == 2
    assert json.loads((run / "metrics.json").read_text())["val_accuracy"] is not None


@pytest.mark.slow
def test_demo_config_reaches_090(tmp_path):
    r = run_cli("-m", "tfvision.train", "--config", "configs/demo.json", "--output-dir", str(tmp_path / "demo"),
                "--set", f"data.root={tmp_path / 'digits'}", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["val_accuracy"] >= 0.90


def test_progressive_resizing_plateau_focal_tiers_and_dataset_norm(small_digits, tmp_path):
    """One short run through the less common switches; each leaves a trace in the run folder."""
    from tfvision.train import main

    cfg = config(small_digits, tmp_path,
                 phases=[{"epochs": 1, "trainable": "all", "image_size": 24},
                         {"epochs": 2, "trainable": "last_n_blocks", "n_blocks": 2, "image_size": 32}],
                 optimizer={"name": "sgd", "lr": 0.05, "backbone_lr_mult": 0.5},
                 schedule={"name": "plateau", "plateau_patience": 0, "plateau_factor": 0.5},
                 loss={"name": "focal", "class_weights": "inverse"},
                 early_stopping={"patience": 5}, monitor="val_loss")
    raw = json.loads(cfg.read_text())
    raw["data"]["normalization"] = "dataset"
    raw["augment"]["tiers"] = {"enabled": True, "thresholds": [25, 30]}
    cfg.write_text(json.dumps(raw))
    run = tmp_path / "run"
    assert main(["--config", str(cfg), "--output-dir", str(run), "--quiet"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["normalization"]["mean"][0] > 1.0  # measured on the digits, not ImageNet's
    assert set(info["class_tiers"]) <= {0, 1, 2} and len(info["class_tiers"]) == 10
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    assert (history["lr"] <= 0.05 + 1e-9).all()


def test_early_stopping_patience_survives_a_restart(tmp_path):
    # Oracle: Keras's own EarlyStopping on the same losses, never interrupted.
    from tfvision.callbacks import ResumableEarlyStopping

    losses = [1.0, 0.8, 0.85, 0.9, 0.79, 0.95, 0.97, 0.99, 1.2]

    def epochs_until_stop(callbacks_by_epoch):
        for epoch, loss in enumerate(losses):
            cb = callbacks_by_epoch(epoch)
            cb.on_epoch_end(epoch, {"val_loss": loss})
            if cb.model.stop_training:
                return epoch
        return None

    def attach(cb):
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.stop_training = False
        cb.set_model(model)
        cb.on_train_begin()
        return cb

    kw = dict(monitor="val_loss", patience=3, min_delta=0.005, mode="min")
    keras_cb = attach(keras.callbacks.EarlyStopping(**kw))
    want = epochs_until_stop(lambda epoch: keras_cb)
    assert want == 7

    state = tmp_path / "backup" / "phase0-early_stopping.json"
    current = {}

    def restarted_after_each_epoch(epoch):  # a kill and a resume before every epoch
        current["cb"] = attach(ResumableEarlyStopping(state, **kw))
        return current["cb"]

    assert epochs_until_stop(restarted_after_each_epoch) == want
    assert json.loads(state.read_text())["state"]["wait"] == 3
    current["cb"].on_train_end()  # the phase ended: its state goes, a later phase starts fresh
    assert not state.exists()


def test_plateau_patience_survives_a_restart(tmp_path):
    # Oracle: Keras's own ReduceLROnPlateau on the same losses, never interrupted. The
    # optimizer (and so the learning rate) carries over, as BackupAndRestore restores it.
    from tfvision.callbacks import ResumablePlateau

    losses = [1.0, 0.9, 0.95, 0.96, 0.97, 0.89, 0.99, 0.98, 0.97, 0.99]
    kw = dict(monitor="val_loss", factor=0.5, patience=2, cooldown=1, mode="min")

    def model():
        m = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return m

    def rate(m):
        return round(float(m.optimizer.learning_rate), 6)

    m, cb, want = model(), keras.callbacks.ReduceLROnPlateau(**kw), []
    cb.set_model(m)
    cb.on_train_begin()
    for epoch, loss in enumerate(losses):
        cb.on_epoch_end(epoch, {"val_loss": loss})
        want.append(rate(m))
    assert want[0] == 0.1 and min(want) < 0.05  # it did reduce, more than once

    m, got = model(), []
    for epoch, loss in enumerate(losses):  # a kill and a resume before every epoch
        cb = ResumablePlateau(tmp_path / "phase0-plateau.json", **kw)
        cb.set_model(m)
        cb.on_train_begin()
        cb.on_epoch_end(epoch, {"val_loss": loss})
        got.append(rate(m))
    assert got == want
