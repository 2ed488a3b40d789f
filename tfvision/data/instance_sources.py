"""Instance-segmentation sources: COCO JSON, Sartorius and Airbus CSVs as one sample table.

One row an image, like every other source (``path``, ``label``, ``group``,
``split``), so splitting, the file check and the run folder's split lists work
unchanged. The instances themselves stay out of the table: `image_instances`
reads them again, keyed by the same image paths, for the task that feeds them
to the pipeline (`tfvision.tasks.instance_segmentation`). Both reads go
through one cached parse per file.

An annotation rejected by its reader (malformed RLE, a run past the image, an
empty mask, a box outside the image) becomes a ``missing`` entry with its
``row``; `tfvision.data.inputs.check_data` lists those under
``rejected_annotations`` in data_report.json and keeps the image with its other
instances. An image whose size on disk differs from its annotations' is left
out, with the two sizes as the reason.

Layouts (``data.path_template`` fields are the layout's image key):

- ``coco``: ``data.annotations`` (and ``data.val_annotations``) JSON; image
  ``file_name`` under ``data.root`` or under one of ``data.image_dirs``.
- ``sartorius``: ``data.csv`` with ``id, annotation, width, height`` and the class
  in ``data.label_column`` (``cell_type``; one class ``object`` when the column
  is absent); images at ``train/{id}.png``.
- ``airbus``: ``data.csv`` with ``ImageId, EncodedPixels``, one class ``ship``,
  each row split into connected objects; images at ``train_v2/{ImageId}``.
  DSB 2018's ``stage1_train_labels.csv`` has this layout.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from tfvision.config import DataConfig
from tfvision.data import instance_annotations as ia
from tfvision.data.sources import SOURCES, SampleTable
from tfvision.errors import DataError

# (reader, the image key's name in data.path_template, default template, default RLE order)
_LAYOUTS = {
    "coco": ("file_name", "{file_name}", None),
    "sartorius": ("id", "train/{id}.png", "C"),
    "airbus": ("ImageId", "train_v2/{ImageId}", "F"),
}


def _image_path(data: DataConfig, key: str) -> Path:
    root = Path(data.root)
    field, default, _ = _LAYOUTS[data.source]
    relative = (data.path_template or default).format(**{field: key})
    for folder in data.image_dirs:  # the first folder holding the file, as ham10000 searches
        if (root / folder / relative).is_file():
            return root / folder / relative
    return root / relative


def _header_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header (PIL reads no pixels); OSError when unreadable."""
    with Image.open(path) as im:
        return im.height, im.width


def _parse(source: str, path: str, options: tuple) -> ia.InstanceAnnotations:
    """Parse one annotation file (the table that calls this is cached: the source and the task both ask)."""
    kw = dict(options)
    if source == "coco":
        return ia.read_coco_json(path)
    if source == "sartorius":
        return ia.read_sartorius_csv(path, order=kw["order"], base=kw["base"], classes=kw["classes"],
                                     class_column=kw["class_column"])
    images = Path(kw["images"])  # airbus: sizes vary in DSB 2018, so each comes from its header
    return ia.read_airbus_csv(path, shape=lambda key: _header_size(images / key), order=kw["order"],
                              base=kw["base"])


def _annotation_files(data: DataConfig) -> list[tuple[str, str | None]]:
    """[(file, fixed split)]: the training file and, when given, the validation one."""
    first, second = ((data.annotations, data.val_annotations) if data.source == "coco"
                     else (data.csv, data.val_csv))
    return [(first, "train" if second else None)] + ([(second, "val")] if second else [])


def _read(data: DataConfig, relative: str) -> ia.InstanceAnnotations:
    path = Path(data.root) / relative
    order = data.rle_order or _LAYOUTS[data.source][2]
    classes = tuple(data.class_names) if data.class_names else None
    class_column = data.label_column if data.label_column != "label" else "cell_type"
    images = Path(data.root) / Path(data.path_template or _LAYOUTS[data.source][1]).parent
    options = (("order", order), ("base", data.rle_base), ("classes", classes),
               ("class_column", class_column), ("images", str(images)))
    return _parse(data.source, str(path), options)


def _table(data: DataConfig):
    """(rows, missing, instances by path, class names) over the layout's annotation files."""
    key = tuple(str(getattr(data, f)) for f in (
        "source", "root", "annotations", "val_annotations", "csv", "val_csv", "path_template", "image_dirs",
        "rle_order", "rle_base", "class_names", "label_column"))
    stamps = tuple((Path(data.root) / f).stat().st_mtime for f, _ in _annotation_files(data))
    if key + stamps not in _TABLES:
        _TABLES.clear()  # one dataset at a time: Sartorius' instances alone are ~100 MB of RLE
        _TABLES[key + stamps] = _build_table(data)
    return _TABLES[key + stamps]


_TABLES: dict[tuple, tuple] = {}


def _build_table(data: DataConfig):
    rows, missing, by_path, class_names = [], [], {}, None
    for relative, split in _annotation_files(data):
        parsed = _read(data, relative)
        if class_names is not None and parsed.class_names != class_names:
            raise DataError(f"{relative}: classes {parsed.class_names} differ from the training file's "
                            f"{class_names}")
        class_names = parsed.class_names
        for r in parsed.rejected:
            missing.append({"path": str(_image_path(data, r["image"])), "row": r["row"],
                            "file": relative, "reason": r["reason"]})
        for record in parsed.images:
            path = _image_path(data, record.image)
            reason = _image_problem(path, record)
            if reason:
                missing.append({"path": str(path), "reason": reason})
                continue
            by_path[str(path)] = record
            counts = pd.Series(record.classes).value_counts()
            rows.append({"path": str(path), "label": class_names[counts.idxmax()] if len(counts) else "none",
                         "group": str(path), "split": split or ""})
    return rows, missing, by_path, class_names


def _image_problem(path: Path, record: ia.ImageInstances) -> str | None:
    if not path.is_file():
        return "file not found"
    try:
        size = _header_size(path)
    except OSError as e:
        return f"unreadable image: {e}"
    if size != (record.height, record.width):
        return (f"image is {size[1]}x{size[0]} but its annotations are {record.width}x{record.height}")
    return None


# Submission CSV per layout: (id column, RLE column, id from the file name, RLE order). Sartorius
# wants the name without extension, row-major runs; Airbus and DSB the file name, column-major.
SUBMISSION = {
    "coco": ("file_name", "EncodedPixels", "name", "F"),
    "sartorius": ("id", "predicted", "stem", "C"),
    "airbus": ("ImageId", "EncodedPixels", "name", "F"),
}


def instance_source(data: DataConfig) -> SampleTable:
    rows, missing, _, _ = _table(data)
    if not rows:
        raise DataError(f"data.root: no annotated image of {data.source!r} exists under {data.root}")
    return SampleTable(pd.DataFrame(rows), missing)


for _name in _LAYOUTS:
    SOURCES.register(_name)(instance_source)


def image_instances(data: DataConfig) -> tuple[dict[str, ia.ImageInstances], list[str]]:
    """Instances by image path (the sample table's ``path``), and the class names in index order."""
    _, _, by_path, class_names = _table(data)
    return by_path, list(data.class_names or class_names)
