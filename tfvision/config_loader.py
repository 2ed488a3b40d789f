"""JSON config file -> validated `Config`, with the task's own section and rules.

    raw JSON --overrides--> build the schema (tfvision.config) --> the task's section
    (``{"task": "regression", "regression": {...}}``) --> the rules every task shares,
    then the task's (`Task.check_config`) --> paths

The loader sits above the tasks, which sit above the schema; nothing here imports
TensorFlow: a typo in a config must cost a second, not a minute.

>>> cfg = load_config("configs/demo.json", ["train.epochs=2"])
>>> cfg.train.epochs
2
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tfvision.config import Config, build, check_paths, check_semantics
from tfvision.config import json_schema as section_schema
from tfvision.errors import ConfigError
from tfvision.tasks import TASKS, get_task, task_names


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value). Values are JSON when they parse, else strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `key.path=value` in `raw`; a number indexes a list (``train.phases.1.lr=1e-4``)."""
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for depth, k in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                path = ".".join(keys[:depth])
                if not k.isdigit() or int(k) >= len(node):
                    raise ConfigError(f"--set {text!r}: {path} is a list of {len(node)}; index it with "
                                      f"0..{len(node) - 1}, not {k!r}")
                k = int(k)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {keys[depth - 1]!r} is not an object")
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
    return raw


def _task_section(raw: dict) -> tuple[dict, dict | None]:
    """(the config without task sections, the chosen task's section or None)."""
    name = raw.get("task", Config.__dataclass_fields__["task"].default)
    task = get_task(name) if isinstance(name, str) else None
    raw = dict(raw)
    section = raw.pop(name, None) if task is not None and task.options is not None else None
    for other in task_names():
        if other in raw and TASKS.get(other).options is not None:
            raise ConfigError(f"{other}: this section is for task {other!r}, and the task is {name!r}")
    if task is not None and task.options is not None and section is not None and not isinstance(section, dict):
        raise ConfigError(f"{name}: expected an object, got {json.dumps(section)}")
    return raw, section


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Validate a raw dict. Errors are prefixed with `source`."""
    try:
        rest, section = _task_section(raw)
        cfg = build(Config, rest)
        task = get_task(cfg.task)
        if task.options is not None:
            cfg.task_options = build(task.options, section or {}, cfg.task)
        check_semantics(cfg, task.backbones)
        task.check_config(cfg)
        check_paths(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a JSON config file.

    Args:
        path: the JSON file.
        overrides: `key.path=value` strings, applied before validation.

    Returns:
        The validated `Config`.

    Raises:
        ConfigError: with the file, key path and problem in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be an object")
    raw = apply_overrides(raw, overrides or [])
    cfg = config_from_dict(raw, str(path))
    if cfg.name is None:
        cfg.name = path.stem
    return cfg


def json_schema() -> dict:
    """The whole config's JSON Schema: the shared schema, every task's section, and per task
    (an ``if``/``then`` branch per task) its sources, losses and section."""
    schema = section_schema(Config)
    names = task_names()
    schema["properties"]["task"]["enum"] = names
    rules = []
    for name in names:
        task = TASKS.get(name)
        then = task.schema_rules()
        if task.options is not None:
            schema["properties"][name] = {**section_schema(task.options),
                                          "description": f"options of task {name!r} (only with that task)"}
        others = [n for n in names if n != name and TASKS.get(n).options is not None]
        if others:
            then["not"] = {"anyOf": [{"required": [n]} for n in others]}
        chosen = {"properties": {"task": {"const": name}}, "required": ["task"]}
        if name == Config.__dataclass_fields__["task"].default:  # also when "task" is left out
            chosen = {"anyOf": [chosen, {"not": {"required": ["task"]}}]}
        rules.append({"if": chosen, "then": then})
    schema["allOf"] = rules
    return schema
