"""Every shipped config, run through the real CLI the way a user runs it (issue 12).

All shipped configs but demo.json once crashed at the end of epoch 1 after ``pip install .``
and no test noticed, because every test started from a demo-like config. Here each file in
configs/ trains in a subprocess (``python -m tfvision.train --config configs/X.json``) on a tiny
dataset in that config's own on-disk layout (tests/layouts.py), then goes through ``evaluate``,
``predict`` and ``export --verify``.

The ``--set`` overrides may only make the work smaller (data location, epochs, image size, batch
size, a small backbone without pretrained weights). Every feature a config turns on (TensorBoard,
mixed precision, oversampling, augmentation tiers, CLAHE, CT windows, MixUp/CutMix, class
weights, early stopping, ...) stays on: `test_overrides_only_shrink_the_work` and
`test_train` check that against the shipped file.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests import layouts
from tests.conftest import REPO, checksums, run_cli

pytestmark = pytest.mark.configs  # a suite of its own: CI runs it, plain `pytest` does not

CONFIGS = REPO / "configs"
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.json"))
CHEXPERT_CLASSES = [  # the 14 findings of CheXpert's CSVs (tfvision.data.sources.CHEXPERT_CLASSES)
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]


def _chexpert(base):
    # Two findings rarer than the config's rare_below (0.1), so oversampling has work to do.
    return layouts.chexpert(base, CHEXPERT_CLASSES, n_patients=20, n_valid=4, rates={"Fracture": 0.06, "Lung Lesion": 0.06})


def _nsclc(base):
    # Seven patients: the config's grouped 15 % test and 15 % val holdouts need 7 folds of patients.
    return layouts.mni_volumes(base, n_patients=7, z=(30, 42), organs=True)


# What makes a run small. model.backbone "small_cnn" is the registry's smallest; as a U-Net
# encoder it down-samples 3 times, hence three decoder blocks (the shipped list's last three).
SMALL = {"data.image_size": 64, "train.batch_size": 16, "model.backbone": "small_cnn", "model.weights": None}

# Mask R-CNN at a CPU-test size: every number at or below Model Garden's defaults (checked below).
TINY_MASKRCNN = {"max_level": 4, "fpn_filters": 16, "box_fc_dims": 32, "mask_filters": 16, "mask_convs": 2,
                 "rpn_samples": 64, "roi_samples": 32, "max_mask_rois": 8, "rpn_pre_nms_top_k_train": 200,
                 "rpn_post_nms_top_k_train": 100, "rpn_pre_nms_top_k_test": 200, "rpn_post_nms_top_k_test": 100}

CASES = {  # config file -> (layout builder, overrides besides data.root and one epoch per phase)
    "demo.json": (layouts.sklearn_digits, {}),  # already small_cnn at 32 px
    "ham10000.json": (layouts.ham10000, SMALL),
    "rakuten.json": (layouts.rakuten, SMALL),
    "chexpert.json": (_chexpert, SMALL),
    "nsclc_radiomics_unet.json": (_nsclc, {**SMALL, "model.unet.decoder_filters": [64, 32, 16]}),
    "aptos_regression.json": (layouts.aptos, SMALL),
    "sartorius_maskrcnn.json": (layouts.sartorius, {**SMALL, "data.image_size": [64, 64], "train.batch_size": 2,
                                                    "instance_segmentation.maskrcnn": TINY_MASKRCNN}),
    "coco_instances.json": (layouts.coco_instances, {**SMALL, "data.image_size": [64, 64], "train.batch_size": 4,
                                                     "instance_segmentation.maskrcnn": TINY_MASKRCNN}),
}

# The only keys a case may --set. Anything else could switch a feature off and hide its crash.
ALLOWED_OVERRIDES = {
    "data.root", "train.phases", "data.image_size", "train.batch_size", "model.backbone", "model.weights",
    "model.unet.decoder_filters", "data.split.val_fraction", "data.split.test_fraction",
    "instance_segmentation.maskrcnn",
}

METRICS = {  # metrics.json keys per task, written by training from the best checkpoint
    "classification": {"val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_roc_auc"},
    "multilabel": {"val_roc_auc", "val_pr_auc", "val_macro_f1", "val_roc_auc_per_class"},
    "segmentation": {"val_dice_macro", "val_dice_per_class", "val_iou_macro", "val_iou_per_class"},
    "regression": {"val_quadratic_kappa", "val_mae", "val_rmse"},
    "instance_segmentation": {"val_segm_ap", "val_segm_ap50", "val_bbox_ap", "val_iou_sweep"},
}
EVAL_METRICS = {  # eval/val/metrics.json keys per task, written by evaluate
    "classification": {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "ece", "confusion_matrix",
                       "per_class"},
    "multilabel": {"roc_auc_macro", "pr_auc_macro", "macro_f1", "per_class"},
    "segmentation": {"dice_macro", "dice_per_class", "iou_macro", "iou_per_class"},
    "regression": {"quadratic_kappa", "accuracy", "grade_mae", "mae", "rmse", "confusion_matrix"},
    "instance_segmentation": {"segm_ap", "segm_ap50", "segm_ap75", "bbox_ap", "iou_sweep", "f2_sweep"},
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}  # the layouts' images, listed here independently of tfvision (the oracle)


def shipped(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def overrides(name: str, root: Path) -> dict:
    """The case's --set values: its own, the data folder, and one epoch per shipped phase (every
    phase kept, with its trainable layers and learning rate, so staged unfreezing still runs)."""
    phases = [{**p, "epochs": 1} for p in shipped(name)["train"]["phases"]]
    over = {"data.root": str(root), "train.phases": phases, **CASES[name][1]}
    assert set(over) <= ALLOWED_OVERRIDES, f"{name}: --set outside ALLOWED_OVERRIDES: {set(over) - ALLOWED_OVERRIDES}"
    return over


def get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) for every non-dict value of a nested dict."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from leaves(v, key + ".")
        else:
            yield key, v


def test_every_shipped_config_has_a_case():
    missing, stale = set(SHIPPED) - set(CASES), set(CASES) - set(SHIPPED)
    assert not missing, (f"configs {sorted(missing)} have no case in tests/test_configs.py: add a layout "
                         "builder (tests/layouts.py) and the overrides that make it small to CASES")
    assert not stale, f"CASES names configs that are not in configs/: {sorted(stale)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_overrides_only_shrink_the_work(name, tmp_path):
    over = overrides(name, tmp_path)  # asserts that every key is in ALLOWED_OVERRIDES
    cfg = shipped(name)
    for key, value in over.items():
        old = _get_or_none(cfg, key)
        if key == "train.phases":  # same phases, same settings, fewer epochs
            assert len(value) == len(old)
            for new, was in zip(value, old, strict=True):
                assert {k: v for k, v in new.items() if k != "epochs"} == {k: v for k, v in was.items() if k != "epochs"}
                assert new["epochs"] <= was["epochs"]
        elif key == "model.weights":
            assert value is None
        elif key == "model.backbone":
            assert value == "small_cnn"
        elif key == "instance_segmentation.maskrcnn":  # narrower and fewer than the defaults, nothing else
            from tfvision.models.maskrcnn.config import MaskRCNNConfig

            defaults = MaskRCNNConfig()
            assert all(v <= getattr(defaults, k) for k, v in value.items()), value
        elif key in ("data.image_size", "train.batch_size"):
            assert np.all(np.asarray(value) <= np.asarray(old or value))
        elif key == "model.unet.decoder_filters":
            assert len(value) <= len(old) and all(a <= b for a, b in zip(value, old[-len(value):], strict=True))
        # data.root and the split fractions (which tiny data may need larger) have no direction.


def _get_or_none(tree, key):
    try:
        return get(tree, key)
    except KeyError:
        return None


# --------------------------------------------------------------------------- the runs


class Run:
    def __init__(self, name, layout, run_dir, base, env):
        self.name, self.layout, self.dir, self.base, self.env = name, layout, run_dir, base, env
        self.config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        self.info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}

    def check_per_class(self, metrics: dict):
        """Every per-class table names exactly the run's classes."""
        for key, value in metrics.items():
            if key.endswith("per_class"):
                assert set(value) == set(self.info["class_names"]), f"{key}: {sorted(value)}"

    def cli(self, *args, timeout=600):
        t = time.perf_counter()
        out = run_cli(*args, timeout=timeout, env=self.env)
        print(f"{self.name}: {args[1]} took {time.perf_counter() - t:.1f} s")
        assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}:\n{out.stderr[-4000:]}"
        return out


