"""Instance annotations from Kaggle CSVs and COCO JSON: per image, (class, mask) pairs.

Three readers, one result (`InstanceAnnotations`):

- `read_sartorius_csv`: ``id, annotation, width, height[, cell_type]``, one RLE
  per row (row-major by default, as the Sartorius notebooks decode it).
- `read_airbus_csv`: ``ImageId, EncodedPixels``; a row's mask may hold several
  objects, split by connected components; an empty ``EncodedPixels`` is an image
  with no objects. DSB 2018's ``stage1_train_labels.csv`` has the same layout.
- `read_coco_json`: polygons and RLE (compressed or not) through pycocotools.

A bad annotation never stops the read. It is left out and listed in ``rejected``
as ``{"image", "row", "reason"}``, where ``row`` is the 0-based data row of a CSV
(the header not counted) or the index in COCO's ``annotations`` list. An image
keeps its other instances. An image whose every annotation was rejected is left
out (nothing is known about what it shows) and gets one entry with ``row: None``;
an image that simply has no objects (Airbus' empty row, a COCO image with no
annotation) is kept, with zero instances, as a negative example.

Instances are stored as pycocotools' compressed RLE: a Sartorius image has up to
hundreds of cells, and [N, H, W] booleans for a whole dataset would not fit in
memory. `ImageInstances.masks` decodes one image on demand.

Boxes are derived from the masks: (x0, y0, x1, y1) in pixel-edge coordinates,
x1 and y1 one past the last foreground pixel, so that x1 - x0 is the mask's width
in pixels, the same numbers as COCO's ``[x, y, w, h]`` bbox of that mask.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask
from scipy import ndimage

from tfvision.data import rle as rle_codec
from tfvision.data.sources import _read_csv
from tfvision.errors import DataError


@dataclasses.dataclass
class ImageInstances:
    """One image's instances. ``rles`` are pycocotools RLEs (bytes counts), one an instance."""

    image: str
    height: int
    width: int
    classes: list[int] = dataclasses.field(default_factory=list)
    rles: list[dict] = dataclasses.field(default_factory=list)
    crowd: list[bool] = dataclasses.field(default_factory=list)

    def add(self, class_index: int, rle: dict, crowd: bool = False) -> None:
        self.classes.append(int(class_index))
        self.rles.append(rle)
        self.crowd.append(bool(crowd))
        self.__dict__.pop("masks", None)  # a cached decode no longer holds every instance

    @functools.cached_property
    def masks(self) -> np.ndarray:
        """[N, H, W] bool, decoded once."""
        if not self.rles:
            return np.zeros((0, self.height, self.width), bool)
        return np.moveaxis(coco_mask.decode(self.rles), -1, 0).astype(bool)

    @property
    def boxes(self) -> np.ndarray:
        """[N, 4] float32 (x0, y0, x1, y1), derived from the masks."""
        return boxes_from_masks(self.masks)


@dataclasses.dataclass
class InstanceAnnotations:
    images: list[ImageInstances]
    class_names: list[str]
    rejected: list[dict]  # [{"image", "row", "reason"}]


def boxes_from_masks(masks) -> np.ndarray:
    """Tight boxes of [N, H, W] masks as [N, 4] float32 (x0, y0, x1, y1); zeros for an empty mask.

    >>> boxes_from_masks(np.pad(np.ones((1, 2, 3), bool), ((0, 0), (1, 0), (4, 0)))).tolist()
    [[4.0, 1.0, 7.0, 3.0]]
    """
    masks = np.asarray(masks, dtype=bool)
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # [N, H], [N, W]

    def span(hits):
        return hits.argmax(axis=1), hits.shape[1] - hits[:, ::-1].argmax(axis=1)

    (y0, y1), (x0, x1) = span(rows), span(cols)
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    boxes[~rows.any(axis=1)] = 0
    return boxes


