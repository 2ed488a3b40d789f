"""Atomic writes: a crash never leaves a partial file under a final name.

Each writer writes to a temporary sibling and `os.replace`s it into place
(atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to `path`; move it into place on success.

    `suffix` keeps an extension some writers insist on (Keras wants ``.keras``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n")


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path):
    return json.loads(Path(path).read_text())


def build_dir(final: str | os.PathLike, build, marker: str) -> Path:
    """Create folder `final` once: `build(tmp)` fills a temporary sibling, which then
    replaces `final`. `marker` (a file `build` writes last) says a folder is complete, so
    a folder left by a killed build is rebuilt rather than trusted."""
    import shutil
    import tempfile

    final = Path(final)
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        if not (tmp / marker).exists():
            raise RuntimeError(f"building {final} did not write {marker}")  # a bug in `build`
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final