@pytest.fixture(scope="module", params=SHIPPED)
def trained(request, tmp_path_factory):
    """Train one shipped config through the CLI on its own tiny layout; the other tests reuse the run."""
    name = request.param
    if name not in CASES:
        pytest.skip(f"{name} has no case (test_every_shipped_config_has_a_case fails)")
    base = tmp_path_factory.mktemp(Path(name).stem)
    layout = CASES[name][0](base / "data")
    # The data is read-only, as on Kaggle (/kaggle/input): test_inputs_unchanged compares its
    # checksums after every command (as root, chmod alone stops no write). The demo's data is
    # built by the run itself (data.prepare), so it has no input to protect.
    inputs = checksums(layout.root) if layout.root.exists() else None
    modes = _make_read_only(layout.root)
    # Derived data (volume slices, the predict ledger) goes to the user cache: keep it in tmp.
    env = {"TFVISION_CACHE": str(base / "cache"), "MPLBACKEND": "Agg"}
    run_dir = base / "run"
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides(name, layout.root).items()]
    t = time.perf_counter()
    proc = run_cli("-m", "tfvision.train", "--config", f"configs/{name}", "--output-dir", str(run_dir), "--quiet",
                   "--set", *sets, timeout=900, env=env)
    print(f"{name}: tfvision.train took {time.perf_counter() - t:.1f} s")
    run = Run(name, layout, run_dir, base, env)
    run.inputs = inputs
    yield run, proc
    for path, mode in modes.items():
        path.chmod(mode)


