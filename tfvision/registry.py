"""One small registry type for backbones, sources, tasks and built-in datasets.

>>> BACKBONES = Registry("backbone")
>>> @BACKBONES.register("tiny")
... def tiny(): ...
>>> BACKBONES.get("tiny") is tiny
True
"""

from __future__ import annotations

from collections.abc import Callable

from tfvision.errors import did_you_mean

_MISSING = object()


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

    def get(self, name: str, default=_MISSING) -> Callable:
        """The entry registered as `name`; `default` if given and there is none, else KeyError."""
        if name in self._items:
            return self._items[name]
        if default is not _MISSING:
            return default
        raise KeyError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names(), known='known')}")

    # Item access lets a test put a stand-in in place and take it out again
    # (pytest's monkeypatch.setitem), which the register-once decorator refuses.
    def __setitem__(self, name: str, fn: Callable) -> None:
        self._items[name] = fn

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
