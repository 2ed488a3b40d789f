"""The TFRecord schema: every tf.Example key, in one place, for writer and reader.

One record is one image, stored as the file's own bytes (no re-encode), plus
what training needs to use it without the source folder:

==================  ============  ==========================================================
key                 type          meaning
==================  ============  ==========================================================
image/encoded       bytes         the image file's bytes, exactly as on disk
image/format        bytes         ``jpeg``, ``png``, ``gif``, ``bmp`` or ``unknown`` (magic bytes)
image/height        int64         pixels, from the header
image/width         int64         pixels, from the header
image/channels      int64         channels stored in the file (1 gray, 3 RGB, 4 CMYK/RGBA, ...)
image/id            bytes         the source path relative to ``data.root``
image/group         bytes         patient / lesion id (the path when the layout has none)
label/text          bytes         the raw label (multi-label: the class its split stratified on)
label/target        float [K]     the training target: one-hot (classification), multi-hot, ...
                                  (segmentation: zeros, the mask is the target)
label/known         float [K]     optional: 1 where the label is known (multi-label with gaps)
label/eval          float [K]     optional: what validation scores against when it differs from
                                  the target (multi-label: -1 where unknown or uncertain)
label/mask          bytes         optional: the integer label PNG's bytes (segmentation),
                                  checked at conversion: same size as the image, labels < K
instance/runs       int64 [...]   optional: every instance's COCO run lengths, concatenated
                                  (column-major, background first; instance segmentation)
instance/run_len    int64 [n]     optional: how many runs each instance has
instance/class      int64 [n]     optional: each instance's class index
instance/box        float [4n]    optional: each instance's box, x0, y0, x1, y1 (pixel edges)
sample/fold         int64         K-fold index of the converted split config, -1 outside folds
==================  ============  ==========================================================

The split is not a feature: it is the shard's file name
(``{split}-{i:05d}-of-{n:05d}.tfrecord``). ``K``, and whether the optional
keys are present, are in ``manifest.json`` (``num_classes``, ``has_known``,
``has_eval``, ``has_mask``, ``has_instances``), which the reader needs to build the parse spec.

Bump `SCHEMA_VERSION` on any change a reader of the old version would misread.

>>> rec = encode_example(image=data, height=32, width=32, channels=1, image_id="a.png",
...                      group="p1", label="3", target=[0, 0, 0, 1], fold=2)
>>> parsed = tf.io.parse_single_example(rec, parse_spec(4))
"""

from __future__ import annotations

SCHEMA_VERSION = 1

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
CHANNELS = "image/channels"
ID = "image/id"
GROUP = "image/group"
LABEL_TEXT = "label/text"
TARGET = "label/target"
KNOWN = "label/known"
EVAL = "label/eval"
MASK = "label/mask"
FOLD = "sample/fold"
INSTANCE_RUNS = "instance/runs"
INSTANCE_RUN_LENGTHS = "instance/run_len"
INSTANCE_CLASSES = "instance/class"
INSTANCE_BOXES = "instance/box"
INSTANCE_KEYS = (INSTANCE_RUNS, INSTANCE_RUN_LENGTHS, INSTANCE_CLASSES, INSTANCE_BOXES)

# Documentation that travels in manifest.json, so a shard folder explains itself.
DESCRIPTION = {
    ENCODED: "bytes: the image file, unchanged",
    FORMAT: "bytes: jpeg | png | gif | bmp | unknown, from the magic bytes",
    HEIGHT: "int64", WIDTH: "int64", CHANNELS: "int64: channels stored in the file",
    ID: "bytes: source path relative to data.root",
    GROUP: "bytes: patient / lesion id",
    LABEL_TEXT: "bytes: raw label",
    TARGET: "float[num_classes]: task encoding (one-hot, multi-hot)",
    KNOWN: "float[num_classes]: 1 where known (only if has_known)",
    EVAL: "float[num_classes]: validation truth, -1 where unscored (only if has_eval)",
    MASK: "bytes: integer label PNG (only if has_mask)",
    INSTANCE_RUNS: "int64[]: every instance's COCO run lengths, concatenated (only if has_instances)",
    INSTANCE_RUN_LENGTHS: "int64[n]: runs per instance (only if has_instances)",
    INSTANCE_CLASSES: "int64[n]: class index per instance (only if has_instances)",
    INSTANCE_BOXES: "float[4n]: x0, y0, x1, y1 per instance (only if has_instances)",
    FOLD: "int64: K-fold index under the converted split config, -1 outside folds",
}

_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def image_format(data: bytes) -> str:
    """The format named by the leading bytes, as the decoder will see it."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return "unknown"


def encode_example(
    *, image: bytes, height: int, width: int, channels: int, image_id: str, group: str, label: str,
    target, fold: int = -1, known=None, eval_target=None, mask: bytes | None = None,
    instances: dict | None = None,
) -> bytes:
    """One serialized tf.Example in this schema; `instances` maps the ``instance/*`` keys to arrays."""
    import tensorflow as tf

    def b(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    def f(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(x) for x in v]))

    feats = {
        ENCODED: b(image), FORMAT: b(image_format(image).encode()),
        HEIGHT: i(height), WIDTH: i(width), CHANNELS: i(channels),
        ID: b(image_id.encode()), GROUP: b(group.encode()), LABEL_TEXT: b(label.encode()),
        TARGET: f(target), FOLD: i(fold),
    }
    if known is not None:
        feats[KNOWN] = f(known)
    if eval_target is not None:
        feats[EVAL] = f(eval_target)
    if mask is not None:
        feats[MASK] = b(mask)
    for key, values in (instances or {}).items():
        feats[key] = (f(values) if key == INSTANCE_BOXES else
                      tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values])))
    # deterministic: map entries sorted by key. Otherwise their order follows the process's
    # string hashing, and the same conversion run twice gives different sha256s.
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


def parse_spec(num_classes: int, *, has_known: bool = False, has_eval: bool = False, has_mask: bool = False,
               has_instances: bool = False, keys: tuple[str, ...] | None = None) -> dict:
    """`tf.io.parse_*example` spec; `keys` restricts it (e.g. labels only)."""
    import tensorflow as tf

    spec = {
        ENCODED: tf.io.FixedLenFeature([], tf.string),
        FORMAT: tf.io.FixedLenFeature([], tf.string),
        HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        WIDTH: tf.io.FixedLenFeature([], tf.int64),
        CHANNELS: tf.io.FixedLenFeature([], tf.int64),
        ID: tf.io.FixedLenFeature([], tf.string),
        GROUP: tf.io.FixedLenFeature([], tf.string),
        LABEL_TEXT: tf.io.FixedLenFeature([], tf.string),
        TARGET: tf.io.FixedLenFeature([num_classes], tf.float32),
        FOLD: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }
    if has_known:
        spec[KNOWN] = tf.io.FixedLenFeature([num_classes], tf.float32)
    if has_eval:
        spec[EVAL] = tf.io.FixedLenFeature([num_classes], tf.float32)
    if has_mask:
        spec[MASK] = tf.io.FixedLenFeature([], tf.string)
    if has_instances:
        spec.update({k: tf.io.VarLenFeature(tf.float32 if k == INSTANCE_BOXES else tf.int64) for k in INSTANCE_KEYS})
    if keys is not None:
        spec = {k: v for k, v in spec.items() if k in keys}
    return spec
