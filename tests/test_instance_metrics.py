"""Instance metrics against independent oracles: a per-pair NumPy Kaggle score, pycocotools'
COCOeval called directly, and the ownership rules of overlap removal."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from tests.test_instance_data import coin_instances, overlapping_shapes
from tfvision.instance_metrics import (
    airbus_f2,
    coco_ap,
    kaggle_iou_sweep,
    remove_overlaps,
    sweep_scores,
)

THRESHOLDS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def direct_sweep(gt, pred, beta=None) -> float:
    """Kaggle's published recipe for disjoint masks, with IoU by explicit per-pair loops."""
    if len(gt) == 0 and len(pred) == 0:
        return 1.0
    iou = np.zeros((len(gt), len(pred)))
    for i in range(len(gt)):
        for j in range(len(pred)):
            union = np.logical_or(gt[i], pred[j]).sum()
            iou[i, j] = np.logical_and(gt[i], pred[j]).sum() / union
    scores = []
    for t in THRESHOLDS:
        hits = iou > t
        tp = (hits.sum(axis=1) == 1).sum()
        fn = (hits.sum(axis=1) == 0).sum()
        fp = (hits.sum(axis=0) == 0).sum()
        if beta is None:
            scores.append(tp / (tp + fp + fn))
        else:
            b2 = beta**2
            scores.append((1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp))
    return float(np.mean(scores))


def random_instances(rng, shape=(48, 64), count=None) -> np.ndarray:
    """Disjoint instances: random ellipses painted into a label map, later ones on top."""
    from skimage import draw

    labels = np.zeros(shape, int)
    for k in range(1, (rng.integers(1, 9) if count is None else count) + 1):
        centre = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        rr, cc = draw.ellipse(*centre, rng.uniform(3, 12), rng.uniform(3, 12), shape=shape,
                              rotation=rng.uniform(0, np.pi))
        labels[rr, cc] = k
    present = [k for k in np.unique(labels) if k]
    return labels[None] == np.array(present, int).reshape(-1, 1, 1)


