"""PNG plots of training histories and evaluation results.

Matplotlib is imported inside the functions so that importing tfvision stays
cheap, and the Agg backend is selected first so plotting works on headless
training machines. Every PNG is written to a temporary file and renamed, so a
crash mid-save never leaves a truncated image where a report expects one.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from tfvision import metrics
from tfvision.fileio import atomic_path

__all__ = [
    "confusion_matrix_plot",
    "mask_overlays",
    "per_class_bars",
    "pr_curves",
    "reliability_diagram",
    "roc_curves",
    "training_curves",
]

_LR_COLUMNS = ("lr", "learning_rate")


def _pyplot():
    import matplotlib

    # Switching backend after pyplot is loaded would close the caller's open
    # figures (e.g. in a notebook); Agg is only forced before the first import.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> str:
    """Write ``fig`` to ``path`` atomically, always closing it."""
    plt = _pyplot()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return os.fspath(path)


def _columns(history) -> dict[str, np.ndarray]:
    """Numeric columns of a DataFrame or dict of lists, as float arrays."""
    if hasattr(history, "to_dict") and hasattr(history, "columns"):
        history = {c: history[c].to_numpy() for c in history.columns}
    out = {}
    for name, values in dict(history).items():
        arr = np.asarray(values)
        if arr.ndim == 1 and arr.size and np.issubdtype(arr.dtype, np.number):
            out[str(name)] = arr.astype(np.float64)
    return out


def _families(names) -> list[list[str]]:
    """Group columns into subplots: loss first, each metric with its val_ twin."""
    bases = []
    for name in names:
        base = name[4:] if name.startswith("val_") else name
        if base not in bases:
            bases.append(base)
    bases.sort(key=lambda b: b != "loss")  # stable: keeps the history's own order otherwise
    return [[n for n in (b, "val_" + b) if n in names] for b in bases]


def training_curves(history, path) -> str:
    """Plot loss, every metric with its validation twin, and the learning rate.

    >>> training_curves({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7]}, "curves.png")
    'curves.png'

    Args:
        history: pandas DataFrame or dict of lists (e.g. Keras ``History.history``
            or the CSV log); an ``epoch`` column becomes the x axis.
        path: PNG file to write.

    Returns:
        ``path``.
    """
    cols = _columns(history)
    x = cols.pop("epoch", None)
    lr_name = next((c for c in _LR_COLUMNS if c in cols), None)
    lr = cols.pop(lr_name) if lr_name else None
    for extra in _LR_COLUMNS:
        cols.pop(extra, None)
    groups_lr = {name: cols.pop(name) for name in list(cols) if name.startswith("lr_")}  # e.g. lr_backbone
    groups = _families(list(cols))
    panels = len(groups) + (lr is not None)
    if panels == 0:
        raise ValueError("history holds no numeric metric columns")
    length = max(len(v) for v in cols.values()) if cols else len(lr)
    x = np.arange(1, length + 1) if x is None else x
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax, group in zip(flat, groups, strict=False):
        for name in group:
            ax.plot(x[: len(cols[name])], cols[name], marker=".", label=name)
        ax.set_title(group[0].removeprefix("val_"))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if lr is not None:
        ax = flat[len(groups)]
        ax.plot(x[: len(lr)], lr, marker=".", color="tab:gray", label="lr")
        for name, values in groups_lr.items():  # 0.0 while the group is frozen: left out of the line
            ax.plot(x[: len(values)], np.where(values > 0, values, np.nan), marker=".", label=name)
        if np.all(lr > 0):
            ax.set_yscale("log")  # schedules span decades; linear hides the warm-up
        if groups_lr:
            ax.legend(fontsize="small")
        ax.set_title("learning rate")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def _one_vs_rest(y_true, probs, class_names):
    """(name, binary labels, scores) per class; multilabel -1/NaN entries are dropped."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.float64)
    names = [str(c) for c in class_names]
    if p.ndim != 2 or len(names) != p.shape[1]:
        raise ValueError(f"probs must be [N, {len(names)}], got shape {p.shape}")
    for c, name in enumerate(names):
        if y.ndim == 1:
            yield name, y == c, p[:, c]
        else:
            known = np.isfinite(y[:, c]) & (y[:, c] != -1)
            yield name, y[known, c] == 1, p[known, c]


