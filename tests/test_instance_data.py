"""Instance data on real pixels: RLE codecs and the Sartorius, Airbus and COCO readers.

The instances are scikit-image's coins() photo cut into its 24 coins, and a few
synthetic shapes that overlap. pycocotools is the oracle wherever it has an answer.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from tfvision.data import rle
from tfvision.data.instance_annotations import (
    boxes_from_masks,
    read_airbus_csv,
    read_coco_json,
    read_sartorius_csv,
)


@functools.cache
def coin_instances() -> np.ndarray:
    """[24, 303, 384] bool: coins() split by marker-based watershed on the Sobel elevation map
    (markers from dark background and bright coin pixels), holes filled, specks dropped."""
    from scipy import ndimage
    from skimage import data, filters, segmentation

    coins = data.coins()
    markers = np.zeros(coins.shape, np.uint8)
    markers[coins < 30], markers[coins > 150] = 1, 2
    foreground = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(coins), markers) == 2)
    labels, count = ndimage.label(foreground)
    areas = np.bincount(labels.ravel())
    keep = [k for k in range(1, count + 1) if areas[k] >= 100]
    return labels[None] == np.array(keep)[:, None, None]


def overlapping_shapes() -> np.ndarray:
    """[3, 40, 50] bool: a disk, a square and a bar that overlap each other."""
    from skimage import draw

    masks = np.zeros((3, 40, 50), bool)
    masks[0][draw.disk((18, 18), 12, shape=(40, 50))] = True
    masks[1, 10:30, 20:40] = True
    masks[2, 24:30, 5:48] = True
    return masks


def test_coins_give_24_instances():
    masks = coin_instances()
    assert masks.shape == (24, 303, 384)
    assert masks.sum(axis=0).max() == 1  # a label map: disjoint


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("base", [1, 0])
def test_rle_round_trips(order, base):
    for mask in [*coin_instances(), *overlapping_shapes()]:
        encoded = rle.encode(mask, order, base)
        assert np.array_equal(rle.decode(encoded, mask.shape, order, base), mask)


def test_rle_orders_and_bases_relate():
    # Row-major runs of a mask are column-major runs of its transpose; base 0 starts one lower.
    for mask in coin_instances()[:5]:
        assert rle.encode(mask, "C") == rle.encode(mask.T, "F")
        ones, zeros = (np.array(rle.encode(mask, "F", b).split(), int) for b in (1, 0))
        assert np.array_equal(ones[0::2] - 1, zeros[0::2])
        assert np.array_equal(ones[1::2], zeros[1::2])


def test_rle_agrees_with_pycocotools():
    for mask in [*coin_instances(), *overlapping_shapes()]:
        theirs = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
        assert np.array_equal(rle.decode(rle.encode(mask, "F"), mask.shape, "F"), coco_mask.decode(theirs))
        lengths = np.array(rle.encode(mask, "F").split(), int)[1::2]
        assert lengths.sum() == coco_mask.area(theirs) == mask.sum()
        # Our COCO side: compressed and uncompressed counts decode like pycocotools'.
        ours = rle.to_coco(mask)
        assert ours["counts"] == theirs["counts"].decode()
        assert np.array_equal(rle.from_coco(ours), coco_mask.decode(theirs))
        listed = {"size": list(mask.shape), "counts": rle.coco_counts(ours).tolist()}
        assert np.array_equal(rle.from_coco(listed), mask)
        assert np.array_equal(coco_mask.decode(coco_mask.frPyObjects(listed, *mask.shape)), mask)


@pytest.mark.parametrize("order", ["F", "C"])
def test_rle_empty_and_full_masks(order):
    empty, full = np.zeros((7, 9), bool), np.ones((7, 9), bool)
    assert rle.encode(empty, order) == ""
    assert not rle.decode("", (7, 9), order).any()
    assert rle.encode(full, order) == "1 63"
    assert rle.decode("1 63", (7, 9), order).all()
    assert rle.encode(full, order, base=0) == "0 63"
    for mask in (empty, full):
        assert np.array_equal(rle.from_coco(rle.to_coco(mask)), mask)
        assert np.array_equal(coco_mask.decode(rle.to_coco(mask)), mask)


@pytest.mark.parametrize("text, reason", [
    ("1 2 3", "odd number"),
    ("1 x", "not an integer"),
    ("1 2.5", "not an integer"),
    ("3 0", "zero or negative length"),
    ("3 -2", "zero or negative length"),
    ("1 5 3 2", "overlapping"),
    ("20 2 3 2", "out of order"),
    ("60 5", "runs past the image"),
    ("0 2", "before the first pixel"),
])
def test_rle_malformed_strings_raise_with_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        rle.decode(text, (7, 9), "F", 1)


def test_rle_touching_runs_are_valid():
    assert rle.decode("1 2 3 2", (1, 6), "C").tolist() == [[True] * 4 + [False] * 2]


@pytest.mark.parametrize("counts, reason", [
    ([3, 100, 2], "runs past the image"),
    ([3, 4], "short of the image"),
    ([3, -1, 18], "negative count"),
    ("3", "short of the image"),  # pycocotools 2.0.11 decodes this from uninitialised memory
    ("\x7f", "outside"),
])
def test_coco_rle_bad_counts_raise(counts, reason):
    with pytest.raises(ValueError, match=reason):
        rle.from_coco({"size": [4, 5], "counts": counts})


def test_boxes_match_pycocotools_bbox():
    masks = np.concatenate([coin_instances(), np.zeros((1, 303, 384), bool)])
    boxes = boxes_from_masks(masks)
    theirs = coco_mask.toBbox(coco_mask.encode(np.asfortranarray(np.moveaxis(masks, 0, -1), dtype=np.uint8)))
    assert np.array_equal(boxes[:, :2], theirs[:, :2])
    assert np.array_equal(boxes[:, 2:] - boxes[:, :2], theirs[:, 2:])
    assert not boxes[-1].any()  # the empty mask


def _sartorius_rows(image, masks, kinds, order="C"):
    return [{"id": image, "annotation": rle.encode(m, order), "width": m.shape[1], "height": m.shape[0],
             "cell_type": kinds[i % len(kinds)]} for i, m in enumerate(masks)]


def test_sartorius_reads_instances_and_reports_each_bad_row(tmp_path):
    coins, shapes = coin_instances(), overlapping_shapes()
    good = _sartorius_rows("coins", coins, ["astro", "cort"]) + _sartorius_rows("shapes", shapes, ["shsy5y"])
    size = {"id": "coins", "width": 384, "height": 303, "cell_type": "astro"}
    bad = [
        ({**size, "annotation": "1 2 3"}, "odd number"),
        ({**size, "annotation": "5 x"}, "not an integer"),
        ({**size, "annotation": "9 0"}, "zero or negative length"),
        ({**size, "annotation": "10 5 12 3"}, "overlapping"),
        ({**size, "annotation": "100 2 50 2"}, "out of order"),
        ({**size, "annotation": f"{303 * 384 - 1} 5"}, "runs past the image"),
        ({**size, "annotation": ""}, "empty mask"),
        ({**size, "annotation": "1 4", "width": "wide"}, "positive integers"),
        ({**size, "annotation": "1 4", "width": 380}, "differs from the image's earlier rows"),
        ({**size, "annotation": "1 4", "cell_type": "neuron"}, "class 'neuron' is not one of"),
        ({**size, "id": "broken", "annotation": "7"}, "odd number"),
    ]
    rows = good[:3] + [r for r, _ in bad] + good[3:]
    path = tmp_path / "train.csv"
    pd.DataFrame(rows).to_csv(path, index=False)

    read = read_sartorius_csv(path, classes=["astro", "cort", "shsy5y"])

    assert read.class_names == ["astro", "cort", "shsy5y"]
    coins_image, shapes_image = read.images  # "broken" had no valid row
    assert (coins_image.image, shapes_image.image) == ("coins", "shapes")
    assert np.array_equal(coins_image.masks, coins)
    assert coins_image.classes == [i % 2 for i in range(len(coins))]
    assert np.array_equal(shapes_image.masks, shapes)  # overlapping ground truth kept
    assert shapes_image.classes == [2, 2, 2]
    assert np.array_equal(coins_image.boxes, boxes_from_masks(coins))
    *per_row, last = read.rejected
    assert [r["row"] for r in per_row] == list(range(3, 3 + len(bad)))
    for rejected, (row, reason) in zip(per_row, bad, strict=True):
        assert rejected["image"] == row["id"] and reason in rejected["reason"], rejected
    assert last == {"image": "broken", "row": None, "reason": "every annotation was rejected; image left out"}


def test_sartorius_default_classes_are_the_sorted_cell_types(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame(_sartorius_rows("coins", coin_instances()[:3], ["shsy5y", "astro"])).to_csv(path, index=False)
    read = read_sartorius_csv(path)
    assert read.class_names == ["astro", "shsy5y"] and read.images[0].classes == [1, 0, 1]


def test_sartorius_pixel_order_is_configurable(tmp_path):
    coins = coin_instances()[:4]
    path = tmp_path / "f.csv"
    pd.DataFrame(_sartorius_rows("coins", coins, ["a"], order="F")).drop(columns="cell_type").to_csv(path, index=False)
    read = read_sartorius_csv(path, order="F")
    assert read.class_names == ["object"] and not read.rejected
    assert np.array_equal(read.images[0].masks, coins)


def test_airbus_splits_rows_into_objects_and_keeps_empty_images(tmp_path):
    coins = coin_instances()
    pairs = [coins[0] | coins[5], coins[7]]  # the first row holds two blobs
    rows = [{"ImageId": "a.jpg", "EncodedPixels": rle.encode(m)} for m in pairs]
    rows += [{"ImageId": "sea.jpg", "EncodedPixels": ""},
             {"ImageId": "a.jpg", "EncodedPixels": "3 3 1 1"},
             {"ImageId": "bad.jpg", "EncodedPixels": f"{303 * 384} 2"}]
    path = tmp_path / "ships.csv"
    pd.DataFrame(rows).to_csv(path, index=False)

    read = read_airbus_csv(path, shape=(303, 384))

    assert read.class_names == ["ship"]
    a, sea = read.images
    assert (a.image, sea.image) == ("a.jpg", "sea.jpg")
    assert len(a.masks) == 3 and a.classes == [0, 0, 0]
    found = {m.tobytes() for m in a.masks}
    assert found == {coins[0].tobytes(), coins[5].tobytes(), coins[7].tobytes()}
    assert sea.masks.shape == (0, 303, 384) and sea.boxes.shape == (0, 4)
    assert [(r["image"], r["row"]) for r in read.rejected] == [("a.jpg", 3), ("bad.jpg", 4), ("bad.jpg", None)]
    assert "out of order" in read.rejected[0]["reason"]
    assert "runs past the image" in read.rejected[1]["reason"]


def test_airbus_diagonal_touch_is_one_object_at_connectivity_2(tmp_path):
    diagonal = np.eye(12, dtype=bool)
    path = tmp_path / "d.csv"
    pd.DataFrame([{"ImageId": "d", "EncodedPixels": rle.encode(diagonal)}]).to_csv(path, index=False)
    assert len(read_airbus_csv(path, shape=(12, 12)).images[0].masks) == 1
    assert len(read_airbus_csv(path, shape=(12, 12), connectivity=1).images[0].masks) == 12


def _polygons(mask) -> list[list[float]]:
    from skimage import measure

    contours = measure.find_contours(np.pad(mask, 1).astype(float), 0.5)
    return [np.fliplr(c - 1).ravel().round(2).tolist() for c in contours]  # (row, col) -> x, y


def _coco_file(tmp_path):
    coins, shapes = coin_instances(), overlapping_shapes()
    h, w = coins.shape[1:]
    compressed = rle.to_coco(coins[2])
    uncompressed = {"size": [h, w], "counts": rle.coco_counts(compressed).tolist()}
    good = [
        {"image_id": 1, "category_id": 7, "segmentation": _polygons(coins[0]), "iscrowd": 0},
        {"image_id": 1, "category_id": 7, "segmentation": _polygons(coins[1]) + _polygons(coins[3])},
        {"image_id": 1, "category_id": 3, "segmentation": compressed, "iscrowd": 0},
        {"image_id": 1, "category_id": 3, "segmentation": uncompressed, "iscrowd": 1},
        {"image_id": 2, "category_id": 3, "segmentation": rle.to_coco(shapes[1])},
        {"image_id": 2, "category_id": 7, "segmentation": rle.to_coco(shapes[2]), "bbox": [5, 24, 43, 6]},
    ]
    bad = [
        ({"image_id": 1, "category_id": 7, "segmentation": rle.to_coco(coins[4]), "bbox": [300, 10, 90, 20]},
         "outside the 384x303 image"),
        ({"image_id": 1, "category_id": 7, "segmentation": {"size": [h, w], "counts": [5, h * w]}},
         "runs past the image"),
        ({"image_id": 1, "category_id": 7, "segmentation": {"size": [h, w], "counts": [5, 10]}},
         "short of the image"),
        ({"image_id": 1, "category_id": 7, "segmentation": {"size": [h, 10], "counts": [h * 10]}},
         "differs from the image's"),
        ({"image_id": 1, "category_id": 7, "segmentation": [[10, 10, 20, 20]]}, "at least 6"),
        ({"image_id": 1, "category_id": 7, "segmentation": [[10, 10, 20, 20, 30, 30]]}, "empty mask"),
        ({"image_id": 1, "category_id": 99, "segmentation": _polygons(coins[5])}, "unknown category_id"),
        ({"image_id": 42, "category_id": 7, "segmentation": _polygons(coins[5])}, "unknown image_id"),
        ({"image_id": 2, "category_id": 7}, "segmentation must be"),
    ]
    annotations = [dict(a, id=i + 1) for i, a in enumerate(good + [b for b, _ in bad])]
    data = {"images": [{"id": 1, "file_name": "coins.png", "height": h, "width": w},
                       {"id": 2, "file_name": "shapes.png", "height": 40, "width": 50},
                       {"id": 3, "file_name": "nothing.png", "height": 8, "width": 8}],
            "categories": [{"id": 7, "name": "coin"}, {"id": 3, "name": "shape"}],
            "annotations": annotations}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, good, [reason for _, reason in bad]


def test_coco_reads_polygons_and_rles_like_pycocotools(tmp_path):
    path, good, reasons = _coco_file(tmp_path)
    coins, shapes = coin_instances(), overlapping_shapes()

    read = read_coco_json(path)

    assert read.class_names == ["shape", "coin"]  # categories sorted by id
    coins_image, shapes_image, nothing = read.images
    assert (coins_image.image, shapes_image.image, nothing.image) == ("coins.png", "shapes.png", "nothing.png")
    theirs = COCO(str(path))
    expected = [theirs.annToMask(theirs.anns[i + 1]).astype(bool) for i in range(len(good))]
    assert np.array_equal(coins_image.masks, expected[:4])
    assert np.array_equal(shapes_image.masks, expected[4:])
    assert coins_image.classes == [1, 1, 0, 0] and coins_image.crowd == [False, False, False, True]
    # The rasterised contours are the coins, to within their boundary pixels.
    for mask, coin in zip(coins_image.masks[:2], (coins[0], coins[1] | coins[3]), strict=True):
        assert (mask & coin).sum() / (mask | coin).sum() > 0.9
    assert np.array_equal(coins_image.masks[2:], coins[[2, 2]])
    assert np.array_equal(shapes_image.masks, shapes[1:])
    assert nothing.masks.shape == (0, 8, 8)  # an image without annotations is a negative, kept
    assert [r["row"] for r in read.rejected] == list(range(len(good), len(good) + len(reasons)))
    for rejected, reason in zip(read.rejected, reasons, strict=True):
        assert reason in rejected["reason"], rejected
