"""Conversion as an Apache Beam pipeline (``convert --runner``): the same shards and manifest as the
local converter, the CLI flags, and the error without the optional extra."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import checksums
from tests.test_tfrecord import SHARD_MB, seg_config, seg_folder, write_config
from tfvision.config_loader import load_config
from tfvision.convert import RUNNERS, convert, main, parse_args
from tfvision.errors import ConfigError


def serialized_records(out: Path) -> Counter:
    """Every record in a shard folder, as serialized bytes: a multiset, whatever the shard order."""
    import tensorflow as tf

    return Counter(r.numpy() for p in sorted(out.glob("*.tfrecord")) for r in tf.data.TFRecordDataset(str(p)))


def plant_broken(root: Path) -> None:
    """A corrupt file among the real digits, listed in the CSV: cut short, so its decode fails."""
    import pandas as pd

    good = (root / "images" / "digit_0005.png").read_bytes()
    (root / "images" / "broken.png").write_bytes(good[: len(good) // 2])
    frame = pd.read_csv(root / "digits.csv", dtype=str)
    pd.concat([frame, pd.DataFrame([{"path": "images/broken.png", "label": "5", "group": "broken"}])]).to_csv(
        root / "digits.csv", index=False)


# A CLI run in subprocesses (45-70 s on 2 loaded cores): with the user-path suites, -m configs.
@pytest.mark.configs
def test_direct_runner_on_two_processes_writes_the_local_converters_records_and_manifest(
        small_digits, tmp_path, capsys):
    pytest.importorskip("apache_beam")
    from tfvision.data.tfrecord import read_examples

    plant_broken(small_digits)
    cfg_path = write_config(small_digits, tmp_path, max_bad_fraction=0.05)
    before = checksums(small_digits)

    local = convert(load_config(cfg_path), tmp_path / "local", shard_mb=SHARD_MB, progress=False)
    assert main(["--config", str(cfg_path), "--output", str(tmp_path / "beam"), "--shard-mb", str(SHARD_MB),
                 "--runner", "DirectRunner", "--workers", "2", "--quiet"]) == 0
    beam = json.loads((tmp_path / "beam" / "manifest.json").read_text())
    assert checksums(small_digits) == before  # nothing written into the input folder

    # The manifests agree in everything but the time they were written: counts, class counts,
    # the rejected file and its reason, every shard's name, size and sha256.
    assert {k: v for k, v in beam.items() if k != "created"} == {k: v for k, v in local.items() if k != "created"}
    assert [Path(r["path"]).name for r in beam["rejected"]] == ["broken.png"]
    assert beam["rejected"][0]["reason"].strip()
    assert sum(beam["counts"].values()) == 300 and len(beam["shards"]) >= 4

    # The records, as a multiset of serialized records and parsed, order aside.
    assert serialized_records(tmp_path / "beam") == serialized_records(tmp_path / "local")
    assert sum(serialized_records(tmp_path / "beam").values()) == 300
    def parsed(out):  # through the readers' schema
        return sorted((r["image/id"], r["label/text"], r["image/encoded"], tuple(r["label/target"]),
                       r["sample/fold"]) for s in ("train", "val") for r in read_examples(str(out), s))

    assert parsed(tmp_path / "beam") == parsed(tmp_path / "local")

    # --verify passes on the Beam output, and no state file is left behind.
    capsys.readouterr()
    assert main(["--verify", str(tmp_path / "beam"), "--quiet"]) == 0
    assert "shards OK" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "beam").iterdir() if p.name.startswith(".")) == []


def test_segmentation_masks_get_the_same_checks_reasons_and_pixel_counts(tmp_path):
    pytest.importorskip("apache_beam")
    from tfvision.data.beam import convert_beam

    root = seg_folder(tmp_path / "data", bad=True)  # a mask of the wrong size, a JPEG mask
    cfg = load_config(seg_config(root, tmp_path))
    before = checksums(root)
    local = convert(cfg, tmp_path / "local", shard_mb=0.01, progress=False)
    beam = convert_beam(cfg, tmp_path / "beam", shard_mb=0.01)  # in-process DirectRunner
    assert checksums(root) == before
    assert {k: v for k, v in beam.items() if k != "created"} == {k: v for k, v in local.items() if k != "created"}
    assert {Path(r["path"]).name for r in beam["rejected"]} == {"3.jpg", "5.jpg"}
    assert beam["class_counts_unit"] == "pixels" and sum(beam["class_counts"]["train"].values()) > 0
    assert serialized_records(tmp_path / "beam") == serialized_records(tmp_path / "local")


def test_above_max_bad_fraction_the_beam_run_stops_with_exit_2_and_keeps_its_shards(small_digits, tmp_path,
                                                                                  capsys):
    pytest.importorskip("apache_beam")
    plant_broken(small_digits)
    out = tmp_path / "beam"
    assert main(["--config", str(write_config(small_digits, tmp_path, max_bad_fraction=0.0)), "--output", str(out),
                 "--shard-mb", str(SHARD_MB), "--runner", "DirectRunner", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "data.max_bad_fraction=0.0" in err
    assert not (out / "manifest.json").exists() and list(out.glob("*.tfrecord"))


def test_an_interrupted_beam_run_keeps_its_finished_shards(small_digits, tmp_path):
    pytest.importorskip("apache_beam")
    from tfvision.data.beam import convert_beam
    from tfvision.data.conversion import STATE, shard_state
    from tfvision.fileio import write_json

    cfg = load_config(write_config(small_digits, tmp_path))
    out = tmp_path / "beam"
    first = convert_beam(cfg, out, shard_mb=SHARD_MB)  # in-process DirectRunner
    # As a run killed after all shards but the last: its state files, no manifest.
    (out / "manifest.json").unlink()
    write_json(out / STATE, {"fingerprint": first["fingerprint"], "shards": {}})
    *kept, last = first["shards"]
    for s in kept:
        write_json(out / shard_state(s["name"]), {**s, "rejected": [], "pixel_counts": [0] * 10})
    (out / last["name"]).unlink()
    stamps = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in kept}

    second = convert_beam(cfg, out, shard_mb=SHARD_MB)
    assert {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in kept} == stamps  # not rewritten
    assert second["shards"] == first["shards"] and second["counts"] == first["counts"]
    assert not list(out.glob(".convert-state*"))


def test_without_apache_beam_the_runner_flag_names_the_extra(small_digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if not installed: import fails
    monkeypatch.delitem(sys.modules, "tfvision.data.beam", raising=False)
    out = tmp_path / "beam"
    assert main(["--config", str(write_config(small_digits, tmp_path)), "--output", str(out),
                 "--runner", "DirectRunner", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'tfvision[beam]'" in err and "Apache Beam" in err
    assert not out.exists()  # stopped before anything was written
    # The local converter does not need it.
    assert main(["--config", str(write_config(small_digits, tmp_path)), "--output", str(out),
                 "--shard-mb", "1", "--quiet"]) == 0


def test_cli_flags_parse_and_help_lists_them(capsys):
    args = parse_args(["--config", "c.json", "--output", "o", "--runner", "FlinkRunner",
                       "--beam-option", "flink_master=localhost:8081", "--beam-option", "parallelism=4"])
    assert args.runner == "FlinkRunner" and args.beam_options == ["flink_master=localhost:8081", "parallelism=4"]
    assert parse_args(["--config", "c.json", "--output", "o"]).runner is None  # the local converter
    assert RUNNERS == ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner")
    for bad in (["--runner", "NoSuchRunner"], ["--beam-option", "a=1"],
                ["--runner", "DirectRunner", "--beam-option", "--streaming"],
                ["--runner", "DirectRunner", "--beam-option", "=1"],
                ["--runner", "DataflowRunner", "--workers", "4"]):
        with pytest.raises(SystemExit) as e:
            parse_args(["--config", "c.json", "--output", "o", *bad])
        assert e.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--runner" in text and "--beam-option KEY=VALUE" in text and "tfvision[beam]" in text
    assert all(r in text for r in RUNNERS)


def test_beam_options_reach_the_pipeline_and_a_misspelt_one_is_refused():
    pytest.importorskip("apache_beam")
    from apache_beam.options.pipeline_options import DirectOptions

    from tfvision.data.beam import pipeline_options

    direct = pipeline_options("DirectRunner", [], workers=2).view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("multi_processing", 2)
    direct = pipeline_options("DirectRunner", ["direct_running_mode=multi_threading"], workers=2).view_as(
        DirectOptions)
    assert direct.direct_running_mode == "multi_threading"  # --beam-option wins over --workers
    with pytest.raises(ConfigError, match="'direct_num_worker' is not a Beam pipeline option"):
        pipeline_options("DirectRunner", ["direct_num_worker=2"])
    with pytest.raises(ConfigError, match="save_main_session"):  # a switch given a value
        pipeline_options("DirectRunner", ["save_main_session=true"])
    # Runner options reach Beam, a switch alone and a repeatable option (extra_package) too.
    opts = pipeline_options("FlinkRunner", ["flink_master=localhost:8081", "parallelism=4", "save_main_session",
                                            "extra_package=a.whl"]).get_all_options()
    assert (opts["flink_master"], opts["parallelism"], opts["save_main_session"], opts["extra_packages"]) == (
        "localhost:8081", 4, True, ["a.whl"])
