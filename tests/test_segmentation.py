"""Segmentation end to end on real volumes: slicing, patient-wise split, U-Net training, NIfTI out.

Data: nilearn's bundled MNI152 template with its brain, grey- and white-matter
masks (offline), written as NIfTI volumes of three "patients".
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

from tests import layouts

nib = pytest.importorskip("nibabel")
pytest.importorskip("nilearn.datasets")  # layouts.mni_volumes reads its bundled MNI152


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    """Three patients: the template and two flipped/shifted copies; labels 0 bg, 1 brain."""
    return layouts.mni_volumes(tmp_path_factory.mktemp("mni")).root


def _config(root, tmp_path, **over):
    cfg = {
        "task": "segmentation", "seed": 0,
        "data": {"source": "volumes", "root": str(root), "csv": "volumes.csv", "path_column": "image",
                 "mask_column": "mask", "group_column": "patient", "class_names": ["background", "brain"],
                 "windows": ["minmax"], "channels": 1, "image_size": 48, "empty_slices": "drop",
                 "normalization": "none", "split": {"method": "grouped", "val_fraction": 0.34}},
        "model": {"backbone": "unet", "weights": None,
                  "unet": {"base_filters": 8, "depth": 3, "upsampling": "bilinear", "norm": "group", "groups": 4}},
        "augment": {"params": {"crop_scale": [0.85, 1.0], "hflip": 0.5, "affine_p": 0.3, "rotate": 8.0,
                               "shift": 0.05, "scale": 0.05, "color_p": 0.3, "saturation": 0.0, "hue": 0.0,
                               "noise_p": 0.0, "elastic_p": 0.3, "elastic_alpha": 2.0}},
        "train": {"epochs": 6, "batch_size": 8, "steps_per_epoch": 12, "monitor": "val_dice",
                  "tensorboard": False, "optimizer": {"name": "adam", "lr": 0.01},
                  "schedule": {"name": "cosine"}, "loss": {"name": "ce_dice", "class_weights": "sqrt_inverse"}},
    }
    for k, v in over.items():
        cfg[k].update(v)
    p = tmp_path / "seg.json"
    p.write_text(json.dumps(cfg))
    return p


def test_volumes_become_integer_slices_with_patient_groups(mni, tmp_path):
    from PIL import Image

    from tfvision.config_loader import load_config
    from tfvision.data.sources import load_samples

    cfg = load_config(_config(mni, tmp_path))
    table = load_samples(cfg.data)
    frame = table.frame
    labels = np.asarray(nib.load(mni / "p0_seg.nii.gz").dataobj)
    assert (frame["group"] == "patient0").sum() == int((labels.reshape(-1, 40).max(0) > 0).sum())
    assert set(frame["group"]) == {"patient0", "patient1", "patient2"}
    mask = np.asarray(Image.open(frame["mask"][0]))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    img = np.asarray(Image.open(frame["path"][0]))
    assert img.dtype in (np.uint16, np.int32) and img.max() > 1000  # 16-bit windowed intensities
    again = load_samples(cfg.data)  # cached: same files, no rewrite
    assert again.frame["path"].tolist() == frame["path"].tolist()


def test_unet_learns_the_brain_mask_and_writes_a_nifti(mni, tmp_path):
    from tests.eval_helpers import dice_per_class
    from tfvision.medical.volume_inference import predict_volume
    from tfvision.train import main

    run = tmp_path / "run"
    assert main(["--config", str(_config(mni, tmp_path)), "--output-dir", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val_dice_macro", "val_dice_per_class", "val_iou_macro"} <= set(metrics)
    assert set(metrics["val_dice_per_class"]) == {"background", "brain"}
    splits = pd.read_csv(run / "splits" / "train.csv").merge(pd.read_csv(run / "splits" / "val.csv"), on="group")
    assert splits.empty  # no patient on both sides

    info = json.loads((run / "run.json").read_text())
    model = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    out = predict_volume(model, info, mni / "p0_ct.nii.gz", tmp_path / "p0_pred.nii.gz")
    from tfvision.predict import main as predict_main

    cli_out = tmp_path / "cli_mask.nii.gz"
    assert predict_main(["--run", str(run), "--volume", str(mni / "p0_ct.nii.gz"), "--output", str(cli_out)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(cli_out).dataobj), np.asarray(nib.load(out).dataobj))

    from tfvision.evaluate import evaluate

    scores = json.loads((evaluate(run, "val") / "metrics.json").read_text())
    assert scores["dice_macro"] == pytest.approx(metrics["val_dice_macro"], abs=1e-9)  # same checkpoint, same data
    pred, src = nib.load(out), nib.load(mni / "p0_ct.nii.gz")
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine)
    truth = np.asarray(nib.load(mni / "p0_seg.nii.gz").dataobj)
    got = np.asarray(pred.dataobj)
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
    assert dice_per_class(truth, got, 2)[1] > 0.9  # brain Dice on a real volume


def test_mixup_on_segmentation_is_refused_before_the_run_folder(tmp_path, capsys):
    from tfvision.train import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "slices.csv").write_text("path,mask\n")
    cfg = {"task": "segmentation", "data": {"source": "csv", "root": str(tmp_path / "data"), "csv": "slices.csv",
                                            "mask_column": "mask", "class_names": ["background", "lesion"]},
           "model": {"backbone": "unet", "weights": None},
           "augment": {"mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}}}
    p = tmp_path / "seg.json"
    p.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    assert main(["--config", str(p), "--output-dir", str(run)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "augment.mix.mixup_alpha" in lines[0] and "CutMix" in lines[0], lines
    assert not run.exists()


def test_overlays_draw_each_class_where_it_is(tmp_path):
    """plots.mask_overlays, as the segmentation and instance reports use it: each mask is drawn
    where it is, at its size, in its panel only; a panel with nothing predicted stays grey."""
    from PIL import Image
    from scipy import ndimage

    from tfvision.plots import mask_overlays

    image = np.full((40, 40, 1), 128.0)
    truth = np.zeros((2, 40, 40), bool)
    truth[0, 5:15, 5:15] = True  # class 1: 10 x 10, top left
    truth[1, 25:35, 20:35] = True  # class 2: 10 x 15, bottom right
    path = mask_overlays([(image, [("ground truth", truth, None), ("predicted", np.zeros_like(truth), None)])],
                         tmp_path / "o.png")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    coloured = np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).sum(axis=-1) > 30
    left, right = coloured[:, : rgb.shape[1] // 2], coloured[:, rgb.shape[1] // 2:]
    assert not right.any()
    blobs, n = ndimage.label(left)
    assert n == 2
    (y1, x1), (y2, x2) = ndimage.center_of_mass(left, blobs, [1, 2])
    assert y1 < y2 and x1 < x2
    areas = ndimage.sum(left, blobs, [1, 2])
    assert areas[0] / areas[1] == pytest.approx(100 / 150, rel=0.15)
