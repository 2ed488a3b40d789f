"""One small registry type for backbones, sources and tasks.

>>> BACKBONES = Registry("backbone")
>>> @BACKBONES.register("tiny")
... def tiny(): ...
>>> BACKBONES.get("tiny") is tiny
True
"""

from __future__ import annotations

from collections.abc import Callable

from tfvision.errors import did_you_mean


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str, **info):
        """Decorator: register `fn` under `name`, with optional static info."""

        def wrap(fn):
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            fn.registry_info = info
            self._items[name] = fn
            return fn

        return wrap

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names(), known='known')}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