def perturbed(rng, masks) -> np.ndarray:
    """A plausible prediction: objects shifted, grown or shrunk, some lost, one invented;
    made disjoint again as a submission must be."""
    out = []
    for m in masks:
        if rng.random() < 0.2:
            continue
        m = np.roll(m, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        m = ndimage.binary_dilation(m) if rng.random() < 0.3 else m
        m = ndimage.binary_erosion(m) if rng.random() < 0.3 else m
        out.append(m)
    out += list(random_instances(rng, masks.shape[1:], count=1))
    kept, _ = remove_overlaps(np.array(out).reshape(-1, *masks.shape[1:]), rng.random(len(out)), min_area=1)
    return kept


def test_ground_truth_as_prediction_scores_one():
    coins, shapes = coin_instances(), overlapping_shapes()
    gt = [coins, shapes, np.zeros((0, 8, 8), bool)]
    assert kaggle_iou_sweep(gt, gt) == 1.0
    assert airbus_f2(gt, gt) == 1.0
    classes = [np.zeros(len(coins), int), np.arange(3), np.zeros(0, int)]
    scores = [np.ones(len(m)) for m in gt]
    ap = coco_ap(gt, classes, gt, classes, scores)
    assert ap == {f"{kind}_{k}": 1.0 for kind in ("bbox", "segm") for k in ("AP", "AP50", "AP75")}


def test_empty_image_conventions():
    some, none = overlapping_shapes()[:1], np.zeros((0, 40, 50), bool)
    assert sweep_scores([none, some, none], [none, none, some]).tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("beta", [None, 2.0])
def test_sweep_equals_direct_numpy_on_random_masks(beta):
    rng = np.random.default_rng(15)
    gt = [random_instances(rng) for _ in range(12)] + [np.zeros((0, 48, 64), bool)] * 2
    pred = [perturbed(rng, g) for g in gt[:-1]] + [np.zeros((0, 48, 64), bool)]
    expected = [direct_sweep(g, p, beta) for g, p in zip(gt, pred, strict=True)]
    ours = sweep_scores(gt, pred, [rng.random(len(p)) for p in pred], beta=beta)
    assert np.allclose(ours, expected, atol=1e-12)
    assert 0.1 < np.mean(expected) < 0.9  # the perturbations leave a score worth checking
    score = kaggle_iou_sweep if beta is None else airbus_f2
    assert score(gt, pred) == pytest.approx(np.mean(expected), abs=1e-12)


def test_a_duplicate_prediction_is_one_hit_and_one_false_positive():
    # The object and a shrunk copy: whichever is matched first, the other is an FP, and an
    # unmatched copy takes the object when the first misses: 1 / (1 + 1 + 0) at every threshold.
    gt = overlapping_shapes()[:1]
    pred = np.concatenate([gt, ndimage.binary_erosion(gt[0], iterations=2)[None]])
    for scores in ([0.9, 0.8], [0.1, 0.8]):
        assert kaggle_iou_sweep([gt], [pred], [np.array(scores)]) == 0.5


@pytest.mark.parametrize("kept_rows, expected", [(15, 5 / 10), (18, 8 / 10)])
def test_iou_equal_to_a_threshold_is_not_above_it(kept_rows, expected):
    # A 20x10 object and its first rows: IoU 0.75 (hits at 0.5..0.7) or 0.9 (hits at 0.5..0.85).
    gt = np.zeros((1, 30, 30), bool)
    gt[0, 5:25, 5:15] = True
    pred = gt.copy()
    pred[0, 5 + kept_rows:] = False
    assert kaggle_iou_sweep([gt], [pred]) == pytest.approx(expected, abs=1e-12)


def direct_coco(gt_masks, gt_classes, gt_crowd, pred_masks, pred_classes, pred_scores, pred_boxes, iou_type):
    """pycocotools as its README uses it: a ground-truth JSON dict, loadRes, COCOeval."""

    def encode(m):
        r = coco_mask.encode(np.asfortranarray(m, dtype=np.uint8))
        return {"size": r["size"], "counts": r["counts"].decode()}

    images, anns, dets = [], [], []
    for i, (gm, gc, gk, pm, pc, ps, pb) in enumerate(zip(gt_masks, gt_classes, gt_crowd, pred_masks,
                                                          pred_classes, pred_scores, pred_boxes, strict=True)):
        images.append({"id": 100 + i, "height": gm.shape[1], "width": gm.shape[2]})
        for m, c, k in zip(gm, gc, gk, strict=True):
            seg = encode(m)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(c) + 1, "iscrowd": int(k),
                         "segmentation": seg, "area": float(coco_mask.area(seg)),
                         "bbox": coco_mask.toBbox(seg).tolist()})
        for m, c, s, b in zip(pm, pc, ps, pb, strict=True):
            det = {"image_id": 100 + i, "category_id": int(c) + 1, "score": float(s)}
            if iou_type == "segm":
                det["segmentation"] = encode(m)
            else:
                det["bbox"] = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            dets.append(det)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c} for c in sorted({a["category_id"] for a in anns})]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


def test_coco_ap_equals_pycocotools_called_directly():
    rng = np.random.default_rng(3)
    coins, shapes = coin_instances(), overlapping_shapes()
    gt_masks = [coins, shapes, random_instances(rng)]
    gt_classes = [rng.integers(0, 2, len(coins)), np.array([0, 1, 2]), rng.integers(0, 3, len(gt_masks[2]))]
    pred_masks, pred_classes, pred_boxes = [], [], []
    for masks, classes in zip(gt_masks, gt_classes, strict=True):
        p = perturbed(rng, masks)
        pred_masks.append(p)
        pred_classes.append(np.where(rng.random(len(p)) < 0.8, np.resize(classes, len(p)), 0))
        boxes = np.array([[m.nonzero()[1].min(), m.nonzero()[0].min(), m.nonzero()[1].max() + 1,
                           m.nonzero()[0].max() + 1] for m in p], float)
        pred_boxes.append(boxes + rng.normal(0, 1.5, boxes.shape))  # a detector's own boxes
    pred_scores = [rng.random(len(p)) for p in pred_masks]
    gt_crowd = [rng.random(len(m)) < 0.15 for m in gt_masks]  # crowd regions: neither hit nor miss

    ours = coco_ap(gt_masks, gt_classes, pred_masks, pred_classes, pred_scores, pred_boxes, gt_crowd)

    for iou_type in ("bbox", "segm"):
        theirs = direct_coco(gt_masks, gt_classes, gt_crowd, pred_masks, pred_classes, pred_scores,
                             pred_boxes, iou_type)
        assert [ours[f"{iou_type}_{k}"] for k in ("AP", "AP50", "AP75")] == pytest.approx(theirs, abs=1e-12)
        assert 0.05 < theirs[0] < 0.95  # a score with something to disagree about


