"""The check pass: decode every file once, before training, and list the bad ones.

A corrupt file is reported with its path and reason and left out. It is never
replaced by a black image: a silent blank teaches the model a wrong label.
The pass uses the same `decode` as training, so "passes the check" means
"the pipeline can read it".
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import tensorflow as tf
from tqdm import tqdm

from tfvision.data.decode import decode, describe_error


def check_files(paths: list[str], channels: int, workers: int = 4, progress: bool = True) -> list[dict]:
    """Return ``[{"path", "reason"}]`` for every file that cannot be decoded.

    JPEGs are decoded at 1/8 scale: the entropy-coded stream (where truncation
    and corruption show) is still read in full, at a fraction of the cost.
    """

    # Eager on purpose: errors then carry the decoder's own message, not a graph trace.
    def probe(data):
        return tf.shape(decode(data, channels, target=(1, 1)))

    def one(path: str):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return {"path": path, "reason": f"cannot read: {e.strerror or e}"}
        if not data:
            return {"path": path, "reason": "empty file"}
        try:
            shape = probe(tf.constant(data))
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            return {"path": path, "reason": describe_error(e)}
        if int(shape[0]) == 0 or int(shape[1]) == 0:
            return {"path": path, "reason": "image has zero size"}
        return None

    bad = []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(one, paths)
        for r in tqdm(results, total=len(paths), desc="checking images", disable=None if progress else True, unit="img"):
            if r is not None:
                bad.append(r)
    return bad