class _Collector:
    """Builds the per-image records in first-seen order and the rejected list."""

    def __init__(self, images: list[ImageInstances] = ()):
        self.images = {record.image: record for record in images}
        self.with_rows: dict[str, None] = {}  # an ordered set
        self.with_instances: set[str] = set()
        self.rejected: list[dict] = []

    def image(self, name: str, height: int, width: int) -> ImageInstances:
        return self.images.setdefault(name, ImageInstances(name, height, width))

    def seen(self, name: str) -> None:
        self.with_rows[name] = None

    def kept(self, name: str) -> None:
        self.with_instances.add(name)

    def reject(self, image: str, row, reason: str) -> None:
        self.rejected.append({"image": image, "row": row, "reason": reason})

    def result(self, class_names: list[str]) -> InstanceAnnotations:
        kept = []
        for name in [*self.images, *(n for n in self.with_rows if n not in self.images)]:
            if name in self.with_rows and name not in self.with_instances:
                self.reject(name, None, "every annotation was rejected; image left out")
            else:
                kept.append(self.images[name])
        return InstanceAnnotations(kept, class_names, self.rejected)


def _size(width, height) -> tuple[int, int]:
    """(H, W) from CSV cells; ValueError unless both are positive integers."""
    try:
        h, w = int(str(height).strip()), int(str(width).strip())
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise ValueError(f"width/height must be positive integers, got {width!r}x{height!r}")
    return h, w


def read_sartorius_csv(path, order: str = "C", base: int = 1, classes: list[str] | None = None,
                       class_column: str = "cell_type") -> InstanceAnnotations:
    """Read a Sartorius-style CSV: one instance per row, ``id, annotation, width, height``.

    Args:
        path: the CSV.
        order, base: the RLE's pixel order and first index (see `tfvision.data.rle`).
        classes: class names in index order; a row whose class is not listed is
            rejected. Default: the sorted distinct values of `class_column`.
        class_column: the class column; when the CSV has none, every instance is
            class 0, named "object".

    Returns:
        `InstanceAnnotations`, images in first-seen order.

    Raises:
        DataError: the file cannot be parsed or lacks a required column.
    """
    frame = _read_csv(Path(path), ["id", "annotation", "width", "height"])
    labels = frame[class_column].str.strip() if class_column in frame else None
    if classes is None:
        classes = sorted(set(labels)) if labels is not None else ["object"]
    index = {name: i for i, name in enumerate(classes)}
    out = _Collector()
    for row, (image, encoded, width, height) in enumerate(
            frame[["id", "annotation", "width", "height"]].itertuples(index=False)):
        out.seen(image)
        try:
            shape = _size(width, height)
            record = out.image(image, *shape)
            if shape != (record.height, record.width):
                raise ValueError(f"size {shape[1]}x{shape[0]} differs from the image's earlier "
                                 f"rows ({record.width}x{record.height})")
            label = labels.iloc[row] if labels is not None else classes[0]
            if label not in index:
                raise ValueError(f"class {label!r} is not one of {classes}")
            mask = rle_codec.decode(encoded, shape, order, base)
            if not mask.any():
                raise ValueError("empty mask")
        except ValueError as e:
            out.reject(image, row, str(e))
            continue
        record.add(index[label], rle_codec.coco_rles(mask[None])[0])
        out.kept(image)
    return out.result(list(classes))


def read_airbus_csv(path, shape: tuple[int, int] | Callable[[str], tuple[int, int]] = (768, 768),
                    order: str = "F", base: int = 1, class_name: str = "ship",
                    connectivity: int = 2) -> InstanceAnnotations:
    """Read an Airbus-style CSV, ``ImageId, EncodedPixels``, splitting each row into its objects.

    Args:
        path: the CSV.
        shape: (H, W) of every image (Airbus' are 768x768), or a function of the
            image id returning it (DSB 2018's sizes vary); when it raises
            OSError/ValueError the row is rejected with its message.
        order, base: the RLE's pixel order and first index (see `tfvision.data.rle`).
        class_name: the one class.
        connectivity: 2 joins diagonal neighbours into one object, 1 does not.
            Default 2: a thin object drawn at an angle touches itself only
            diagonally and must stay one instance.

    Returns:
        `InstanceAnnotations` with one class, images in first-seen order.

    Raises:
        DataError: the file cannot be parsed or lacks a required column.
    """
    frame = _read_csv(Path(path), ["ImageId", "EncodedPixels"])
    structure = ndimage.generate_binary_structure(2, connectivity)
    out = _Collector()
    for row, (image, encoded) in enumerate(frame[["ImageId", "EncodedPixels"]].itertuples(index=False)):
        out.seen(image)
        try:
            size = tuple(int(s) for s in (shape(image) if callable(shape) else shape))
            mask = rle_codec.decode(encoded, size, order, base)
        except (OSError, ValueError) as e:
            out.reject(image, row, str(e))
            continue
        record = out.image(image, *size)
        labels, count = ndimage.label(mask, structure)
        objects = labels[None] == np.arange(1, count + 1)[:, None, None]
        for one in rle_codec.coco_rles(objects):
            record.add(0, one)
        out.kept(image)
    return out.result([class_name])


