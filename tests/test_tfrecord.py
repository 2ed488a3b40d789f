"""TFRecord conversion and shard input: round trip, manifest, rejects, resume, verify, training."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tests.conftest import REPO, run_cli
from tfvision.config_loader import load_config
from tfvision.convert import convert, main
from tfvision.data.pipeline import PipelineSpec
from tfvision.data.sources import load_samples
from tfvision.data.splits import assign_splits
from tfvision.data.tfrecord import RecordInputs, read_examples, verify
from tfvision.errors import DataError, UserError
from tfvision.tasks import get_task

SHARD_MB = 0.03  # about 45 digit PNGs per shard: 5 train shards, 2 val shards


def write_config(root, tmp_path, name="cfg.json", **data):
    cfg = {
        "seed": 3,
        "data": {"source": "csv", "root": str(root), "csv": "digits.csv", "group_column": "group",
                 "image_size": 32, "split": {"method": "stratified", "val_fraction": 0.25}, **data},
        "model": {"backbone": "small_cnn", "weights": None, "head": {"type": "mlp", "hidden": [16]}},
        "train": {"batch_size": 16, "epochs": 1, "steps_per_epoch": 2, "monitor": "val_accuracy",
                  "tensorboard": False},
    }
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return p


def source_split(cfg) -> pd.DataFrame:
    """The split training on the source would use (the oracle for the shards)."""
    return assign_splits(load_samples(cfg.data).frame, cfg.data.split, cfg.seed)


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tfrecord" in p.name and not p.name.startswith("."))


def assert_records_follow_the_task(inputs: RecordInputs, task):
    """Each training record's tier and weight are what loose files get from the same target."""
    elements = list(inputs._elements("train", training=False, deterministic=True).as_numpy_iterator())
    targets = np.stack([e["target"] for e in elements])
    tiers = [int(e["tier"]) for e in elements]
    assert tiers == task.tiers(targets, inputs.tiers).tolist() and len(set(tiers)) > 1
    if inputs.weights is not None:
        np.testing.assert_allclose([e["weight"] for e in elements], (targets * inputs.weights).sum(1), rtol=1e-6)


