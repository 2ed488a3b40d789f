"""What the batch commands (dicom_to_nifti, rtstruct_to_labels) share: parallel tasks that
survive failures. (Their files are written whole or not at all by `tfvision.fileio`.)"""

from __future__ import annotations

import sys
from concurrent.futures import Executor, as_completed

from tfvision.medical.dicom import require


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