def _curves(y_true, probs, class_names, path, kind: str, max_classes: int) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    drawn = 0
    for name, yc, sc in _one_vs_rest(y_true, probs, class_names):
        if drawn >= max_classes:
            break
        if kind == "roc":
            pts, area = metrics.roc_points(yc, sc), metrics.binary_roc_auc(yc, sc)
        else:
            pts, area = metrics.pr_points(yc, sc), metrics.binary_average_precision(yc, sc)
        if pts is None:  # class absent (or, for ROC, never negative): no curve exists
            continue
        ax.step(pts[0], pts[1], where="post", label=f"{name} ({area:.3f})")
        drawn += 1
    if kind == "roc":
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (AUC)")
    else:
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (AP)")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small", loc="lower right" if kind == "roc" else "lower left")
    fig.tight_layout()
    return _save(fig, path)


def roc_curves(y_true, probs, class_names, path, max_classes: int = 20) -> str:
    """One-vs-rest ROC curve per class, AUC in the legend.

    >>> roc_curves([0, 1, 2, 1], np.eye(3)[[0, 1, 2, 0]], ["a", "b", "c"], "roc.png")
    'roc.png'

    Args:
        y_true: class indices [N], or multilabel [N, K] with -1 for unknown.
        probs: probabilities [N, K].
        class_names: K names.
        path: PNG file to write.
        max_classes: draw at most this many classes to keep the legend readable.

    Returns:
        ``path``.
    """
    return _curves(y_true, probs, class_names, path, "roc", max_classes)


def pr_curves(y_true, probs, class_names, path, max_classes: int = 20) -> str:
    """One-vs-rest precision-recall curve per class, average precision in the legend.

    >>> pr_curves([0, 1, 2, 1], np.eye(3)[[0, 1, 2, 0]], ["a", "b", "c"], "pr.png")
    'pr.png'

    Args:
        y_true: class indices [N], or multilabel [N, K] with -1 for unknown.
        probs: probabilities [N, K].
        class_names: K names.
        path: PNG file to write.
        max_classes: draw at most this many classes.

    Returns:
        ``path``.
    """
    return _curves(y_true, probs, class_names, path, "pr", max_classes)


