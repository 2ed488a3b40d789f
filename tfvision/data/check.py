"""The check pass: decode every file once, before training, and list the bad ones.

A corrupt file is reported with its path and reason and left out. It is never
replaced by a black image: a silent blank teaches the model a wrong label.
The pass uses the same `decode` as training, so "passes the check" means
"the pipeline can read it". Files are read and decoded in a parallel tf.data
map; only the failures are decoded again, eagerly, for the decoder's message
(graph errors carry node names instead). The TFRecord converter checks with
the same probe.
"""

from __future__ import annotations

import tensorflow as tf
from tqdm import tqdm

from tfvision import remote
from tfvision.data.decode import decode, describe_error


def probe(data: tf.Tensor, channels: int) -> tf.Tensor:
    """Decode as training would and fail on a zero-size image; returns the decoded shape.

    JPEGs decode at 1/8 scale: the entropy-coded stream (where truncation and
    corruption show) is still read in full, at a fraction of the cost.
    """
    shape = tf.shape(decode(data, channels, target=(1, 1)))
    ok = tf.logical_and(shape[0] > 0, shape[1] > 0)
    with tf.control_dependencies([tf.debugging.Assert(ok, ["image has zero size"])]):
        return tf.identity(shape)


def rejection_reason(path: str, channels: int) -> str | None:
    """Why `path` cannot be used, or None when it can."""
    try:
        data = remote.read_bytes(path)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    except tf.errors.OpError as e:  # a gs:// file
        return f"cannot read: {describe_error(e)}"
    if not data:
        return "empty file"
    try:
        probe(tf.constant(data), channels)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        msg = describe_error(e)
        return "image has zero size" if "zero size" in msg else msg
    return None


def check_files(paths: list[str], channels: int, progress: bool = True) -> list[dict]:
    """Return ``[{"path", "reason"}]`` for every file that cannot be decoded, in order."""

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def check(path):
        return probe(tf.io.read_file(path), channels)

    ds = tf.data.Dataset.from_tensor_slices(list(paths) or [""]).take(len(paths)).enumerate()
    ds = ds.map(lambda i, p: (i, check(p)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().prefetch(tf.data.AUTOTUNE)
    good = set()
    with tqdm(total=len(paths), desc="checking images", disable=None if progress else True, unit="img") as bar:
        for i, _ in ds:
            good.add(int(i))
            bar.update(1)
    bad = []
    for i, path in enumerate(paths):
        if i not in good:
            bad.append({"path": path, "reason": rejection_reason(path, channels) or "cannot be decoded"})
    return bad