# Tolerance for a COCO bbox past the image edge: tools write float boxes that end a
# rounding error past the last pixel; a whole pixel or more is a wrong box.
_BOX_TOLERANCE = 1.0


def read_coco_json(path) -> InstanceAnnotations:
    """Read a COCO instances JSON (``images``, ``annotations``, ``categories``).

    Class indices follow the categories sorted by id, from 0. ``iscrowd`` is
    kept per instance (``ImageInstances.crowd``). Images appear in the file's
    order; an image with no annotation is kept with zero instances.

    Raises:
        DataError: the file is not JSON, or its images or categories are malformed
            (each image needs ``id``, ``file_name``, ``height``, ``width``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        index = {c["id"]: i for i, c in enumerate(categories)}
        names = [str(c.get("name", c["id"])) for c in categories]
        images = {im["id"]: ImageInstances(str(im["file_name"]), int(im["height"]), int(im["width"]))
                  for im in data["images"]}
        annotations = data.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO instances file: {type(e).__name__}: {e}") from None
    out = _Collector(images.values())
    for row, ann in enumerate(annotations):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        record = _lookup(images, image_id)
        if record is None:
            out.reject(str(image_id), row, f"unknown image_id {image_id!r}")
            continue
        out.seen(record.image)
        try:
            if _lookup(index, ann.get("category_id")) is None:
                raise ValueError(f"unknown category_id {ann.get('category_id')!r}")
            rle = _coco_segmentation(ann.get("segmentation"), record.height, record.width)
            if not coco_mask.area(rle):
                raise ValueError("empty mask")
            _check_bbox(ann.get("bbox"), record.height, record.width)
        except ValueError as e:
            out.reject(record.image, row, str(e))
            continue
        record.add(index[ann["category_id"]], rle, bool(ann.get("iscrowd", 0)))
        out.kept(record.image)
    return out.result(names)


def _lookup(mapping: dict, key):
    """mapping.get(key), None for a key JSON made unhashable (a list where an id belongs)."""
    return mapping.get(key) if isinstance(key, int | str) else None


def _coco_segmentation(segmentation, height: int, width: int) -> dict:
    """A pycocotools RLE from a polygon list or an RLE dict, checked first.

    pycocotools does not check: it reads a 4-number polygon as a box, and decodes
    RLE counts that fall short of the image from uninitialised memory (2.0.11).
    """
    if isinstance(segmentation, list) and segmentation:
        for i, polygon in enumerate(segmentation):
            if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                    or not all(isinstance(v, int | float) and math.isfinite(v) for v in polygon)):
                raise ValueError(f"polygon {i} must be an even list of at least 6 finite numbers "
                                 "(3 points)")
        return coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict):
        if rle_codec.coco_size(segmentation) != (height, width):
            raise ValueError(f"RLE size {segmentation['size']} differs from the image's "
                             f"[{height}, {width}]")
        rle_codec.coco_counts(segmentation)
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return coco_mask.frPyObjects(segmentation, height, width)
        return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    raise ValueError("segmentation must be a list of polygons or an RLE dict")


def _check_bbox(bbox, height: int, width: int) -> None:
    if bbox is None:
        return
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
            or bbox[2] < 0 or bbox[3] < 0):
        raise ValueError(f"bbox must be [x, y, width, height] with width, height >= 0, got {bbox!r}")
    x, y, w, h = bbox
    if (x < -_BOX_TOLERANCE or y < -_BOX_TOLERANCE
            or x + w > width + _BOX_TOLERANCE or y + h > height + _BOX_TOLERANCE):
        raise ValueError(f"box {bbox} outside the {width}x{height} image")
