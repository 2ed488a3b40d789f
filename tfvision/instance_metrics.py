"""Instance-segmentation scores on NumPy masks, and the overlap removal that submissions need.

- `kaggle_iou_sweep`: the DSB 2018 / Sartorius score. Per image, the mean over
  IoU thresholds 0.5, 0.55, ..., 0.95 of TP / (TP + FP + FN), then the mean
  over images. `airbus_f2` is Airbus' variant: F2 in place of that ratio.
- `coco_ap`: COCO bbox and segm AP, AP50, AP75, computed by pycocotools' COCOeval.
- `remove_overlaps`: each pixel to the highest-scoring mask, small leftovers dropped.

Matching in the sweep: a prediction is a hit when its IoU with a ground-truth
object is *above* the threshold (Kaggle's wording; COCO counts IoU equal to the
threshold). Predictions are matched in descending score, each to the unmatched
ground truth it overlaps most, as COCO does. With non-overlapping masks, which
the competitions require, at most one pair can pass IoU > 0.5 for any object,
so the order only matters for overlapping predictions.

Empty images in the sweep: with no ground truth and no prediction, TP, FP and
FN are all 0, and the image scores 1: saying "nothing here" about an empty
image is a perfect answer, and scoring it 0 or dropping it would make empty
images (most of Airbus' test set) worthless to get right. With objects on one
side only, the score is 0 (every object is a miss or every prediction is false).

Masks are [N, H, W] arrays per image, nonzero foreground. No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tfvision.data.rle import coco_rles

# Rounded: linspace gives 0.8999999999999999, and an IoU of exactly 0.9 would pass "above 0.9".
IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)


def kaggle_iou_sweep(gt_masks, pred_masks, pred_scores=None) -> float:
    """The DSB 2018 / Sartorius score: mean over images of the per-image IoU sweep.

    >>> square = np.zeros((1, 8, 8), bool); square[0, 2:6, 2:6] = True
    >>> kaggle_iou_sweep([square], [square])
    1.0

    Args:
        gt_masks: per image, [N, H, W] ground-truth masks.
        pred_masks: per image, [M, H, W] predicted masks.
        pred_scores: per image, [M] scores that order the matching; None: as given.

    Returns:
        The mean score, in [0, 1].
    """
    return float(np.mean(sweep_scores(gt_masks, pred_masks, pred_scores)))


def airbus_f2(gt_masks, pred_masks, pred_scores=None) -> float:
    """Airbus' score: as `kaggle_iou_sweep`, with F2 = 5TP / (5TP + 4FN + FP) at each threshold."""
    return float(np.mean(sweep_scores(gt_masks, pred_masks, pred_scores, beta=2.0)))


def sweep_scores(gt_masks, pred_masks, pred_scores=None, beta: float | None = None) -> np.ndarray:
    """Per-image sweep scores [images]: TP/(TP+FP+FN) when `beta` is None, else F-beta."""
    if len(gt_masks) != len(pred_masks):
        raise ValueError(f"{len(gt_masks)} ground-truth images but {len(pred_masks)} predicted")
    if pred_scores is None:
        pred_scores = [np.zeros(len(p)) for p in pred_masks]
    return np.array([_image_sweep(g, p, s, beta) for g, p, s in zip(gt_masks, pred_masks, pred_scores,
                                                                   strict=True)])


def _image_sweep(gt, pred, scores, beta) -> float:
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if len(gt) and len(pred) and gt.shape[1:] != pred.shape[1:]:
        raise ValueError(f"ground truth is {gt.shape[1:]} but predictions are {pred.shape[1:]}")
    return _sweep(mask_iou(gt, pred), scores, beta)


def _sweep(iou: np.ndarray, scores, beta) -> float:
    """One image's sweep score from the IoU of its ground truth (rows) and predictions (columns)."""
    n_gt, n_pred = iou.shape
    if not n_gt or not n_pred:
        return float(n_gt == n_pred)  # both empty: 1; objects on one side only: 0
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    tp = np.array([_matches(iou, order, t) for t in IOU_THRESHOLDS], dtype=float)
    fp, fn = n_pred - tp, n_gt - tp
    if beta is None:
        return float(np.mean(tp / (tp + fp + fn)))
    b2 = beta * beta
    return float(np.mean((1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)))


def _matches(iou: np.ndarray, order: np.ndarray, threshold: float) -> int:
    """How many predictions (columns, taken in `order`) match a distinct ground truth above threshold."""
    free = np.ones(iou.shape[0], bool)
    for j in order:  # one step per prediction; each step is an array op over the ground truth
        candidates = np.where(free, iou[:, j], -1.0)
        best = candidates.argmax()
        if candidates[best] > threshold:
            free[best] = False
    return int((~free).sum())


