"""Remote storage (gs://) through TensorFlow's filesystem layer, tested offline on ``ram://``.

``ram://`` is TensorFlow's in-memory filesystem: it lives in this process only, so every
command here runs in-process (its ``main(argv)``), never as a subprocess. Each test uses its
own ``ram://<test name>/`` prefix, since the filesystem outlives a test.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import keras
import pandas as pd
import pytest
import tensorflow as tf

from tests.conftest import checksums
from tests.test_tfrecord import write_config
from tfvision import remote, training
from tfvision.config_loader import load_config
from tfvision.convert import convert
from tfvision.convert import main as convert_main
from tfvision.data.inputs import FileInputs
from tfvision.data.pipeline import PipelineSpec
from tfvision.data.sources import load_samples
from tfvision.errors import ConfigError
from tfvision.evaluate import main as evaluate_main
from tfvision.export import main as export_main
from tfvision.fileio import atomic_path, read_json
from tfvision.predict import main as predict_main
from tfvision.run import read_splits, working_copy
from tfvision.tasks import get_task
from tfvision.train import main as train_main

SHARD_MB = 0.09  # about 3 train shards and 1 val shard of the 300 digits: each shard costs ~1 s


def url_tree(url: str) -> list[str]:
    return remote.files_under(url)


def records(root: str) -> list[bytes]:
    """Every serialized record of every shard in `root`, sorted: the multiset to compare."""
    manifest = read_json(remote.join(root, "manifest.json"))
    return sorted(r.numpy() for s in manifest["shards"]
                  for r in tf.data.TFRecordDataset(remote.join(root, s["name"])))


def upload(local: Path, url: str) -> None:
    for rel in remote.files_under(local):
        remote.put(local / rel, remote.join(url, rel))


# --------------------------------------------------------------------------- the file layer


def test_move_is_copy_then_delete_where_the_filesystem_has_no_rename(tmp_path, monkeypatch):
    def no_rename(*args, **kwargs):
        raise tf.errors.UnimplementedError(None, None, "rename is not supported")

    monkeypatch.setattr(tf.io.gfile, "rename", no_rename)
    src = tmp_path / "a.txt"
    src.write_text("one")
    remote.put(src, "ram://move/x/a.txt")
    src.write_text("two")
    remote.put(src, "ram://move/x/a.txt")  # replaces
    assert remote.read_bytes("ram://move/x/a.txt") == b"two"
    assert remote.listdir("ram://move/x") == ["a.txt"]  # the temporary name went


def test_a_failed_write_leaves_nothing_under_the_final_name():
    with pytest.raises(RuntimeError), atomic_path("ram://failed/out.json") as tmp:
        tmp.write_text("{half")
        raise RuntimeError("killed")
    assert not remote.exists("ram://failed/out.json") and remote.listdir("ram://failed") == []


def test_mirror_sends_changes_oldest_first_and_removes_only_its_own(tmp_path, monkeypatch):
    local, url = tmp_path / "run", "ram://mirror/run"
    remote.put(_write(tmp_path / "x", "user"), url + "/notes/user.txt")
    remote.put(tmp_path / "x", url + "/.last.keras.tmp-9")  # an upload cut off after its copy
    mirror = remote.Mirror(local, url)
    mirror.pull()
    assert (local / "notes" / "user.txt").read_text() == "user"
    assert url_tree(url) == ["notes/user.txt"] and not (local / ".last.keras.tmp-9").exists()
    sent = []
    monkeypatch.setattr(remote, "put", lambda src, dst, tag=None: sent.append(dst.rsplit("/", 1)[-1]))
    _write(local / "weights.h5", "w")
    _write(local / "progress.json", "{}")
    _write(local / ".progress.json.tmp-1", "half")  # a writer's temporary file: never sent
    mirror.push()
    assert sent == ["weights.h5", "progress.json"]  # in the order they were written
    sent.clear()
    mirror.push()
    assert sent == []  # nothing changed
    monkeypatch.undo()
    (local / "notes" / "user.txt").unlink()  # pulled, then removed here: removed there
    remote.put(_write(tmp_path / "y", "new"), url + "/other.txt")  # appeared there meanwhile: kept
    mirror.push()
    assert url_tree(url) == ["other.txt"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_only_a_writing_process_publishes_and_the_working_copy_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TFVISION_CACHE", str(tmp_path / "cache"))
    cfg = load_config(_write(tmp_path / "c.json", json.dumps({"data": {"source": "folders", "root": "ram://x"},
                                                               "model": {"backbone": "small_cnn"}})))
    for writes, expected in ((False, []), (True, ["notes.txt"])):
        with working_copy("ram://copies/run", cfg, writes=writes) as (local, sync):
            (local / "notes.txt").write_text("{}")
            sync()
        assert url_tree("ram://copies/run") == expected and not local.exists()
    assert list((tmp_path / "cache" / "remote-runs").iterdir()) == []


# --------------------------------------------------------------------------- shards and runs on ram://


def test_convert_verify_train_and_resume_on_ram(small_digits, tmp_path, monkeypatch, capsys):
    before = checksums(small_digits)
    cfg_path = write_config(small_digits, tmp_path)
    local = tmp_path / "shards"
    convert(load_config(cfg_path), local, shard_mb=SHARD_MB, progress=False)
    shards, run = "ram://round_trip/shards", "ram://round_trip/run"
    assert convert_main(["--config", str(cfg_path), "--output", shards, "--shard-mb", str(SHARD_MB), "--quiet"]) == 0
    # The same records, shards and sums as the local converter; no temporary name left.
    assert records(shards) == records(str(local)) and len(records(shards)) == 300
    assert sum(n.startswith("train-") for n in remote.listdir(shards)) > 1
    ours, theirs = read_json(remote.join(shards, "manifest.json")), read_json(local / "manifest.json")
    assert [(s["name"], s["sha256"]) for s in ours["shards"]] == [(s["name"], s["sha256"]) for s in theirs["shards"]]
    assert url_tree(shards) == sorted(p.name for p in local.iterdir())
    assert convert_main(["--verify", shards, "--quiet"]) == 0
    assert "shards OK" in capsys.readouterr().out
    # Run again: the finished conversion is recognised, nothing rewritten.
    assert convert_main(["--config", str(cfg_path), "--output", shards, "--shard-mb", str(SHARD_MB), "--quiet"]) == 0
    assert read_json(remote.join(shards, "manifest.json"))["created"] == ours["created"]

    # Train from the ram:// shards into a ram:// run folder; the run is killed after epoch 1.
    train_cfg = write_config(small_digits, tmp_path, "train.json")
    raw = json.loads(train_cfg.read_text())
    raw["data"] = {**raw["data"], "source": "tfrecord", "root": shards}
    raw["train"]["epochs"] = 2
    train_cfg.write_text(json.dumps(raw))

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("killed")

    callbacks = training._callbacks
    monkeypatch.setattr(training, "_callbacks", lambda *a: [*callbacks(*a), Kill()])
    with pytest.raises(RuntimeError, match="killed"):
        train_main(["--config", str(train_cfg), "--output-dir", run, "--quiet"])
    assert remote.isfile(remote.join(run, "config.json"))
    assert remote.isfile(remote.join(run, "checkpoints/last.keras"))  # published at the epoch's end
    monkeypatch.undo()

    # Resume from the ram:// folder alone (the working copy is gone): epoch 2 only.
    assert train_main(["--resume", run, "--quiet"]) == 0
    files = url_tree(run)
    for name in ("config.json", "run.json", "data_report.json", "history.csv", "metrics.json", "progress.json",
                 "checkpoints/best.keras", "checkpoints/last.keras", "checkpoints/phase0.weights.h5"):
        assert name in files, name
    assert not any(remote.is_temp(f.rsplit("/", 1)[-1]) for f in files)
    assert not any(f.startswith("backup/") for f in files)  # removed at the phase's end, there too
    history = remote.read_bytes(remote.join(run, "history.csv")).decode().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1"]  # each epoch once
    assert read_json(remote.join(run, "metrics.json"))["n_val"] == ours["counts"]["val"]
    assert checksums(small_digits) == before  # nothing written into the input folder

    # The commands that read a run take the URL too: evaluate's and export's outputs go back there.
    cache = Path(os.environ["TFVISION_CACHE"]) / "remote-runs"
    assert evaluate_main(["--run", run]) == 0
    scores = read_json(remote.join(run, "eval/val/metrics.json"))
    assert scores["n"] == ours["counts"]["val"] and "report.md" in remote.listdir(remote.join(run, "eval/val"))
    assert export_main(["--run", run, "--format", "savedmodel", "--verify", "--images", str(small_digits / "images")]) == 0
    assert "saved_model.pb" in remote.listdir(remote.join(run, "export/savedmodel"))
    predictions = tmp_path / "predictions.csv"
    assert predict_main(["--run", run, "--input-dir", str(small_digits / "images"), "--output", str(predictions)]) == 0
    assert len(pd.read_csv(predictions)) == 300
    assert not any(cache.iterdir())  # every scratch copy went
    assert not any(remote.is_temp(f.rsplit("/", 1)[-1]) for f in url_tree(run))
    assert checksums(small_digits) == before


def test_loose_files_on_ram_are_listed_checked_and_read_by_the_pipeline(small_digits, tmp_path):
    root = "ram://loose/digits"
    upload(small_digits, root)
    remote.put(_write(tmp_path / "bad.png", "not a png"), root + "/images/digit_0000.png")  # corrupt
    cfg_path = write_config(root, tmp_path, max_bad_fraction=0.05)
    run = tmp_path / "run"
    assert train_main(["--config", str(cfg_path), "--output-dir", str(run), "--check-data", "--quiet"]) == 0
    report = read_json(run / "data_report.json")
    assert report["rejected"] == [{"path": root + "/images/digit_0000.png", "reason": report["rejected"][0]["reason"]}]
    assert report["n_samples"] == 299
    # The split was written from the ram:// listing; the training pipeline reads those files.
    cfg = load_config(cfg_path)
    task = get_task(cfg.task, cfg)
    frame = read_splits(run)
    frame = frame[frame["path"] != root + "/images/digit_0000.png"]
    images, _ = next(iter(FileInputs(cfg, task, frame).dataset(
        "val", PipelineSpec.from_config(cfg), training=False, format_batch=task.format_batch)))
    assert images.shape == (16, 32, 32, 3) and float(tf.reduce_max(images)) > 0
    assert "digit_0000.png" in remote.listdir(root + "/images")  # the input is left as it was


def test_folders_source_lists_a_url_root_like_a_local_one(small_digits, tmp_path):
    local = tmp_path / "folders"
    for p in sorted((small_digits / "images").iterdir())[:20]:
        d = local / ("train" if int(p.stem[-4:]) % 2 else "val") / f"c{int(p.stem[-4:]) % 3}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    _write(local / "train" / "c0" / ".hidden.png", "x")  # debris: skipped in both
    upload(local, "ram://folders/data")
    base = {"model": {"backbone": "small_cnn", "weights": None}}
    frames = [load_samples(load_config(_write(tmp_path / f"{i}.json", json.dumps(
        {**base, "data": {"source": "folders", "root": str(root)}}))).data).frame
        for i, root in enumerate((local, "ram://folders/data"))]
    frames[0]["path"] = frames[0]["path"].str.replace(str(local), "ram://folders/data", regex=False)
    frames[0]["group"] = frames[0]["path"]
    assert frames[0].equals(frames[1]) and len(frames[1]) == 20


# --------------------------------------------------------------------------- refusals


def test_a_remote_folder_that_is_not_ours_is_refused(small_digits, tmp_path, capsys):
    remote.put(_write(tmp_path / "x", "mine"), "ram://theirs/out/notes.txt")
    cfg_path = write_config(small_digits, tmp_path)
    assert train_main(["--config", str(cfg_path), "--output-dir", "ram://theirs/out", "--quiet"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    remote.put(_write(tmp_path / "c.json", '{"seed": 1}'), "ram://theirs/run/config.json")  # another run
    assert train_main(["--config", str(cfg_path), "--output-dir", "ram://theirs/run", "--quiet"]) == 2
    assert "ram://theirs/run: this run folder was started with a different config" in capsys.readouterr().err
    assert convert_main(["--config", str(cfg_path), "--output", "ram://theirs/out", "--quiet"]) == 2
    assert "not a conversion's" in capsys.readouterr().err
    assert convert_main(["--config", str(cfg_path), "--output", "ram://theirs/x", "--workers", "1", "--quiet"]) == 2
    assert "--workers" in capsys.readouterr().err
    inside = write_config("ram://theirs/out", tmp_path, "inside.json")  # data.root on ram://
    assert convert_main(["--config", str(inside), "--output", "ram://theirs/out/shards", "--quiet"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert url_tree("ram://theirs") == ["out/notes.txt", "run/config.json"]


def test_sources_that_need_local_files_name_the_key(tmp_path):
    p = _write(tmp_path / "c.json", json.dumps({"data": {"source": "ham10000", "root": "gs://bucket/ham"},
                                                "model": {"backbone": "small_cnn", "weights": None}}))
    with pytest.raises(ConfigError, match="data.root: gs://bucket/ham is a URL"):
        load_config(p)


def test_beam_writes_the_same_shards_to_ram(small_digits, tmp_path):
    pytest.importorskip("apache_beam")
    from tfvision.data.beam import convert_beam

    cfg = load_config(write_config(small_digits, tmp_path))
    local = convert(cfg, tmp_path / "local", shard_mb=SHARD_MB, progress=False)
    beam = convert_beam(cfg, "ram://beam/shards", shard_mb=SHARD_MB)  # the in-process DirectRunner
    assert {k: v for k, v in beam.items() if k != "created"} == {k: v for k, v in local.items() if k != "created"}
    assert records("ram://beam/shards") == records(str(tmp_path / "local"))
    assert url_tree("ram://beam/shards") == sorted(p.name for p in (tmp_path / "local").iterdir())
