"""Config validation: every bad config stops early with file, key path and reason."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import REPO, run_cli
from tfvision.config import Config
from tfvision.config_loader import json_schema, load_config
from tfvision.errors import ConfigError


def write(tmp_path, cfg: dict, name="cfg.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return p


@pytest.fixture
def base(small_digits) -> dict:
    return {
        "data": {"source": "csv", "root": str(small_digits), "csv": "digits.csv", "image_size": 32},
        "model": {"backbone": "small_cnn", "weights": None},
        "train": {"epochs": 1, "batch_size": 16},
    }


def error_of(tmp_path, cfg, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg), overrides)
    return str(e.value)


def test_valid_config_loads_with_typed_values(tmp_path, base):
    cfg = load_config(write(tmp_path, base))
    assert isinstance(cfg, Config)
    assert cfg.data.size == (32, 32)
    assert cfg.train.batch_size == 16 and cfg.name == "cfg"


def test_unknown_key_suggests_the_close_one(tmp_path, base):
    base["data"]["image_sise"] = 64
    msg = error_of(tmp_path, base)
    assert "cfg.json" in msg and "data.image_sise" in msg and "did you mean 'image_size'" in msg


def test_unknown_nested_key_and_choice(tmp_path, base):
    base["train"]["optimizer"] = {"nam": "adam"}
    assert "train.optimizer.nam" in error_of(tmp_path, base)
    base["train"]["optimizer"] = {"name": "adamm"}
    msg = error_of(tmp_path, base)
    assert "train.optimizer.name" in msg and "did you mean 'adam'" in msg


@pytest.mark.parametrize(
    "path, value, words",
    [
        (("train", "batch_size"), "32", "expected int"),
        (("train", "batch_size"), 0, "below the minimum 1"),
        (("data", "split"), {"val_fraction": 1.5}, "above the maximum"),
        (("data", "image_size"), [32, 32, 64], "expected N or [H, W]"),
        (("augment",), {"params": {"crop_scale": [0.9, 0.1]}}, "crop_scale"),
        (("train",), {"epochs": 5, "phases": [{"epochs": 2}, {"epochs": 2}]}, "add up to 4"),
    ],
)
def test_wrong_types_and_impossible_values(tmp_path, base, path, value, words):
    node = base
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    msg = error_of(tmp_path, base)
    assert words in msg and ".".join(path) in msg.replace("[", ".")


def test_missing_files_and_folders(tmp_path, base):
    base["data"]["csv"] = "nope.csv"
    assert "data.csv" in error_of(tmp_path, base) and "does not exist" in error_of(tmp_path, base)
    base["data"]["csv"] = "digits.csv"
    base["data"]["root"] = str(tmp_path / "missing")
    assert "data.root" in error_of(tmp_path, base)


def test_backbone_typo_is_caught_before_tensorflow(tmp_path, base):
    base["model"]["backbone"] = "efficientnetv2_b00"
    assert "did you mean 'efficientnetv2_b0'" in error_of(tmp_path, base)


def test_missing_required_key(tmp_path, base):
    del base["model"]["backbone"]
    assert "model.backbone: required key is missing" in error_of(tmp_path, base)


def test_overrides_are_typed_and_validated(tmp_path, base):
    cfg = load_config(write(tmp_path, base), ["train.batch_size=8", "data.split.method=grouped",
                                                "data.group_column=group", "model.head.hidden=[64,32]"])
    assert cfg.train.batch_size == 8 and cfg.data.split.method == "grouped"
    assert cfg.model.head.hidden == [64, 32]
    assert "train.batch_sise" in error_of(tmp_path, base, ["train.batch_sise=8"])


def test_overrides_index_lists(tmp_path, base):
    """A number in the key path indexes a list: one phase of a staged schedule, one hidden layer."""
    base["train"].update(epochs=3, phases=[{"epochs": 1, "lr": 1e-3, "trainable": "head"}, {"epochs": 2, "lr": 1e-4}])
    cfg = load_config(write(tmp_path, base), ["train.phases.1.lr=5e-5", "train.phases.0.trainable=all"])
    assert (cfg.train.phases[0].trainable, cfg.train.phases[0].lr, cfg.train.phases[1].lr) == ("all", 1e-3, 5e-5)
    assert "train.phases is a list of 2; index it with 0..1, not '2'" in error_of(
        tmp_path, base, ["train.phases.2.lr=1e-4"])
    assert "index it with 0..1, not 'last'" in error_of(tmp_path, base, ["train.phases.last.lr=1e-4"])
    assert "train.phases[1].lrr: unknown key (did you mean 'lr'?)" in error_of(tmp_path, base, ["train.phases.1.lrr=1e-4"])


def test_unknown_task_is_reported_with_a_hint(tmp_path, base):
    base["task"] = "clasification"
    assert "task: unknown task 'clasification' (did you mean 'classification'?)" in error_of(tmp_path, base)


def test_segmentation_needs_masks_and_class_names(tmp_path, base):
    base["task"] = "segmentation"
    assert "data.mask_column: required" in error_of(tmp_path, base)
    base["data"]["mask_column"] = "mask"
    assert "data.class_names" in error_of(tmp_path, base)


def test_json_schema_describes_the_config():
    schema = json_schema()
    data = schema["properties"]["data"]
    from tfvision.tasks import get_task, task_names

    # Every source the schema offers is read by some task, and every task's sources are offered.
    read_by_tasks = {s for name in task_names() for s in get_task(name).sources}
    assert set(data["properties"]["source"]["enum"]) == read_by_tasks
    assert "source" in data["required"] and data["additionalProperties"] is False
    batch = schema["properties"]["train"]["properties"]["batch_size"]
    assert {k: batch[k] for k in ("type", "minimum", "default")} == {"type": "integer", "minimum": 1, "default": 32}
    assert "per replica" in batch["description"]  # the help text reaches the schema
    json.dumps(schema)  # must be serialisable


def test_json_schema_carries_each_tasks_rules():
    """The schema, checked by an independent validator, accepts every shipped config and refuses
    what the tasks refuse: another task's loss or source, and another task's section."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    for path in sorted((REPO / "configs").glob("*.json")):
        raw = json.loads(path.read_text())
        assert not list(validator.iter_errors(raw)), path.name
    ham = json.loads((REPO / "configs" / "ham10000.json").read_text())
    for change in ({"train": {**ham["train"], "loss": {"name": "dice"}}},  # a segmentation loss
                   {"data": {**ham["data"], "source": "volumes"}},  # a segmentation source
                   {"regression": {"mode": "coral"}}):  # another task's section
        assert list(validator.iter_errors({**ham, **change})), change
    no_task = {k: v for k, v in ham.items() if k != "task"}  # the default task's rules still apply
    assert not list(validator.iter_errors(no_task))
    assert list(validator.iter_errors({**no_task, "train": {**ham["train"], "loss": {"name": "dice"}}}))
    assert not list(validator.iter_errors({**ham, "task": "regression", "regression": {"mode": "coral"},
                                           "data": {**ham["data"], "source": "csv"}}))


