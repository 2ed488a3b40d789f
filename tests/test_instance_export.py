"""Instance segmentation export: the serving graph answers as predict does, and ``export --verify``.

Oracle: `Detections.detections`, the NumPy path predict and evaluate take (paste at the image's own
size, threshold, overlaps removed in score order). The graph must give the same detections per
image: identical classes, boxes within 1e-3 px, mask IoU >= 0.99. The model is a tiny untrained
Mask R-CNN with ``detection_score`` 0, so that every image has detections (all of them overlapping:
the overlap removal has work to do); the images are coins() crops at sizes other than the model's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import jpeg_bytes
from tests.test_maskrcnn_model import TINY, _coins_image
from tfvision import serving
from tfvision.export import main
from tfvision.models.maskrcnn.model import MaskRCNN
from tfvision.tasks import get_task
from tfvision.tasks.detections import BOX_TOLERANCE, MIN_MASK_IOU, Detections

SIZE = (64, 96)
CROPS = [(0, 0, 100, 130), (120, 150, 64, 96), (40, 200, 90, 70)]  # top, left, height, width


@pytest.fixture(scope="module")
def model():
    return MaskRCNN(2, SIZE, config={**TINY, "detection_score": 0.0}, seed=0, name="maskrcnn")


def crops() -> list[np.ndarray]:
    coins = _coins_image()
    return [np.repeat(coins[t:t + h, x:x + w, None], 3, axis=-1) for t, x, h, w in CROPS]


@pytest.mark.parametrize("mask_threshold,min_area", [(0.5, 0), (0.45, 60)])
def test_serving_graph_gives_predicts_detections(model, mask_threshold, min_area):
    output = Detections(mask_threshold, min_area)
    module = serving.ServingModule(model, image_size=SIZE, channels=3, output=output, class_names=["a", "b"])
    for image in crops():
        served = {k: v.numpy() for k, v in module.serve(tf.constant(image[None])).items()}
        got = output.split(served)
        result = output.compare(got, output.reference(model, image[None], SIZE, 1.0, output.rule(None, [])), 1e-4)
        assert result["passed"] and result["n_detections"] > 0, result
        assert result["max_box_diff"] <= BOX_TOLERANCE and result["min_mask_iou"] >= MIN_MASK_IOU
        # At the image's own size, each pixel owned once, empty slots empty.
        n = int(served["num_detections"][0])
        assert served["masks"].shape[2:] == image.shape[:2] and served["masks"].dtype == np.uint8
        assert served["masks"][0].sum(axis=0).max() <= 1
        assert (served["masks"][0, :n].sum(axis=(1, 2)) >= max(min_area, 1)).all()
        assert not served["masks"][0, n:].any() and (served["classes"][0, n:] == -1).all()
        assert (np.diff(served["scores"][0, :n]) <= 0).all()


def test_instance_task_answers_detections():
    task = get_task("instance_segmentation")
    assert task.activation == "detections" and isinstance(task.output, Detections)
    assert task.output.rule(None, ["cell"]) == {"kind": "instances", "mask_threshold": 0.5, "min_area": 0}
    assert set(task.unsupported_formats) == {"onnx", "tflite"}


def _fake_run(root, model):
    """A finished instance run: checkpoint, run.json, and validation images (PNG and JPEG)."""
    (root / "checkpoints").mkdir(parents=True)
    model.save(root / "checkpoints" / "best.keras")
    (root / "run.json").write_text(json.dumps({
        "task": "instance_segmentation", "activation": "detections", "class_names": ["a", "b"],
        "image_size": list(SIZE), "channels": 3}))
    (root / "images").mkdir()
    paths = []
    for i, image in enumerate(crops()):
        path = root / "images" / f"img{i}.{'jpg' if i % 2 else 'png'}"
        if i % 2:
            path.write_bytes(jpeg_bytes(image))
        else:
            Image.fromarray(image).save(path)
        paths.append(str(path))
    (root / "splits").mkdir()
    (root / "splits" / "val.csv").write_text("path\n" + "".join(f"{p}\n" for p in paths))
    return root


# The export command end to end (about 50 s on 2 loaded cores): with the user-path suites, -m configs.
@pytest.mark.configs
def test_export_verify_savedmodel_and_say_which_formats_cannot(model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", model)
    assert main(["--run", str(run), "--format", "onnx"]) == 2  # asked for: refused, with why
    assert "cannot be exported to onnx" in capsys.readouterr().err and not (run / "export").exists()

    assert main(["--run", str(run), "--format", "all", "--verify"]) == 0
    report = json.loads((run / "export" / "export_report.json").read_text())
    assert report["passed"] and len(report["images"]) == len(CROPS)
    assert [(e["format"], e["signature"]) for e in report["exports"]] == [
        ("savedmodel", "serving_default"), ("savedmodel", "serve_bytes")]
    for e in report["exports"]:
        assert e["passed"] and e["n_detections"] > 0 and e["classes_identical"], e
        assert e["max_box_diff"] <= BOX_TOLERANCE and e["min_mask_iou"] >= MIN_MASK_IOU, e
    assert {x["format"] for x in report["not_exported"]} == {"onnx", "tflite"}
    assert all("CombinedNonMaxSuppression" in x["reason"] for x in report["not_exported"])
    meta = json.loads((run / "export" / "export.json").read_text())
    assert meta["activation"] == "detections" and set(meta["outputs"]) == {
        "boxes", "scores", "classes", "num_detections", "masks"}
    # The SavedModel runs without tfvision's classes, at the request's own size.
    served = tf.saved_model.load(str(run / "export" / "savedmodel")).signatures["serving_default"](
        image=tf.constant(crops()[0][None]))
    assert served["masks"].shape[2:] == crops()[0].shape[:2]