def _make_read_only(root: Path) -> dict:
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]} if root.exists() else {}
    for path, mode in modes.items():
        path.chmod(mode & ~0o222)
    return modes


def _ok(trained) -> Run:
    run, proc = trained
    if proc.returncode != 0:
        pytest.fail(f"{run.name}: train exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return run


def test_train(trained):
    run = _ok(trained)
    cfg, task = run.config, run.config["task"]
    # Every key the shipped file sets is in the resolved config unchanged, unless overridden.
    over = overrides(run.name, run.layout.root)
    for key, value in leaves(shipped(run.name)):
        if any(key == k or key.startswith(k + ".") for k in over):
            continue
        assert get(cfg, key) == value, f"{run.name}: {key} is {get(cfg, key)!r} in the run, {value!r} shipped"

    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert METRICS[task] <= set(metrics), f"metrics.json lacks {METRICS[task] - set(metrics)}"
    run.check_per_class(metrics)

    history = pd.read_csv(run.dir / "history.csv")
    epochs = sum(p["epochs"] for p in cfg["train"]["phases"])
    assert history["epoch"].tolist() == list(range(epochs))

    events = list((run.dir / "tensorboard").rglob("events.out.tfevents*"))
    assert bool(events) == cfg["train"]["tensorboard"], f"tensorboard {cfg['train']['tensorboard']}, events {events}"
    assert (run.dir / "checkpoints" / "best.keras").is_file()
    # The learning rate is logged as it was applied; 0.0 would mean it was lost (e.g. under mixed precision).
    assert (history["lr"] > 0).all(), f"lr column: {history['lr'].tolist()}"


def test_evaluate(trained):
    run = _ok(trained)
    run.cli("-m", "tfvision.evaluate", "--run", str(run.dir))
    metrics = json.loads((run.dir / "eval" / "val" / "metrics.json").read_text())
    task = run.config["task"]
    assert EVAL_METRICS[task] <= set(metrics), f"eval metrics.json lacks {EVAL_METRICS[task] - set(metrics)}"
    run.check_per_class(metrics)
    report = (run.dir / "eval" / "val" / "report.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    for name in embedded:  # every figure the report shows is there, as a PNG
        with Image.open(run.dir / "eval" / "val" / name) as im:
            assert im.format == "PNG", name
    if task in ("instance_segmentation", "segmentation"):
        assert "overlays.png" in embedded, embedded


def test_predict(trained):
    run = _ok(trained)
    source = run.layout.predict_input
    names = run.info["class_names"]
    if run.config["task"] == "segmentation":
        import nibabel as nib

        out = run.base / "predicted_mask.nii.gz"
        run.cli("-m", "tfvision.predict", "--run", str(run.dir), "--volume", str(source), "--output", str(out))
        pred, image = nib.load(out), nib.load(source)
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= set(range(len(names)))
        return
    out = run.base / "predictions.csv"
    run.cli("-m", "tfvision.predict", "--run", str(run.dir), "--input-dir", str(source), "--output", str(out))
    images = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if run.config["task"] == "instance_segmentation":  # one row per instance, or one empty row per image
        submission = run.base / "submission.csv"
        run.cli("-m", "tfvision.predict", "--run", str(run.dir), "--input-dir", str(source), "--output",
                str(submission), "--format", "kaggle-instances", "--coco-json", str(run.base / "results.json"))
        frame = pd.read_csv(out, keep_default_na=False, dtype=str)
        assert sorted(set(frame["path"])) == images and (frame["error"] == "").all()
        kaggle = pd.read_csv(submission, keep_default_na=False, dtype=str)
        assert kaggle.columns.tolist() == frame.columns[:2].tolist()
        assert len(kaggle) == len(frame)
        results = json.loads((run.base / "results.json").read_text())
        assert len(results) == int((frame.iloc[:, 1] != "").sum())
        assert all(1 <= r["category_id"] <= len(names) and 0 <= r["score"] <= 1 for r in results)
        return
    frame = pd.read_csv(out, keep_default_na=False, dtype={"path": str, "pred": str, "error": str})
    assert sorted(frame["path"]) == images  # one row per input image
    assert (frame["error"] == "").all()
    if run.config["task"] == "regression":  # a grade and its continuous score
        assert frame.columns.tolist() == ["path", "pred", "score", "error"]
        assert set(frame["pred"]) <= set(names) and np.isfinite(frame["score"].to_numpy(float)).all()
        return
    assert frame.columns.tolist() == ["path", "pred", *(f"prob_{c}" for c in names), "error"]
    probs = frame[[f"prob_{c}" for c in names]].to_numpy(float)
    assert ((probs >= 0) & (probs <= 1)).all()
    if run.info["activation"] == "softmax":
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        assert set(frame["pred"]) <= set(names)
    else:  # multi-label: the classes over their thresholds, ";"-joined (possibly none)
        assert all(set(filter(None, p.split(";"))) <= set(names) for p in frame["pred"])


def test_export(trained):
    run = _ok(trained)
    from tfvision.tasks import get_task

    unsupported = get_task(run.config["task"]).unsupported_formats
    run.cli("-m", "tfvision.export", "--run", str(run.dir), "--format", "all", "--verify")
    report = json.loads((run.dir / "export" / "export_report.json").read_text())
    assert report["verified"] and report["passed"]
    # Every format is exported, or left out with the task's reason (the failing op) in the report.
    assert {e["format"] for e in report["exports"]} == {"savedmodel", "onnx", "tflite"} - set(unsupported)
    assert report["not_exported"] == [{"format": f, "reason": unsupported[f]} for f in ("onnx", "tflite")
                                      if f in unsupported]
    assert all(e["passed"] and e["n_images"] > 0 for e in report["exports"])


def test_inputs_unchanged(trained):
    """Train, evaluate, predict and export wrote nothing into the read-only data (slice caches,
    class weights and the like go to the cache): every file is there, byte for byte, and no more."""
    run, _ = trained
    if run.inputs is None:
        pytest.skip(f"{run.name}: its data is built by the run (data.prepare)")
    assert checksums(run.layout.root) == run.inputs