def test_cli_rejects_bad_config_fast_without_tensorflow(tmp_path, base):
    base["data"]["image_sise"] = 64
    p = write(tmp_path, base)
    t0 = time.time()
    r = run_cli("-m", "tfvision.train", "--config", str(p))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did you mean 'image_size'" in lines[0]
    assert time.time() - t0 < 15  # TensorFlow alone takes longer than this to import here


def test_validation_does_not_import_tensorflow(tmp_path, base):
    p = write(tmp_path, base)
    code = (f"import sys; from tfvision.config_loader import load_config; load_config({str(p)!r}); "
            "from tfvision.data.sources import load_samples; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    r = run_cli("-c", code)
    assert r.returncode == 0, r.stderr


def test_print_schema_cli():
    r = run_cli("-m", "tfvision.train", "--print-schema")
    assert r.returncode == 0
    assert json.loads(r.stdout)["title"] == "tfvision config"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.json")))
def test_shipped_configs_validate(tmp_path, name):
    raw = json.loads((REPO / "configs" / name).read_text())
    # Point the data at an empty real folder with the files the config names.
    # A config that prepares its data gets a folder that does not exist yet, as the demo's does.
    root = tmp_path / "data"
    raw["data"]["root"] = str(root)
    if not raw["data"].get("prepare"):
        root.mkdir()
        for key in ("csv", "val_csv", "annotations", "val_annotations"):
            if raw["data"].get(key):
                (root / raw["data"][key]).parent.mkdir(parents=True, exist_ok=True)
                (root / raw["data"][key]).write_text("x\n")
        for d in raw["data"].get("image_dirs", []):
            (root / d).mkdir(parents=True, exist_ok=True)
    cfg = load_config(write(tmp_path, raw, name))
    assert cfg.model.backbone