def confusion_matrix_plot(cm, class_names, path, normalized: bool = False) -> str:
    """Heat map of a confusion matrix (rows: true class, columns: predicted).

    >>> confusion_matrix_plot([[5, 1], [2, 7]], ["a", "b"], "cm.png", normalized=True)
    'cm.png'

    Args:
        cm: [K, K] counts (or already row-normalised values).
        class_names: K names.
        path: PNG file to write.
        normalized: row-normalise before drawing (a no-op on normalised input).

    Returns:
        ``path``.
    """
    m = np.asarray(cm, dtype=np.float64)
    k = len(class_names)
    if m.shape != (k, k):
        raise ValueError(f"cm must be [{k}, {k}], got shape {m.shape}")
    if normalized:
        rows = m.sum(1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    plt = _pyplot()
    size = min(4 + 0.45 * k, 20)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(k)
    ax.set_xticks(ticks, [str(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(ticks, [str(c) for c in class_names])
    ax.set(xlabel="predicted", ylabel="true",
           title="Confusion matrix" + (" (row-normalised)" if normalized else ""))
    if k <= 30:  # beyond that the numbers overlap and only the colours are readable
        top = m.max() if m.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{m[i, j]:.2f}" if normalized else f"{m[i, j]:g}"
                ax.text(j, i, text, ha="center", va="center", fontsize="small",
                        color="white" if top and m[i, j] > 0.6 * top else "black")
    fig.tight_layout()
    return _save(fig, path)


def reliability_diagram(calibration_dict: dict, path) -> str:
    """Reliability diagram (accuracy vs confidence per bin) with a bin-count panel.

    >>> cal = metrics.calibration([0, 1], [[0.9, 0.1], [0.4, 0.6]], n_bins=10)
    >>> reliability_diagram(cal, "reliability.png")
    'reliability.png'

    Args:
        calibration_dict: output of ``tfvision.metrics.calibration``.
        path: PNG file to write.

    Returns:
        ``path``.
    """
    bins = calibration_dict["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    count = np.array([b["count"] for b in bins])
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    top.bar(lower[filled], acc[filled], width[filled], align="edge", edgecolor="black",
            label="accuracy")
    # The hatched gap is what ECE sums: how far each bin's accuracy is from its confidence.
    top.bar(lower[filled], conf[filled] - acc[filled], width[filled], bottom=acc[filled],
            align="edge", color="tab:red", alpha=0.3, hatch="//", label="gap")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
            title=f"ECE {calibration_dict['ece']:.3f}   MCE {calibration_dict['mce']:.3f}")
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(lower, count, width, align="edge", color="tab:gray", edgecolor="black")
    bottom.set(xlabel="confidence", ylabel="count")
    fig.tight_layout()
    return _save(fig, path)


def per_class_bars(per_class: dict, metric: str, path) -> str:
    """Horizontal bar per class of one metric from a ``per_class`` dict.

    >>> per_class_bars({"a": {"f1": 0.8}, "b": {"f1": None}}, "f1", "f1.png")
    'f1.png'

    Args:
        per_class: {class name: {metric: value}} as in ``multiclass_metrics``.
        metric: key to plot, e.g. "f1" or "roc_auc"; None values show as "n/a".
        path: PNG file to write.

    Returns:
        ``path``.
    """
    names = [str(n) for n in per_class]
    values = [per_class[n].get(metric) for n in per_class]
    if not names:
        raise ValueError("per_class is empty")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.3 * len(names)))
    y = np.arange(len(names))
    ax.barh(y, [0.0 if v is None else v for v in values], color="tab:blue")
    for i, v in enumerate(values):
        ax.text(0 if v is None else v, i, " n/a" if v is None else f" {v:.3f}",
                va="center", fontsize="small")
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # first class on top, as listed
    finite = [v for v in values if v is not None]
    ax.set_xlim(min([0.0] + finite) * 1.12, max([1.0] + finite) * 1.12)
    ax.set(xlabel=metric, title=f"{metric} per class")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def mask_overlays(rows, path) -> str:
    """Images with masks drawn over them, side by side: one row per image, one panel per layer
    (e.g. ground truth, then predictions). Each mask gets a colour by its position in its layer
    (so class k has one colour in every panel when layers list masks by class), its outline,
    and its label, if any, at its first pixel.

    Args:
        rows: per image, (image [H, W, C] on the 0..255 scale, [(panel title, masks [N, H, W],
            N labels or None), ...]).
        path: PNG file to write.

    Returns:
        ``path``.
    """
    if not rows:
        raise ValueError("no images to draw")
    plt = _pyplot()
    colours = plt.get_cmap("tab10").colors  # saturated, so that each reads over grey pixels
    columns = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.5 * columns, 3.3 * len(rows)), squeeze=False)
    for axs, (image, layers) in zip(axes, rows, strict=True):
        image = np.asarray(image, np.float32)
        shown = np.clip((image[..., 0] if image.shape[-1] == 1 else image) / 255.0, 0.0, 1.0)
        for ax, (title, masks, labels) in zip(axs, layers, strict=True):
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
            for i, mask in enumerate(np.asarray(masks, bool)):
                if not mask.any():
                    continue
                colour = colours[i % len(colours)]
                ax.imshow(np.dstack([np.broadcast_to(colour, mask.shape + (3,)), mask * 0.45]))
                if not mask.all():  # an outline needs both sides
                    ax.contour(mask, levels=[0.5], colors=[colour], linewidths=0.8)
                if labels is not None:
                    y, x = np.argwhere(mask)[0]
                    ax.text(x, y, labels[i], color="white", fontsize=6, va="bottom",
                            bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "linewidth": 0})
            ax.set_title(title, fontsize="small")
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