@pytest.mark.parametrize("gzip, workers", [(False, 0), (True, 1)])  # 1: a spawned worker process
def test_round_trip_keeps_bytes_labels_groups_split_and_counts(small_digits, tmp_path, gzip, workers):
    cfg = load_config(write_config(small_digits, tmp_path))
    out = tmp_path / "shards"
    manifest = convert(cfg, out, shard_mb=SHARD_MB, gzip=gzip, workers=workers, progress=False)
    frame = source_split(cfg)

    for split in ("train", "val"):
        part = frame[frame["split"] == split]
        records = {r["image/id"].decode(): r for r in read_examples(str(out), split)}
        assert sorted(records) == sorted(os.path.relpath(p, small_digits) for p in part["path"])
        for path, label, group in zip(part["path"], part["label"], part["group"], strict=True):
            r = records[os.path.relpath(path, small_digits)]
            assert r["image/encoded"] == Path(path).read_bytes()  # stored as-is, not re-encoded
            assert r["label/text"].decode() == label and r["image/group"].decode() == group
            assert manifest["class_names"][int(np.argmax(r["label/target"]))] == label
            assert sum(r["label/target"]) == 1.0
            assert (r["image/height"], r["image/width"], r["image/channels"]) == (32, 32, 1)
            assert r["image/format"] == b"png"
        # Manifest counts are those of the source split.
        assert manifest["counts"][split] == len(part)
        assert manifest["class_counts"][split] == part["label"].value_counts().reindex(
            manifest["class_names"], fill_value=0).to_dict()
        # val is exactly one fold of the K-fold that chose it; train holds the others.
        folds = {r["sample/fold"] for r in records.values()}
        assert folds == ({0} if split == "val" else {1, 2, 3})

    names = shard_files(out)
    assert names == sorted(s["name"] for s in manifest["shards"])
    suffix = r"\.tfrecord\.gz" if gzip else r"\.tfrecord"
    for split in ("train", "val"):
        mine = [n for n in names if n.startswith(split)]
        assert len(mine) >= 2, "the test wants several shards per split"
        assert mine == [f"{split}-{i:05d}-of-{len(mine):05d}" + suffix.replace("\\", "") for i in range(len(mine))]
    for s in manifest["shards"]:
        data = (out / s["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s["bytes"], s["sha256"])
        assert re.fullmatch(r"(train|val)-\d{5}-of-\d{5}" + suffix, s["name"])
    assert sum(s["records"] for s in manifest["shards"]) == len(frame)
    assert manifest["rejected"] == [] and manifest["schema_version"] == 1
    assert manifest["config"]["data"]["csv"] == "digits.csv"
    assert verify(str(out), progress=False) == ([], len(names))


def test_corrupt_and_missing_files_are_rejected_with_reasons(odd_images, tmp_path):
    root = odd_images["rgb.jpg"].parent
    names = ["rgb.jpg", "png_named.jpg", "gray.png", "cmyk.jpg", "gray16.png", "truncated.jpg",
             "empty.jpg", "text.png", "missing.jpg"]
    split = ["val", "val", "train", "train", "train", "train", "train", "train", "train"]
    pd.DataFrame({"path": names, "label": ["a", "b"] * 4 + ["a"], "group": names, "split": split}).to_csv(
        root / "digits.csv", index=False)
    cfg_path = write_config(root, tmp_path, split_column="split", max_bad_fraction=0.5)
    out = tmp_path / "shards"
    manifest = convert(load_config(cfg_path), out, progress=False)

    rejected = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {"truncated.jpg", "empty.jpg", "text.png", "missing.jpg"}
    assert rejected["missing.jpg"] == "file not found" and rejected["empty.jpg"] == "empty file"
    assert all(reason.strip() for reason in rejected.values())
    kept = {r["image/id"].decode(): r for s in ("train", "val") for r in read_examples(str(out), s)}
    assert sorted(kept) == sorted({"rgb.jpg", "png_named.jpg", "gray.png", "cmyk.jpg", "gray16.png"})
    assert kept["png_named.jpg"]["image/format"] == b"png"  # magic bytes, not the name
    assert kept["cmyk.jpg"]["image/channels"] == 4 and kept["gray16.png"]["image/channels"] == 1
    assert manifest["counts"] == {"train": 3, "val": 2}

    # Above max_bad_fraction: an error naming the limit, and no manifest.
    code = main(["--config", str(cfg_path), "--output", str(tmp_path / "strict"), "--quiet",
                 "--set", "data.max_bad_fraction=0.2"])
    assert code == 2 and not (tmp_path / "strict" / "manifest.json").exists()


@pytest.mark.parametrize("bad, message", [
    ({"label_column": "digit"}, "missing column"),
    ({"class_names": [str(i) for i in range(9)]}, "not listed"),
    ({"path_template": "nowhere/{label}.png"}, "no image named by template"),
    ({"split_column": "label", "class_names": None}, "expected"),
])
def test_bad_input_stops_before_any_shard(small_digits, tmp_path, capsys, bad, message):
    out = tmp_path / "shards"
    code = main(["--config", str(write_config(small_digits, tmp_path, **bad)), "--output", str(out), "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or shard_files(out) == []


def test_empty_split_stops_before_any_shard(small_digits, tmp_path):
    frame = pd.read_csv(small_digits / "digits.csv")
    frame["split"] = "train"  # nothing left for val
    frame.to_csv(small_digits / "digits.csv", index=False)
    out = tmp_path / "shards"
    with pytest.raises(UserError, match="val split is empty"):
        convert(load_config(write_config(small_digits, tmp_path, split_column="split")), out, progress=False)
    assert not out.exists() or shard_files(out) == []


KILLER = """
import os, signal, sys
import tfvision.data.features as F
real, calls = F.encode_example, [0]
def encode_then_die(**kw):  # SIGKILL partway through writing shard 3: no cleanup runs
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(**kw)
F.encode_example = encode_then_die
from tfvision.convert import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_kill_keeps_finished_shards_and_leaves_no_partial_one(small_digits, tmp_path):
    cfg_path = write_config(small_digits, tmp_path)
    out = tmp_path / "shards"
    args = ["--config", str(cfg_path), "--output", str(out), "--shard-mb", str(SHARD_MB), "--quiet"]
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "KILL_AT": "110"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    assert not (out / "manifest.json").exists()
    state = json.loads((out / ".convert-state.json").read_text())
    finished = sorted(state["shards"])
    assert len(finished) == 2  # ~45 records a shard: killed inside the third
    # Final names hold only finished, complete shards; the partial one is under a temp name.
    assert shard_files(out) == finished
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] != []
    before = {n: (out / n).stat() for n in finished}

    assert main(args) == 0
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name or p.name.startswith(".convert")] == []
    for n, st in before.items():  # kept, not rewritten
        assert ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    manifest = json.loads((out / "manifest.json").read_text())
    assert verify(str(out), progress=False)[0] == []

    # The result equals an uninterrupted conversion, shard for shard.
    clean = convert(load_config(cfg_path), tmp_path / "clean", shard_mb=SHARD_MB, progress=False)
    assert [(s["name"], s["sha256"]) for s in manifest["shards"]] == \
        [(s["name"], s["sha256"]) for s in clean["shards"]]
    assert manifest["counts"] == clean["counts"] == {"train": 225, "val": 75}


def _flip_byte(path: Path, at: float = 0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


def test_verify_and_reader_name_a_tampered_or_truncated_shard(small_digits, tmp_path, capsys):
    cfg_path = write_config(small_digits, tmp_path)
    good = tmp_path / "good"
    convert(load_config(cfg_path), good, shard_mb=SHARD_MB, progress=False)

    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    _flip_byte(flipped / "val-00000-of-00002.tfrecord")
    assert main(["--verify", str(flipped), "--quiet"]) == 2
    report = capsys.readouterr().out
    assert "FAIL val-00000-of-00002.tfrecord: sha256 differs" in report
    assert "FAIL val-00000-of-00002.tfrecord: unreadable after record" in report  # the record CRC too

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    shard = truncated / "train-00001-of-00005.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-500])
    problems, _ = verify(str(truncated), progress=False)
    assert problems and all(p.startswith("train-00001-of-00005.tfrecord: ") for p in problems)
    assert "truncated" in problems[0] and "unreadable after record" in problems[-1]
    assert main(["--verify", str(good), "--quiet"]) == 0

    # The reader: a size mismatch stops it up front; a bad record fails with the shard's name.
    def inputs(root):
        cfg = load_config(cfg_path, ["data.source=tfrecord", f"data.root={root}"])
        return RecordInputs(cfg, get_task(cfg.task, cfg))

    with pytest.raises(DataError, match="train-00001-of-00005.tfrecord: .* bytes"):
        inputs(truncated)
    shutil.copy(good / "val-00000-of-00002.tfrecord", flipped / "val-00000-of-00002.tfrecord")
    _flip_byte(flipped / "val-00001-of-00002.tfrecord")
    with pytest.raises(DataError, match="shard .*val-00001-of-00002.tfrecord is corrupt or truncated"):
        inputs(flipped).targets("val")


def test_record_inputs_feed_the_shared_pipeline(small_digits, tmp_path, monkeypatch):
    cfg_path = write_config(small_digits, tmp_path)
    out = tmp_path / "shards"
    manifest = convert(load_config(cfg_path), out, shard_mb=SHARD_MB, progress=False)
    cfg = load_config(cfg_path, ["data.source=tfrecord", f"data.root={out}", "train.loss.class_weights=inverse",
                                 "augment.tiers.enabled=true", "augment.tiers.thresholds=[70, 72]"])
    inputs = RecordInputs(cfg, get_task(cfg.task, cfg))
    counts = np.array([manifest["class_counts"]["train"][c] for c in inputs.class_names])
    assert inputs.counts.tolist() == counts.tolist() and inputs.sizes == {"train": 225, "val": 75, "test": 0}
    spec = PipelineSpec.from_config(cfg)

    images, targets, weights = next(iter(inputs.dataset("train", spec, training=True, repeat=True)))
    assert images.shape == (16, 32, 32, 3) and images.dtype == tf.float32
    assert float(tf.reduce_max(images)) <= 255.0 and float(tf.reduce_max(images)) > 50.0
    np.testing.assert_allclose(weights.numpy(), (targets.numpy() * inputs.weights).sum(1), rtol=1e-6)

    # Records restate the task's per-sample tier rule in TF; it must agree with Task.tiers.
    inputs.tiers = np.arange(len(inputs.class_names), dtype=np.int32) % 3
    assert_records_follow_the_task(inputs, get_task(cfg.task, cfg))

    # val comes in the order targets() reports, every record once.
    val = [t.numpy() for _, t in inputs.dataset("val", spec, training=False)]
    np.testing.assert_array_equal(np.concatenate(val), inputs.targets("val"))
    assert np.concatenate(val).sum(0).tolist() == list(manifest["class_counts"]["val"].values())

    # Under a 2-worker cluster each worker reads its own shards (train has 5).
    ids = []
    for index in (0, 1):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                    "task": {"type": "worker", "index": index}}))
        ds = inputs._records("train", training=True, deterministic=True, worker=(2, index))
        ids.append({tf.io.parse_single_example(r, {"image/id": tf.io.FixedLenFeature([], tf.string)})
                    ["image/id"].numpy() for r in ds})
        from tfvision.data.tfrecord import worker_slice
        assert worker_slice() == (2, index)
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 225


def test_training_on_shards_uses_the_source_split(small_digits, tmp_path):
    from tfvision.train import main as train_main

    cfg_path = write_config(small_digits, tmp_path)
    out = tmp_path / "shards"
    assert main(["--config", str(cfg_path), "--output", str(out), "--shard-mb", str(SHARD_MB), "--quiet"]) == 0
    run = tmp_path / "run"
    code = train_main(["--config", str(cfg_path), "--output-dir", str(run), "--quiet",
                       "--set", "data.source=tfrecord", f"data.root={out}"])
    assert code == 0
    frame = source_split(load_config(cfg_path))
    report = json.loads((run / "data_report.json").read_text())
    for split in ("train", "val"):
        want = frame[frame["split"] == split]["label"].value_counts().to_dict()
        assert {k: v for k, v in report["class_counts"][split].items() if v} == want
    info = json.loads((run / "run.json").read_text())
    assert info["class_names"] == sorted(frame["label"].unique())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_val"] == (frame["split"] == "val").sum() == 75
    assert report["source"] == "tfrecord" and report["rejected"] == []


def test_cli_wrapper_and_config_accept_shard_folders_and_cloud_paths(small_digits, tmp_path):
    from tfvision.errors import ConfigError

    cfg_path = write_config(small_digits, tmp_path)
    with pytest.raises(ConfigError, match="no manifest.json"):
        load_config(cfg_path, ["data.source=tfrecord", f"data.root={tmp_path}"])
    cfg = load_config(cfg_path, ["data.source=tfrecord", "data.root=gs://bucket/shards"])
    assert cfg.data.root == "gs://bucket/shards"
    proc = run_cli("tools/convert_tfrecord.py", "--help", timeout=120)  # no TensorFlow import for this
    assert proc.returncode == 0 and "--verify" in proc.stdout and "--shard-mb" in proc.stdout


def test_multilabel_records_carry_known_mask_and_eval_targets(small_digits, tmp_path):
    frame = pd.read_csv(small_digits / "digits.csv", dtype=str)
    rng = np.random.default_rng(0)
    for name, positive in (("even", frame["label"].astype(int) % 2 == 0), ("gt4", frame["label"].astype(int) > 4)):
        col = np.where(positive, "1", "0").astype(object)
        col[rng.random(len(col)) < 0.15] = "-1"
        col[rng.random(len(col)) < 0.05] = ""
        frame[name] = col
    frame.to_csv(small_digits / "multi.csv", index=False)
    cfg_path = write_config(small_digits, tmp_path, csv="multi.csv", label_columns=["even", "gt4"],
                            uncertain={"default": "smooth"}, split={"method": "random", "val_fraction": 0.25})
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "task": "multilabel"}))
    cfg = load_config(cfg_path)
    out = tmp_path / "shards"
    manifest = convert(cfg, out, shard_mb=SHARD_MB, progress=False)
    assert manifest["has_known"] and manifest["has_eval"] and manifest["class_names"] == ["even", "gt4"]

    task = get_task("multilabel", cfg)
    split = source_split(cfg)
    for name in ("train", "val"):
        part = split[split["split"] == name].reset_index(drop=True)
        targets, known = task.targets(part, ["even", "gt4"])
        evals = task.eval_targets(part, ["even", "gt4"])
        by_id = {r["image/id"].decode(): r for r in read_examples(str(out), name)}
        for j, path in enumerate(part["path"]):
            r = by_id[os.path.relpath(path, small_digits)]
            np.testing.assert_allclose(r["label/target"], targets[j])
            np.testing.assert_array_equal(r["label/known"], known[j])
            np.testing.assert_array_equal(r["label/eval"], evals[j])  # -1 where uncertain (smoothed)
        assert list(manifest["class_counts"][name].values()) == task.class_counts(targets, known).tolist()
        assert list(manifest["known_counts"][name].values()) == (known > 0).sum(0).tolist()
        if name == "val":
            record_cfg = load_config(cfg_path, ["data.source=tfrecord", f"data.root={out}"])
            got = RecordInputs(record_cfg, get_task("multilabel", record_cfg)).targets("val")
            assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, evals.tolist()))
    record_cfg = load_config(cfg_path, ["data.source=tfrecord", f"data.root={out}", "augment.tiers.enabled=true"])
    inputs = RecordInputs(record_cfg, task)
    inputs.tiers = np.array([1, 2], np.int32)  # both positive: 2, even alone: 1, neither: 0
    assert_records_follow_the_task(inputs, task)


def seg_folder(root: Path, n: int = 24, bad: bool = False) -> Path:
    """Photos with label images made from their brightness (0 dark, 1 mid, 2 bright); with `bad`,
    one mask of the wrong size and one saved as JPEG."""
    from PIL import Image

    from tests.conftest import jpeg_bytes, photo

    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    rows = []
    for i in range(n):
        arr = photo(i, 48)
        labels = np.digitize(arr.mean(-1), [85, 170]).astype(np.uint8)
        (root / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(arr))
        mask = root / "mask" / f"{i}.png"
        if bad and i == 3:
            Image.fromarray(labels[:40, :40]).save(mask)
        elif bad and i == 5:
            mask.write_bytes(jpeg_bytes(np.repeat(labels[..., None] * 100, 3, -1)))
        else:
            Image.fromarray(labels).save(mask)
        rows.append({"path": f"img/{i}.jpg", "mask": f"mask/{i}.png", "patient": f"p{i % 6}"})
    pd.DataFrame(rows).to_csv(root / "seg.csv", index=False)
    return root


def seg_config(root, tmp_path):
    cfg = {
        "task": "segmentation", "seed": 1,
        "data": {"source": "csv", "root": str(root), "csv": "seg.csv", "mask_column": "mask",
                 "group_column": "patient", "class_names": ["dark", "mid", "bright"], "image_size": 32,
                 "split": {"method": "grouped", "val_fraction": 0.34}, "max_bad_fraction": 0.1},
        "model": {"backbone": "unet", "weights": None, "unet": {"base_filters": 4, "depth": 2}},
        "train": {"batch_size": 4, "epochs": 1, "steps_per_epoch": 2, "monitor": "val_dice",
                  "tensorboard": False, "loss": {"name": "ce_dice", "class_weights": "sqrt_inverse"}},
    }
    p = tmp_path / "seg.json"
    p.write_text(json.dumps(cfg))
    return p


def test_segmentation_shards_carry_checked_masks_and_pixel_counts(tmp_path):
    from PIL import Image

    root = seg_folder(tmp_path / "data", bad=True)
    cfg = load_config(seg_config(root, tmp_path))
    out = tmp_path / "shards"
    manifest = convert(cfg, out, shard_mb=0.01, progress=False)
    assert manifest["has_mask"] and manifest["class_counts_unit"] == "pixels"
    reasons = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"3.jpg", "5.jpg"}
    assert "40x40, its image is 48x48" in reasons["3.jpg"] and "not a PNG" in reasons["5.jpg"]
    frame = source_split(cfg)
    for split in ("train", "val"):
        masks = [np.asarray(Image.open(m)) for p, m in frame[frame["split"] == split][["path", "mask"]].to_numpy()
                 if Path(p).name not in reasons]
        want = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=3)
        assert list(manifest["class_counts"][split].values()) == want.tolist()
        records = read_examples(str(out), split)
        assert len(records) == len(masks)
        for r in records:  # each record's mask is its own image's label file, byte for byte
            assert r["label/mask"] == (root / "mask" / Path(r["image/id"].decode()).with_suffix(".png").name).read_bytes()
    assert verify(str(out), progress=False) == ([], len(manifest["shards"]))


def test_segmentation_trains_on_shards_with_the_masks_and_weights_of_the_files(tmp_path):
    from tfvision.data.inputs import FileInputs
    from tfvision.train import main as train_main

    root = seg_folder(tmp_path / "data")
    cfg_path = seg_config(root, tmp_path)
    cfg = load_config(cfg_path)
    out = tmp_path / "shards"
    convert(cfg, out, shard_mb=0.01, progress=False)
    rec_cfg = load_config(cfg_path, ["data.source=tfrecord", f"data.root={out}"])
    task = get_task("segmentation", cfg)
    files = FileInputs(cfg, task, source_split(cfg))
    shards = RecordInputs(rec_cfg, get_task("segmentation", rec_cfg))
    spec = PipelineSpec.from_config(cfg)

    def pairs(inputs):  # (image, mask) of every val sample, in a common order
        got = [(x, y) for bx, by in inputs.dataset("val", spec, training=False, format_batch=task.format_batch)
               for x, y in zip(bx.numpy(), by.numpy(), strict=True)]
        return sorted(got, key=lambda p: float(p[0].sum()))

    a, b = pairs(files), pairs(shards)
    assert len(a) == len(b) == files.sizes["val"] > 0
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_allclose(xa, xb, atol=1e-4)
        np.testing.assert_array_equal(ya, yb)
    assert len(np.unique(np.concatenate([y.ravel() for _, y in b]))) == 3
    np.testing.assert_allclose(task.class_weights(rec_cfg, shards), task.class_weights(cfg, files), rtol=1e-6)

    run = tmp_path / "run"
    assert train_main(["--config", str(cfg_path), "--output-dir", str(run), "--quiet",
                       "--set", "data.source=tfrecord", f"data.root={out}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["val_dice_per_class"]) == {"dark", "mid", "bright"}
