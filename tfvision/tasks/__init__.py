"""Tasks: what differs between classification, multi-label, segmentation, ...

A task is one module of this package that registers a `tfvision.tasks.base.Task`
(Model Garden's Task idea); the generic code only talks to that contract.
Every module here is imported on the first lookup, so a new task needs no list
to be edited. Importing them loads no TensorFlow (config validation uses them).
"""

import importlib
import pkgutil

from tfvision.errors import ConfigError, did_you_mean
from tfvision.tasks.base import TASKS, Task

__all__ = ["TASKS", "Task", "get_task", "task_names"]


def _register_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def task_names() -> list[str]:
    _register_all()
    return TASKS.names()


def get_task(name: str, cfg=None) -> Task:
    """The task registered as `name`, configured by `cfg` (the run's Config; None for inference)."""
    if name not in task_names():
        raise ConfigError(f"task: unknown task {name!r}{did_you_mean(name, TASKS.names(), known='registered')}")
    return TASKS.get(name)(cfg)