def mask_iou(a, b) -> np.ndarray:
    """IoU of every pair of [N, H, W] and [M, H, W] masks, [N, M], from pycocotools' RLE IoU."""
    a, b = np.asarray(a), np.asarray(b)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.asarray(coco_mask.iou(coco_rles(a), coco_rles(b), [0] * len(b)), dtype=float)


def coco_ap(gt_masks, gt_classes, pred_masks, pred_classes, pred_scores, pred_boxes=None,
            gt_crowd=None, max_detections: int = 100) -> dict[str, float]:
    """COCO bbox and segm AP, AP50 and AP75 from pycocotools' COCOeval.

    Ground-truth boxes come from the masks; predicted boxes from `pred_boxes`
    when given (a detector's own boxes), else from the predicted masks.

    Args:
        gt_masks, pred_masks: per image, [N, H, W] and [M, H, W] masks.
        gt_classes, pred_classes: per image, [N] and [M] class indices from 0.
        pred_scores: per image, [M] scores.
        pred_boxes: per image, [M, 4] (x0, y0, x1, y1) in pixels, or None.
        gt_crowd: per image, [N] iscrowd flags; None: no crowd regions.
        max_detections: detections per image counted (COCO's 100; Sartorius
            images hold more cells than that).

    Returns:
        ``{"bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"}``;
        NaN where COCO leaves a value undefined (no ground truth at all).
    """
    n = len(gt_masks)
    if not n == len(gt_classes) == len(pred_masks) == len(pred_classes) == len(pred_scores):
        raise ValueError("every argument needs one entry per image")
    scores = InstanceScores(max_detections)
    for args in zip(gt_masks, gt_classes, pred_masks, pred_classes, pred_scores,
                    [None] * n if pred_boxes is None else pred_boxes, [None] * n if gt_crowd is None else gt_crowd,
                    strict=True):
        scores.add(*args)
    return scores.coco_ap()


class InstanceScores:
    """COCO AP and the IoU sweeps, added one image at a time.

    Each image is kept as COCO RLEs, never as dense masks, so a whole validation split at
    its images' own size fits in memory (a Sartorius image: 520 x 704 pixels, hundreds of
    cells). Ground truth may arrive as RLEs straight from the annotations, never decoded.

    >>> square = np.zeros((1, 8, 8), bool); square[0, 2:6, 2:6] = True
    >>> scores = InstanceScores(); scores.add(square, [0], square, [0], [0.9])
    >>> scores.sweep(), round(scores.coco_ap()["segm_AP"], 6), scores.coco_ap() == scores.coco_ap()
    (1.0, 1.0, True)
    """

    def __init__(self, max_detections: int = 100):
        self.max_detections = max_detections
        self.images, self.annotations, self.classes = [], [], set()
        self.detections = {"bbox": [], "segm": []}
        self.sweeps = {None: [], 2.0: []}  # beta: per-image scores (None: TP/(TP+FP+FN), 2: Airbus' F2)

    def add(self, gt, gt_classes, pred, pred_classes, pred_scores, pred_boxes=None, gt_crowd=None,
            size=None) -> None:
        """One image. `gt`, `pred`: [N, H, W] masks or lists of COCO RLEs; `size` (H, W) is needed
        only when both are empty RLE lists. `pred_boxes` [M, 4] x0, y0, x1, y1, or None (from the
        masks); `gt_crowd` [N] iscrowd flags, or None."""
        (gt, gt_size), (pred, pred_size) = _rles(gt), _rles(pred)
        size = size or gt_size or pred_size
        if size is None:
            raise ValueError("an image with no masks on either side needs its size")
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": int(size[0]), "width": int(size[1])})
        crowd = np.zeros(len(gt), bool) if gt_crowd is None else np.asarray(gt_crowd, bool)
        for rle, label, box, is_crowd in zip(gt, gt_classes, _rle_boxes(gt), crowd, strict=True):
            self.classes.add(int(label))
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                     "category_id": int(label) + 1, "segmentation": _json_rle(rle),
                                     "area": float(coco_mask.area(rle)), "bbox": box.tolist(),
                                     "iscrowd": int(is_crowd)})
        boxes = _rle_boxes(pred) if pred_boxes is None else _xywh(pred_boxes)
        for rle, label, score, box in zip(pred, pred_classes, pred_scores, boxes, strict=True):
            common = {"image_id": image_id, "category_id": int(label) + 1, "score": float(score)}
            self.detections["segm"].append({**common, "segmentation": _json_rle(rle)})
            self.detections["bbox"].append({**common, "bbox": box.tolist()})
        iou = (np.asarray(coco_mask.iou(gt, pred, [0] * len(pred)), float).reshape(len(gt), len(pred))
               if len(gt) and len(pred) else np.zeros((len(gt), len(pred))))
        for beta, values in self.sweeps.items():
            values.append(_sweep(iou, pred_scores, beta))

    def sweep(self, beta: float | None = None) -> float:
        """Mean per-image sweep score: `kaggle_iou_sweep` (beta None) or `airbus_f2` (beta 2)."""
        return float(np.mean(self.sweeps[beta]))

    def coco_ap(self) -> dict[str, float]:
        """As `coco_ap` returns, over the images added so far."""
        gt = {"images": self.images, "annotations": self.annotations,
              "categories": [{"id": c + 1, "name": str(c)} for c in sorted(self.classes)]}
        results = {}
        for iou_type, detections in self.detections.items():
            stats = _coco_eval(gt, detections, iou_type, self.max_detections)
            results.update({f"{iou_type}_{k}": v for k, v in zip(("AP", "AP50", "AP75"), stats, strict=True)})
        return results


