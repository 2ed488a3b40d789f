"""Evaluation metrics shared by the trainer and the evaluate/predict commands.

The scores themselves come from ``sklearn.metrics``; this module adds what it
lacks: None instead of NaN for an undefined score (an absent class), masking of
unknown (-1) multilabel entries, ECE/MCE with per-bin counts, temperature
fitting, F1 thresholds, ``OptimizedRounder`` and distribution matching.
numpy/scipy/scikit-learn only on purpose: evaluating saved predictions must not
pay for a TensorFlow import. Every dict returned here holds plain Python
numbers, lists and None (never NaN), so it goes straight into ``json.dumps``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, special
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

__all__ = [
    "OptimizedRounder", "binary_average_precision", "binary_roc_auc", "calibration",
    "distribution_cuts", "fit_temperature", "match_distribution", "multiclass_metrics",
    "multilabel_metrics", "pr_points", "quadratic_weighted_kappa", "roc_points", "sigmoid",
    "softmax", "tune_f1_thresholds",
]


# --------------------------------------------------------------------------- helpers
def _num(x):
    """Plain float, or None where undefined, so JSON never sees NaN."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def _mean(values):
    """Mean of the defined (non-None) values, None if there are none."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _as_probs(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D [N, K], got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf")
    return p


def _labels(y_true, n: int, k: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.shape != (n,):
        raise ValueError(f"y_true must have shape ({n},), got {y.shape}")
    if n == 0:
        raise ValueError("no samples to evaluate")
    if not np.issubdtype(y.dtype, np.integer) and np.any(y != np.round(y)):
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"class indices must lie in [0, {k}), got [{y.min()}, {y.max()}]")
    return y


def _check_names(class_names, k: int) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != k or len(set(names)) != k:
        raise ValueError(f"need {k} distinct class names, got {names}")
    return names


def _known_mask(y: np.ndarray, known) -> np.ndarray:
    """Entries whose label is known: not -1, not NaN, and allowed by ``known``."""
    mask = np.isfinite(y) & (y != -1)
    if known is not None:
        known = np.asarray(known, dtype=bool)
        if known.shape != y.shape:
            raise ValueError(f"known mask shape {known.shape} != y_true shape {y.shape}")
        mask &= known
    if np.any(mask & (y != 0) & (y != 1)):
        raise ValueError("multilabel y_true must hold 0, 1, or -1 for unknown")
    return mask


# --------------------------------------------------------------------------- ranking
def _one_class(y: np.ndarray) -> bool:
    return not 0 < int(y.sum()) < y.size


def roc_points(y, scores):
    """ROC curve of binary labels ``y`` [N] and scores [N] (higher = more positive).

    >>> fpr, tpr = roc_points([0, 1, 1], [0.1, 0.8, 0.4])

    Returns:
        ``(fpr, tpr)`` arrays starting at (0, 0), or None when y holds one class only.
    """
    y = np.asarray(y).astype(bool)
    if _one_class(y):
        return None
    fpr, tpr, _ = skm.roc_curve(y, np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    return fpr, tpr


def pr_points(y, scores):
    """Precision-recall curve of binary labels ``y`` [N] and scores [N].

    >>> recall, precision = pr_points([0, 1, 1], [0.1, 0.8, 0.4])

    Returns:
        ``(recall, precision)`` arrays starting at (0, 1), or None without positives.
    """
    y = np.asarray(y).astype(bool)
    if not y.any():
        return None
    precision, recall, _ = skm.precision_recall_curve(y, np.asarray(scores, dtype=np.float64))
    return recall[::-1], precision[::-1]  # sklearn lists them from the lowest threshold


def binary_roc_auc(y, scores):
    """Area under the ROC curve; ties count half. None when y holds one class.

    >>> binary_roc_auc([0, 1, 1], [0.1, 0.8, 0.4])
    1.0
    """
    y = np.asarray(y).astype(bool)
    return None if _one_class(y) else float(skm.roc_auc_score(y, scores))


def binary_average_precision(y, scores):
    """Average precision: sum over thresholds of recall gain times precision.

    >>> binary_average_precision([0, 1, 1], [0.1, 0.8, 0.4])
    1.0
    """
    y = np.asarray(y).astype(bool)
    return float(skm.average_precision_score(y, scores)) if y.any() else None


def quadratic_weighted_kappa(y_true, y_pred, n_classes: int | None = None):
    """Cohen's kappa with quadratic weights on class-index distance.

    >>> round(quadratic_weighted_kappa([0, 1, 2], [0, 1, 1]), 3)
    0.667

    Args:
        y_true: true ordinal classes [N].
        y_pred: predicted ordinal classes [N]; clipped into [0, n_classes).
        n_classes: number of classes; defaults to the largest index + 1.

    Returns:
        kappa in [-1, 1], or None when it is undefined (no disagreement possible).
    """
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y.size == 0:
        return None
    k = n_classes or int(max(y.max(), p.max())) + 1
    with warnings.catch_warnings():
        # Undefined kappa is an answer here (None), not something to warn about.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kappa = skm.cohen_kappa_score(y, np.clip(p, 0, k - 1), labels=np.arange(k),
                                      weights="quadratic")
    return _num(kappa)


# --------------------------------------------------------------------------- reports
def multiclass_metrics(y_true, probs, class_names, ordinal: bool = False) -> dict:
    """Metrics of a single-label classifier from its class probabilities.

    Macro precision/recall/F1 average over classes seen in y_true or in the
    predictions (scikit-learn's default), counting undefined ratios as 0. ROC/PR
    AUCs are one-vs-rest and skip classes absent from y_true.

    >>> m = multiclass_metrics([0, 1], [[0.9, 0.1], [0.2, 0.8]], ["cat", "dog"])
    >>> m["accuracy"], m["per_class"]["dog"]["recall"]
    (1.0, 1.0)

    Args:
        y_true: class indices [N].
        probs: probabilities (or any scores) [N, K]; the argmax is the prediction.
        class_names: K names, keys of ``per_class``.
        ordinal: also report ``quadratic_kappa`` (classes are ordered grades).

    Returns:
        dict with accuracy, balanced_accuracy, macro_/weighted_ precision, recall
        and f1, roc_auc_macro, pr_auc_macro, confusion_matrix(_normalized),
        per_class {name: precision, recall, f1, support, roc_auc, pr_auc} and,
        if ordinal, quadratic_kappa.
    """
    p = _as_probs(probs)
    n, k = p.shape
    names = _check_names(class_names, k)
    y = _labels(y_true, n, k)
    pred, labels = p.argmax(1), np.arange(k)
    # NaN marks an undefined ratio per class (None in the output); the averages count it as 0.
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=np.nan)
    out = {"accuracy": float(skm.accuracy_score(y, pred)),
           # = balanced_accuracy_score, which warns when a class is predicted but absent.
           "balanced_accuracy": float(np.nanmean(recall))}
    for avg in ("macro", "weighted"):
        avg_p, avg_r, avg_f, _ = skm.precision_recall_fscore_support(
            y, pred, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(avg_p), f"{avg}_recall": float(avg_r),
                    f"{avg}_f1": float(avg_f)})
    per_class = {}
    for c, name in enumerate(names):
        per_class[name] = {
            "precision": _num(precision[c]), "recall": _num(recall[c]), "f1": _num(f1[c]),
            "support": int(support[c]), "roc_auc": binary_roc_auc(y == c, p[:, c]),
            "pr_auc": binary_average_precision(y == c, p[:, c]),
        }
    out.update({
        "roc_auc_macro": _mean(v["roc_auc"] for v in per_class.values()),
        "pr_auc_macro": _mean(v["pr_auc"] for v in per_class.values()),
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        # Rows of absent classes are zeros: sklearn turns their 0/0 into 0.
        "confusion_matrix_normalized": skm.confusion_matrix(
            y, pred, labels=labels, normalize="true").tolist(),
        "per_class": per_class,
    })
    if ordinal:
        out["quadratic_kappa"] = quadratic_weighted_kappa(y, pred, k)
    return out


def _as_thresholds(thresholds, k: int) -> np.ndarray:
    th = np.broadcast_to(np.asarray(0.5 if thresholds is None else thresholds, float), (k,))
    return th.copy()


def multilabel_metrics(y_true, probs, class_names, thresholds=None, known=None) -> dict:
    """Per-label metrics of a multi-label classifier, ignoring unknown labels.

    Entries with y == -1 (or NaN, or False in ``known``) are left out of every
    number of their class. A label is predicted positive when prob >= threshold.

    >>> m = multilabel_metrics([[1, -1], [0, 1]], [[0.9, 0.5], [0.2, 0.7]], ["a", "b"])
    >>> m["per_class"]["b"]["n_known"]
    1

    Args:
        y_true: labels [N, K] of 0, 1 or -1 (unknown).
        probs: probabilities [N, K].
        class_names: K label names.
        thresholds: scalar or [K] decision thresholds (default 0.5).
        known: optional boolean [N, K]; False marks more entries as unknown.

    Returns:
        dict with roc_auc_macro, pr_auc_macro, macro_f1, macro_precision,
        macro_recall (each over classes where defined, else None) and per_class
        {name: roc_auc, pr_auc, precision, recall, f1, support, n_known, threshold}.
    """
    p = _as_probs(probs)
    y = np.asarray(y_true, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true shape {y.shape} != probs shape {p.shape}")
    names = _check_names(class_names, p.shape[1])
    mask, th = _known_mask(y, known), _as_thresholds(thresholds, p.shape[1])
    per_class = {}
    for c, name in enumerate(names):
        yc, sc = y[mask[:, c], c] == 1, p[mask[:, c], c]
        # sklearn refuses empty input: a class with no known entry has no defined ratio.
        prf = (skm.precision_recall_fscore_support(
            yc, sc >= th[c], average="binary", zero_division=np.nan)[:3]
            if yc.size else (None,) * 3)
        per_class[name] = {
            "roc_auc": binary_roc_auc(yc, sc), "pr_auc": binary_average_precision(yc, sc),
            **{key: _num(v) for key, v in zip(("precision", "recall", "f1"), prf, strict=True)},
            "support": int(yc.sum()), "n_known": int(yc.size), "threshold": float(th[c]),
        }
    vals = per_class.values()
    macro = {f"{key}_macro": _mean(v[key] for v in vals) for key in ("roc_auc", "pr_auc")}
    macro.update({f"macro_{key}": _mean(v[key] for v in vals)
                  for key in ("f1", "precision", "recall")})
    return {**macro, "per_class": per_class}


# --------------------------------------------------------------------------- calibration
def calibration(y_true, probs, n_bins: int = 15) -> dict:
    """Expected/maximum calibration error of the top-1 confidence.

    Bins are equal-width and closed on the right, (lower, upper], like
    scikit-learn's ``calibration_curve``.

    >>> calibration([0, 1], [[0.9, 0.1], [0.4, 0.6]], n_bins=10)["ece"]
    0.25

    Args:
        y_true: class indices [N].
        probs: probabilities [N, K].
        n_bins: number of bins over [0, 1].

    Returns:
        dict with ece, mce, n_bins, n_samples and bins: a list of {lower, upper,
        confidence, accuracy, count}, confidence/accuracy None for empty bins.
    """
    p = _as_probs(probs)
    y = _labels(y_true, *p.shape)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, correct = p.max(1), (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], conf)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / count
        mean_acc = np.bincount(idx, correct, n_bins) / count
    gaps = np.abs(mean_acc - mean_conf)[count > 0]
    bins = [{"lower": float(edges[b]), "upper": float(edges[b + 1]),
             "confidence": _num(mean_conf[b]), "accuracy": _num(mean_acc[b]),
             "count": int(count[b])} for b in range(n_bins)]
    return {"ece": float(np.sum(count[count > 0] * gaps) / y.size), "mce": float(gaps.max()),
            "n_bins": int(n_bins), "n_samples": int(y.size), "bins": bins}


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax over the last axis of ``logits / temperature``.

    >>> softmax([[0.0, 0.0]]).tolist()
    [[0.5, 0.5]]
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def sigmoid(x) -> np.ndarray:
    """Logistic function that does not overflow for large |x|.

    >>> float(sigmoid(0.0))
    0.5
    """
    return special.expit(np.asarray(x, dtype=np.float64))


def fit_temperature(logits, y_true, bounds=(0.01, 100.0)) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)``.

    >>> fit_temperature([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]], [0, 1, 1]) > 1
    True

    Args:
        logits: pre-softmax outputs [N, K] on held-out data.
        y_true: class indices [N].
        bounds: search range of T.

    Returns:
        the fitted temperature; 1.0 if the search could not improve on it.
    """
    z = _as_probs(logits)
    y = _labels(y_true, *z.shape)
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        zt = z / np.exp(log_t)
        return float(np.mean(special.logsumexp(zt, axis=1) - zt[rows, y]))

    # Searching log T keeps T positive and treats "2x too hot" and "2x too cold" alike;
    # the NLL is unimodal in it, so a bounded scalar search is enough.
    res = optimize.minimize_scalar(nll, bounds=tuple(np.log(bounds)), method="bounded",
                                   options={"xatol": 1e-5})
    if not np.isfinite(res.fun) or res.fun > nll(0.0):
        return 1.0
    return float(np.exp(res.x))


# --------------------------------------------------------------------------- decisions
def tune_f1_thresholds(y_true, probs, known=None, default: float = 0.5) -> np.ndarray:
    """Per-class thresholds maximising F1 on known entries (predict prob >= t).

    >>> tune_f1_thresholds([[0], [1], [1]], [[0.1], [0.3], [0.6]]).round(2).tolist()
    [0.2]

    Args:
        y_true: labels [N, K] of 0, 1 or -1 (unknown).
        probs: probabilities [N, K].
        known: optional boolean [N, K] of usable entries.
        default: threshold for classes without any known positive.

    Returns:
        thresholds [K].
    """
    p = _as_probs(probs)
    y = np.asarray(y_true, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true shape {y.shape} != probs shape {p.shape}")
    mask = _known_mask(y, known)
    out = np.full(p.shape[1], float(default))
    for c in range(p.shape[1]):
        yc, sc = y[mask[:, c], c] == 1, p[mask[:, c], c]
        if not yc.any():
            continue
        precision, recall, cuts = skm.precision_recall_curve(yc, sc)
        # Highest threshold first; drop sklearn's closing (recall 0, precision 1) point.
        precision, recall, cuts = precision[-2::-1], recall[-2::-1], cuts[::-1]
        with np.errstate(invalid="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
        # First of the maxima (up to rounding): the fewest predicted positives.
        best = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[0])
        out[c] = cuts[best]
        if best + 1 < cuts.size:
            # Halfway to the next lower score gives the same predictions here and
            # a margin on new data; fall back if the two floats are too close to split.
            mid = 0.5 * (cuts[best] + cuts[best + 1])
            out[c] = mid if mid > cuts[best + 1] else cuts[best]
    return out


class OptimizedRounder:
    """Cut points turning a continuous ordinal score into classes, maximising QWK.

    >>> r = OptimizedRounder().fit([0.1, 0.4, 1.2, 1.3, 2.6], [0, 1, 1, 2, 2])
    >>> r.predict([0.0, 3.0]).tolist()
    [0, 2]

    Args:
        n_classes: number of ordinal classes; defaults to max(y_true) + 1.
        maxiter: Nelder-Mead iteration limit.

    Attributes:
        coef_: sorted cut points [K - 1]; class = number of cuts <= score.
    """

    def __init__(self, n_classes: int | None = None, maxiter: int = 2000):
        self.n_classes = n_classes
        self.maxiter = maxiter
        self.coef_: np.ndarray | None = None

    def fit(self, scores, y_true) -> OptimizedRounder:
        """Fit cut points starting from 0.5, 1.5, ...; returns self."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        y = np.asarray(y_true, dtype=np.int64).ravel()
        k = self.n_classes or int(y.max()) + 1
        if k < 2 or s.size != y.size:
            raise ValueError("need >= 2 classes and one score per label")

        def loss(cuts):
            kappa = quadratic_weighted_kappa(y, np.digitize(s, np.sort(cuts)), k)
            return -1.0 if kappa is None else -kappa

        init = np.arange(k - 1) + 0.5
        # The objective is piecewise constant: Nelder-Mead's default 5% simplex often
        # sits inside one flat step, so start with half-class steps instead.
        simplex = np.vstack([init, init + 0.5 * np.eye(k - 1)])
        res = optimize.minimize(loss, init, method="Nelder-Mead", options={
            "initial_simplex": simplex, "maxiter": self.maxiter, "xatol": 1e-4, "fatol": 1e-9})
        self.coef_ = np.sort(res.x) if res.fun <= loss(init) else init
        return self

    def predict(self, scores) -> np.ndarray:
        """Class index per score using the fitted cut points."""
        if self.coef_ is None:
            raise RuntimeError("OptimizedRounder.predict() called before fit()")
        return np.digitize(np.asarray(scores, dtype=np.float64), self.coef_)


def _target_counts(target_fractions, n: int) -> np.ndarray:
    f = np.asarray(target_fractions, dtype=np.float64)
    if f.ndim != 1 or f.size < 1 or np.any(f < 0) or not f.sum() > 0:
        raise ValueError(f"target_fractions must be non-negative with a positive sum, got {f}")
    raw = f / f.sum() * n
    counts = np.floor(raw).astype(np.int64)
    # Largest remainder: the samples lost to flooring go to the classes that lost most.
    counts[np.argsort(counts - raw, kind="stable")[: n - counts.sum()]] += 1
    return counts


def match_distribution(values, target_fractions) -> np.ndarray:
    """Class per sample such that class proportions match ``target_fractions``.

    1-D ordinal scores are ranked: the lowest go to class 0 and so on. 2-D
    probabilities [N, K] are assigned greedily, most confident (sample, class)
    pair first, each class until its quota is full. For ordinal probabilities,
    pass the expected grade ``probs @ arange(K)`` to keep the order.

    >>> match_distribution([0.3, 2.0, 0.1, 0.9], [0.5, 0.25, 0.25]).tolist()
    [0, 2, 0, 1]

    Args:
        values: scores [N] or probabilities [N, K].
        target_fractions: K fractions or counts (e.g. training class counts).

    Returns:
        int class indices [N]; each class count is within 1 of fraction * N.
    """
    v = np.asarray(values, dtype=np.float64)
    counts = _target_counts(target_fractions, v.shape[0])
    k = counts.size
    if v.ndim == 1:
        labels = np.empty(v.size, dtype=np.int64)
        labels[np.argsort(v, kind="stable")] = np.repeat(np.arange(k), counts)
        return labels
    if v.ndim != 2 or v.shape[1] != k:
        raise ValueError(f"values must be [N] or [N, {k}], got shape {v.shape}")
    labels = np.full(v.shape[0], -1, dtype=np.int64)
    left, todo = counts.copy(), v.shape[0]
    order = np.argsort(-v, axis=None, kind="stable")
    for i, c in zip((order // k).tolist(), (order % k).tolist(), strict=True):
        if labels[i] < 0 and left[c] > 0:
            labels[i], left[c], todo = c, left[c] - 1, todo - 1
            if todo == 0:
                break
    return labels


def distribution_cuts(scores, target_fractions) -> np.ndarray:
    """Cut points [K-1] on 1-D scores reproducing ``target_fractions`` on new data.

    Use with ``np.digitize(new_scores, cuts)``; empty classes get +-inf cuts.

    >>> distribution_cuts([0.3, 2.0, 0.1, 0.9], [0.5, 0.25, 0.25]).tolist()
    [0.6, 1.45]
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    ends = np.cumsum(_target_counts(target_fractions, s.size))[:-1]
    padded = np.r_[-np.inf, s, np.inf]
    # Midway between the last score of one class and the first of the next.
    return 0.5 * (padded[ends] + padded[ends + 1])
