"""Predict: corrupt files, CSV layouts, saved temperature and thresholds, TTA, Grad-CAM, the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import jpeg_bytes, photo, run_cli
from tests.eval_helpers import copy_run, load_images, model_logits, softmax, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_root):
    return trained_run(tmp_path_factory, digits_root)


@pytest.fixture
def folder(run, tmp_path):
    """12 test digits (one in a subfolder), a truncated JPEG, a text file named .png, a README."""
    paths = pd.read_csv(run / "splits" / "test.csv")["path"].tolist()[:12]
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i, p in enumerate(paths):
        shutil.copy(p, d / ("sub" if i == 0 else "") / f"img{i:02d}.png")
    good = jpeg_bytes(photo(4, 32))
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (d / "notes.png").write_text("this is not an image")
    (d / "README.txt").write_text("not listed: not an image suffix")
    return d


def test_folder_with_corrupt_files_still_predicts_the_rest(run, folder, tmp_path):
    from tfvision.predict import main

    out = tmp_path / "preds.csv"
    assert main(["--run", str(run), "--input-dir", str(folder), "--output", str(out)]) == 0
    frame = pd.read_csv(out, dtype={"pred": str}, keep_default_na=False)
    names = json.loads((run / "run.json").read_text())["class_names"]
    assert list(frame.columns) == ["path", "pred", *[f"prob_{c}" for c in names], "error"]
    assert len(frame) == 14  # 12 digits + 2 broken; README.txt is not an image
    bad = frame[frame["error"] != ""]
    assert sorted(p.rsplit("/", 1)[-1] for p in bad["path"]) == ["notes.png", "truncated.jpg"]
    assert (bad["pred"] == "").all()
    good = frame[frame["error"] == ""]
    probs = good[[f"prob_{c}" for c in names]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # No calibration.json / thresholds.json yet: plain softmax and argmax, straight from the model.
    expected = softmax(model_logits(run, load_images(good["path"])))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert good["pred"].tolist() == [names[i] for i in expected.argmax(1)]


def test_saved_temperature_and_thresholds_are_used(run, folder, tmp_path):
    from tfvision.evaluate import evaluate
    from tfvision.predict import main

    r = copy_run(run, tmp_path / "run")
    evaluate(r, "val", tta="identity,hflip", ordinal=True, match_distribution=True)
    t = json.loads((r / "calibration.json").read_text())["temperature"]
    rule = json.loads((r / "thresholds.json").read_text())
    assert rule["kind"] == "ordinal" and rule["method"] == "distribution" and rule["tta"] == ["identity", "hflip"]
    names = json.loads((r / "run.json").read_text())["class_names"]

    # T minimises the val NLL of the TTA-averaged probabilities, as predict outputs them.
    val = pd.read_csv(r / "splits" / "val.csv", dtype=str)
    vy = np.array([names.index(v) for v in val["label"]])
    x = load_images(val["path"])
    z = [model_logits(r, x), model_logits(r, x[:, :, ::-1])]

    def nll(temp):
        p = np.mean([softmax(zi, temp) for zi in z], axis=0)
        return -np.mean(np.log(p[np.arange(len(vy)), vy]))

    assert nll(t) <= min(nll(t * 1.1), nll(t / 1.1))

    out = tmp_path / "preds.csv"
    assert main(["--run", str(r), "--input-dir", str(folder), "--output", str(out), "--tta", "2"]) == 0
    frame = pd.read_csv(out, dtype={"pred": str}, keep_default_na=False)
    good = frame[frame["error"] == ""]
    x = load_images(good["path"])
    expected = np.mean([softmax(model_logits(r, v), t) for v in (x, x[:, :, ::-1])], axis=0)
    np.testing.assert_allclose(good[[f"prob_{c}" for c in names]].to_numpy(float), expected, atol=1e-5)
    grades = np.digitize(expected @ np.arange(len(names)), rule["cuts"])
    assert good["pred"].tolist() == [names[i] for i in grades]


def test_kaggle_layouts(run, folder, tmp_path):
    from tfvision.predict import main

    names = json.loads((run / "run.json").read_text())["class_names"]
    out = tmp_path / "sub.csv"
    assert main(["--run", str(run), "--input-dir", str(folder), "--output", str(out),
                 "--format", "kaggle-class", "--id-column", "image_id", "--label-column", "digit"]) == 0
    frame = pd.read_csv(out, dtype=str)
    assert list(frame.columns) == ["image_id", "digit"]
    assert sorted(frame["image_id"]) == [f"img{i:02d}" for i in range(12)]  # unreadable ones left out
    assert set(frame["digit"]) <= set(names)
    assert main(["--run", str(run), "--input-dir", str(folder), "--output", str(out), "--format", "kaggle-probs"]) == 0
    frame = pd.read_csv(out, dtype={"id": str})
    assert list(frame.columns) == ["id", *names] and len(frame) == 12
    np.testing.assert_allclose(frame[names].sum(axis=1), 1.0, atol=1e-6)


def test_tta_averages_flipped_probabilities(run):
    from tfvision.inference import Ensemble, load_run, predict_files, tta_views

    paths = pd.read_csv(run / "splits" / "val.csv")["path"].tolist()[:10]
    probs, _ = predict_files(Ensemble([load_run(run)], tta_views("identity,hflip,vflip")), paths)
    x = load_images(paths)
    manual = np.mean([softmax(model_logits(run, v)) for v in (x, x[:, :, ::-1], x[:, ::-1])], axis=0)
    np.testing.assert_allclose(probs, manual, atol=1e-5)
    assert tta_views(2) == ["identity", "hflip"] and len(tta_views(11)) == 11
    all_views, _ = predict_files(Ensemble([load_run(run)], tta_views(11)), paths)  # crops and scales run
    np.testing.assert_allclose(all_views.sum(1), 1.0, atol=1e-6)


def test_single_image_prints_top_classes_and_gradcam_overlays(run, folder, tmp_path, capsys):
    from tfvision.predict import main

    image = folder / "img03.png"
    assert main(["--run", str(run), "--image", str(image), "--top", "3", "--gradcam", str(tmp_path / "cam")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{image}: ") and len(lines) == 4
    probs = [float(line.split()[-1]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    overlay = Image.open(tmp_path / "cam" / "img03_gradcam.png")
    assert overlay.size == Image.open(image).size and overlay.mode == "RGB"

    assert main(["--run", str(run), "--image", str(folder / "truncated.jpg")]) == 2
    assert "truncated.jpg" in capsys.readouterr().err


def test_cli_wrapper(run, folder, tmp_path):
    r = run_cli("tools/predict.py", "--run", str(run), "--input-dir", str(folder), "--output",
                str(tmp_path / "p.csv"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "notes.png" in r.stderr and (tmp_path / "p.csv").is_file()
    assert "unreadable image" in r.stderr


def test_not_a_run_folder_is_exit_2(tmp_path, capsys):
    from tfvision.predict import main

    assert main(["--run", str(tmp_path), "--image", "x.png"]) == 2
    assert "not a finished run folder" in capsys.readouterr().err