def _rles(masks) -> tuple[list[dict], tuple[int, int] | None]:
    """(compressed COCO RLEs, (H, W) or None) of [N, H, W] masks or of a list of RLEs."""
    if isinstance(masks, list | tuple) and all(isinstance(m, dict) for m in masks):
        return list(masks), (tuple(int(v) for v in masks[0]["size"]) if masks else None)
    masks = np.asarray(masks, bool)
    return coco_rles(masks), (masks.shape[1:] if masks.ndim == 3 else None)


def _rle_boxes(rles: list[dict]) -> np.ndarray:
    """[N, 4] x, y, w, h at pixel edges, as pycocotools' toBbox reads them from the runs."""
    return coco_mask.toBbox(rles).reshape(-1, 4) if rles else np.zeros((0, 4))


def _json_rle(rle: dict) -> dict:
    """COCO JSON wants the compressed counts as str."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _xywh(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _coco_eval(gt_dataset: dict, detections: list[dict], iou_type: str, max_detections: int):
    """AP, AP50, AP75 (COCOeval stats 0-2), NaN for COCO's -1 (undefined)."""
    # pycocotools prints progress on every call; keep it out of tfvision's output.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dataset
        gt.createIndex()
        # loadRes fails on an empty list (IndexError, pycocotools 2.0.11); with no
        # detections COCOeval scores an empty result set, which is AP 0.
        # loadRes writes ids, areas and boxes into the dicts it is given: hand it copies, so that
        # the same detections can be scored again.
        dt = gt.loadRes([dict(d) for d in detections]) if detections else _empty_results(gt)
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
    # Read the accumulated precision rather than `summarize()`'s stats: its AP line asks for
    # maxDets=100 whatever params.maxDets says (pycocotools 2.0.11), so at any other limit COCO's
    # AP came out -1 while AP50 and AP75 were right. The means below are summarize()'s own.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [IoU, recall, class] at area "all"
    thresholds = evaluator.params.iouThrs

    def mean(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else float("nan")

    return [mean(precision), *(mean(precision[np.isclose(thresholds, t)]) for t in (0.5, 0.75))]


def _empty_results(gt: COCO) -> COCO:
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                  "annotations": []}
    dt.createIndex()
    return dt


def remove_overlaps(masks, scores, min_area: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Give each pixel to the highest-scoring mask that covers it; drop masks left below `min_area`.

    Masks are taken in descending score. Each keeps the pixels no kept, higher
    mask has taken; if fewer than `min_area` (or none) are left, it is dropped
    and its pixels stay free for lower masks. The loop is over instances; each
    step is a whole-image array operation.

    >>> a = np.zeros((2, 1, 4), bool); a[0, 0, :3] = True; a[1, 0, 1:] = True
    >>> kept, index = remove_overlaps(a, [0.2, 0.9])
    >>> kept.astype(int).tolist(), index.tolist()
    ([[[0, 1, 1, 1]], [[1, 0, 0, 0]]], [1, 0])

    Returns:
        ([K, H, W] bool masks, [K] indices into the input), in descending score.
    """
    masks = np.asarray(masks, bool)
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    taken = np.zeros(masks.shape[1:], bool)
    kept, index = [], []
    for i in order:
        own = masks[i] & ~taken
        if own.sum() < max(min_area, 1):
            continue
        taken |= own
        kept.append(own)
        index.append(i)
    return np.array(kept, bool).reshape(-1, *masks.shape[1:]), np.array(index, dtype=np.int64)