def test_coco_ap_at_another_detection_limit_is_defined():
    """pycocotools' summarize() reads AP at maxDets=100 only (2.0.11), so at a limit of 30 its AP
    line is -1; ours comes from the accumulated precision and equals the AP at 100 when no image
    has more detections than either limit."""
    rng = np.random.default_rng(5)
    gt = [overlapping_shapes(), coin_instances()[:12]]
    classes = [np.arange(3), np.zeros(12, int)]
    pred = [perturbed(rng, m) for m in gt]
    scores = [rng.random(len(p)) for p in pred]
    pred_classes = [np.resize(c, len(p)) for c, p in zip(classes, pred, strict=True)]
    assert max(len(p) for p in pred) <= 30
    at_30 = coco_ap(gt, classes, pred, pred_classes, scores, max_detections=30)
    at_100 = coco_ap(gt, classes, pred, pred_classes, scores, max_detections=100)
    assert not any(np.isnan(v) for v in at_30.values())
    assert at_30 == pytest.approx(at_100, abs=1e-12)


def test_coco_ap_without_predictions_is_zero_and_without_ground_truth_nan():
    gt = [overlapping_shapes()]
    none = [np.zeros((0, 40, 50), bool)]
    ap = coco_ap(gt, [np.arange(3)], none, [np.zeros(0, int)], [np.zeros(0)])
    assert set(ap.values()) == {0.0}
    ap = coco_ap(none, [np.zeros(0, int)], gt, [np.arange(3)], [np.ones(3)])
    assert all(np.isnan(v) for v in ap.values())


@pytest.mark.parametrize("min_area", [1, 40, 150])
def test_remove_overlaps_owns_each_pixel_once_by_score(min_area):
    rng = np.random.default_rng(min_area)
    masks = np.concatenate([overlapping_shapes(),
                            np.array([np.roll(m, (2, 3), (0, 1)) for m in overlapping_shapes()]),
                            np.array([ndimage.binary_erosion(m, iterations=3) for m in overlapping_shapes()])])
    scores = rng.random(len(masks))

    kept, index = remove_overlaps(masks, scores, min_area=min_area)

    assert kept.sum(axis=0).max() <= 1  # every pixel owned by at most one instance
    assert np.all(np.diff(scores[index]) <= 0)  # returned in descending score
    assert np.all(kept <= masks[index])  # a mask only loses pixels
    assert np.all(kept.sum(axis=(1, 2)) >= min_area)
    # Higher scores win: each covered pixel goes to the best-scored kept mask that covered it.
    weight = np.where(masks[index], scores[index, None, None], -1.0)
    owner = np.where(weight.max(axis=0) >= 0, weight.argmax(axis=0), -1)
    assert np.array_equal(owner, np.where(kept.any(axis=0), kept.argmax(axis=0), -1))
    # A dropped mask had fewer than min_area pixels left once the better kept masks took theirs.
    for i in sorted(set(range(len(masks))) - set(index.tolist())):
        better = index[scores[index] > scores[i]]
        assert (masks[i] & ~masks[better].any(axis=0)).sum() < min_area
    if min_area == 150:
        assert len(index) < len(masks)  # something was dropped
