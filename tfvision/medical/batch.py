"""What the batch commands (dicom_to_nifti, rtstruct_to_labels) share: parallel tasks that
survive failures, and files written whole or not at all."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import Executor, as_completed
from pathlib import Path

from tfvision.medical.dicom import require


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary sibling and rename, so `path` is never partial.

    >>> atomic_write(Path("a.json"), lambda p: p.write_text("{}"))  # doctest: +SKIP

    Args:
        path: the final file name.
        write: called with the temporary path (same directory and suffixes, so
            nibabel still picks gzip from ``.nii.gz``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name[: -len(suffix) or None]}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on one filesystem
    finally:
        tmp.unlink(missing_ok=True)


def map_tasks(pool: Executor | None, fn, items, progress: bool, desc: str):
    """Map `fn` over argument tuples in `pool` (or inline), yielding ``(item, result or exception)``.

    A task that raises (or whose worker dies) yields its exception instead of
    stopping the batch, so one bad series or patient never stops the others.

    >>> for item, result in map_tasks(None, pow, [(2, 3)], False, "demo"): print(result)  # doctest: +SKIP
    8

    Args:
        pool: a ``concurrent.futures`` executor, or None to run in this process.
        fn: called as ``fn(*item)``.
        items: argument tuples.
        progress: show a tqdm bar on stderr.
        desc: the bar's label.

    Yields:
        ``(item, result)`` in completion order; ``result`` is the exception when the task failed.
    """
    tqdm = require("tqdm").tqdm
    bar = tqdm(total=len(items), desc=desc, unit="task", disable=not progress, file=sys.stderr)
    if pool is None:
        for item in items:
            try:
                yield item, fn(*item)
            except Exception as e:
                yield item, e
            bar.update()
    else:
        futures = {pool.submit(fn, *item): item for item in items}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as e:  # e.g. a worker killed by the OOM killer
                yield futures[future], e
            bar.update()
    bar.close()
