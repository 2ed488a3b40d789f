"""A trained digits run shared by the evaluate / predict tests (trained once per session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

_CACHE: dict[str, Path] = {}


def trained_run(tmp_path_factory, digits_root: Path) -> Path:
    """300 digits, small_cnn, a few steps; val 25 %, test 20 %. About 15 s on 2 CPU cores.

    Tests that write into a run (calibration.json, thresholds.json, eval/) use `copy_run`.
    """
    if "run" in _CACHE:
        return _CACHE["run"]
    from tfvision.train import main

    base = tmp_path_factory.mktemp("evalrun")
    root = base / "digits"
    (root / "images").mkdir(parents=True)
    frame = pd.read_csv(digits_root / "digits.csv").iloc[:300]
    for p in frame["path"]:
        shutil.copy(digits_root / p, root / p)
    frame.to_csv(root / "digits.csv", index=False)
    cfg = {
        "seed": 1,
        "data": {"source": "csv", "root": str(root), "csv": "digits.csv", "group_column": "group",
                 "image_size": 32, "split": {"method": "stratified", "val_fraction": 0.25, "test_fraction": 0.2}},
        "model": {"backbone": "small_cnn", "weights": None, "head": {"type": "linear"}},
        "augment": {"enabled": False},
        "train": {"batch_size": 16, "epochs": 2, "steps_per_epoch": 10, "monitor": "val_loss",
                  "tensorboard": False, "optimizer": {"name": "adam", "lr": 0.003},
                  "schedule": {"name": "constant"}},
    }
    (base / "cfg.json").write_text(json.dumps(cfg))
    run = base / "run"
    assert main(["--config", str(base / "cfg.json"), "--output-dir", str(run), "--quiet"]) == 0
    _settle_batchnorm(run)
    _CACHE["run"] = run
    return run


def _settle_batchnorm(run: Path) -> None:
    """Set BatchNorm's moving statistics to the training images' own.

    20 steps at Keras's BatchNorm momentum 0.99 leave the moving statistics ~80 %
    at their initial values, so the checkpoint's inference-mode predictions
    collapse onto one class. One full-batch pass at momentum 0 gives a model with
    varied, better-than-chance predictions, which the calibration and decision
    tests need. Only BatchNorm statistics change; the learnt weights do not.
    """
    import keras

    import tfvision.models.layers  # noqa: F401  (registers ImageNormalization)

    best = run / "checkpoints" / "best.keras"
    model = keras.saving.load_model(best, compile=False)
    bns = [x for x in model.get_layer("backbone").layers if isinstance(x, keras.layers.BatchNormalization)]
    for bn in bns:
        bn.momentum = 0.0
    model(load_images(pd.read_csv(run / "splits" / "train.csv")["path"]), training=True)
    for bn in bns:
        bn.momentum = 0.99
    model.save(best)


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a run folder (its splits still point at the shared images)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval", "calibration.json", "thresholds.json"))
    return dest


def load_images(paths, size=(32, 32)) -> np.ndarray:
    """Decode and resize independently of tfvision's pipeline: PNG -> float 0..255, bilinear."""
    import tensorflow as tf

    return np.stack([
        tf.image.resize(tf.cast(tf.io.decode_png(tf.io.read_file(str(p)), channels=3), tf.float32), size).numpy()
        for p in paths])


def model_logits(run: Path, images: np.ndarray) -> np.ndarray:
    import keras

    import tfvision.models.layers  # noqa: F401  (registers ImageNormalization)

    model = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    return np.asarray(model(images, training=False), np.float64)


def softmax(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- Dice / IoU oracle
# Plain numpy counts over all pixels, independent of tfvision.seg_metrics (which is checked against it).


def _overlaps(y_true, y_pred, num_classes, ignore_index):
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} pixels, y_pred {p.size}")
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    t, p = t[keep], p[keep]
    inter = np.bincount(t[t == p], minlength=num_classes)[:num_classes]
    n_true = np.bincount(t, minlength=num_classes)[:num_classes]
    n_pred = np.bincount(p[(p >= 0) & (p < num_classes)], minlength=num_classes)[:num_classes]
    return inter, n_true, n_pred


def dice_per_class(y_true_int, y_pred_int, num_classes: int, ignore_index=None) -> list[float | None]:
    """Dice of each class over all pixels of integer label arrays; None for an absent class.

    >>> dice_per_class([0, 0, 1, 1], [0, 1, 1, 1], 3)
    [0.666..., 0.8, None]
    """
    inter, n_true, n_pred = _overlaps(y_true_int, y_pred_int, num_classes, ignore_index)
    den = n_true + n_pred
    return [float(2 * i / d) if d else None for i, d in zip(inter, den, strict=True)]


def iou_per_class(y_true_int, y_pred_int, num_classes: int, ignore_index=None) -> list[float | None]:
    """IoU of each class over all pixels of integer label arrays; None for an absent class."""
    inter, n_true, n_pred = _overlaps(y_true_int, y_pred_int, num_classes, ignore_index)
    union = n_true + n_pred - inter
    return [float(i / u) if u else None for i, u in zip(inter, union, strict=True)]
