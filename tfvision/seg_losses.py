"""Segmentation losses from per-pixel logits, and pixel class weights cached to JSON.

Every loss takes ``y_pred`` = logits [B, H, W, K] (cast to float32, so mixed
precision is safe) and ``y_true`` = integer masks [B, H, W, 1] or [B, H, W], or
one-hot [B, H, W, K]. Pixels labelled ``ignore_index`` (when set) contribute
nothing. Cross-entropy and focal losses return one value per image (mean over
its pixels), so per-image ``sample_weight`` works as usual; Dice is one value
per batch (see `SoftDice`).

Deep supervision: a U-Net built with ``deep_supervision=True`` has the outputs
``["logits", "aux_1", ...]``, all at full resolution. Give each output the same
loss and the same mask, with weights halving per level:

>>> losses, weights = deep_supervision_losses(CEPlusDice(3), model.output_names)
>>> model.compile(optimizer, loss=losses, loss_weights=weights)
>>> ds = ds.map(lambda x, y: (x, deep_supervision_targets(y, model.output_names)))
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
from keras import ops

from tfvision.fileio import read_json, write_json
from tfvision.losses import class_weights

log = logging.getLogger(__name__)

SEG_WEIGHT_MODES = ("none", "inverse", "sqrt_inverse", "normalized")


def one_hot_and_valid(y_true, num_classes: int, ignore_index=None):
    """Integer or one-hot masks -> (one-hot float32 [B, H, W, K], valid float32 [B, H, W, 1]).

    Rank 4 with last dimension K (and K > 1) is one-hot; anything else is an
    integer mask. Ignored pixels (and out-of-range labels, which one_hot zeroes)
    get an all-zero one-hot row and valid = 0.
    """
    if len(y_true.shape) == 4 and y_true.shape[-1] == num_classes and num_classes > 1:
        onehot = ops.cast(y_true, "float32")
        return onehot, ops.cast(ops.sum(onehot, axis=-1, keepdims=True) > 0, "float32")
    labels = ops.cast(y_true, "int32")
    if len(labels.shape) == 4:
        labels = ops.squeeze(labels, axis=-1)
    onehot = ops.one_hot(labels, num_classes, dtype="float32")
    valid = ops.sum(onehot, axis=-1, keepdims=True)
    if ignore_index is not None:
        valid = valid * ops.cast(ops.expand_dims(labels, -1) != ignore_index, "float32")
    return onehot * valid, valid


def _per_image_mean(pixel_loss, valid):
    """[B, H, W] loss -> [B]: the mean over each image's valid pixels."""
    valid = ops.squeeze(valid, -1)
    return ops.sum(pixel_loss * valid, axis=(1, 2)) / ops.maximum(ops.sum(valid, axis=(1, 2)), 1.0)


@keras.saving.register_keras_serializable(package="tfvision")
class SoftDice(keras.losses.Loss):
    """Multi-class soft Dice: ``1 - mean_k (2 |P_k T_k| + s) / (|P_k| + |T_k| + s)``, P = softmax.

    Batch-level Dice: sums run over every pixel of the batch, not per image.
    In CT slice batches most images lack most organs; per-image Dice then is
    dominated by the smoothing term of empty slices (and is noisy for tiny
    structures), while batch Dice weighs each class by its pixels in the batch,
    as nnU-Net's "batch dice". The loss is one scalar per batch, so a per-image
    ``sample_weight`` only rescales it; use cross-entropy for per-image weights.

    >>> loss = SoftDice(num_classes=2, smooth=0.0)
    >>> float(loss(np.array([[[[0], [1]]]]), np.zeros((1, 1, 2, 2))))  # p = 0.5 everywhere
    0.5

    Args:
        num_classes: K (>= 2; background is class 0).
        smooth: added to numerator and denominator; keeps absent classes finite.
        include_background: whether class 0 enters the mean.
        ignore_index: a label whose pixels are left out entirely.
    """

    def __init__(self, num_classes, smooth=1.0, include_background=True, ignore_index=None,
                 name="soft_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.smooth = float(smooth)
        self.include_background = bool(include_background)
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def dice_per_class(self, y_true, y_pred):
        target, valid = one_hot_and_valid(y_true, self.num_classes, self.ignore_index)
        probs = ops.softmax(ops.cast(y_pred, "float32"), axis=-1) * valid
        inter = ops.sum(probs * target, axis=(0, 1, 2))
        denom = ops.sum(probs, axis=(0, 1, 2)) + ops.sum(target, axis=(0, 1, 2))
        return (2.0 * inter + self.smooth) / (denom + self.smooth)

    def call(self, y_true, y_pred):
        dice = self.dice_per_class(y_true, y_pred)
        if not self.include_background:
            dice = dice[1:]
        return 1.0 - ops.mean(dice)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "smooth": self.smooth,
                "include_background": self.include_background, "ignore_index": self.ignore_index}


@keras.saving.register_keras_serializable(package="tfvision")
class WeightedCrossEntropy(keras.losses.Loss):
    """Softmax cross-entropy per pixel, times the weight of the pixel's true class.

    Per image: ``mean_pixels(w[y] * -log softmax(logits)[y])`` over valid pixels.
    Unlike PyTorch's ``CrossEntropyLoss(weight=w)``, this divides by the pixel
    count rather than by ``sum(w[y])``; with weights from
    `segmentation_class_weights` (pixel-weighted mean 1 on the training set) the
    scale stays that of plain cross-entropy.

    >>> loss = WeightedCrossEntropy(2, class_weights=[1.0, 3.0])
    >>> round(float(loss(np.array([[[[0], [1]]]]), np.zeros((1, 1, 2, 2)))), 4)  # (1 + 3) / 2 * ln 2
    1.3863

    Args:
        num_classes: K.
        class_weights: None or K weights.
        ignore_index: a label whose pixels are left out.
    """

    def __init__(self, num_classes, class_weights=None, ignore_index=None, name="weighted_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"class_weights has {len(self.class_weights)} entries for {num_classes} classes")
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def call(self, y_true, y_pred):
        target, valid = one_hot_and_valid(y_true, self.num_classes, self.ignore_index)
        ce = -ops.sum(target * ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1), axis=-1)
        if self.class_weights is not None:
            ce = ce * ops.sum(target * ops.convert_to_tensor(self.class_weights, "float32"), axis=-1)
        return _per_image_mean(ce, valid)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "class_weights": self.class_weights, "ignore_index": self.ignore_index}


@keras.saving.register_keras_serializable(package="tfvision")
class CEPlusDice(keras.losses.Loss):
    """``ce_weight * WeightedCrossEntropy + dice_weight * SoftDice``, the radiomics notes' loss.

    Cross-entropy gives dense, well-scaled gradients from the first step; Dice
    counters class imbalance at the region level. Per image: the image's CE
    plus the batch Dice.

    Args:
        num_classes, class_weights, ignore_index: as in `WeightedCrossEntropy`.
        ce_weight, dice_weight: the mix.
        smooth, include_background: as in `SoftDice`.
    """

    def __init__(self, num_classes, class_weights=None, ce_weight=1.0, dice_weight=1.0, smooth=1.0,
                 include_background=True, ignore_index=None, name="ce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ce = WeightedCrossEntropy(num_classes, class_weights, ignore_index)
        self.dice = SoftDice(num_classes, smooth, include_background, ignore_index)
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)

    def call(self, y_true, y_pred):
        return self.ce_weight * self.ce.call(y_true, y_pred) + self.dice_weight * self.dice.call(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.ce.num_classes,
                "class_weights": self.ce.class_weights, "ce_weight": self.ce_weight,
                "dice_weight": self.dice_weight, "smooth": self.dice.smooth,
                "include_background": self.dice.include_background, "ignore_index": self.ce.ignore_index}


@keras.saving.register_keras_serializable(package="tfvision")
class SegmentationFocalLoss(keras.losses.Loss):
    """Keras's categorical focal cross-entropy per pixel on one-hot masks, mean per image.

    Args:
        num_classes: K.
        gamma: focusing exponent.
        alpha: one balancing factor, or K per-class factors (e.g. class weights).
        ignore_index: a label whose pixels are left out.
    """

    def __init__(self, num_classes, gamma=2.0, alpha=0.25, ignore_index=None, name="seg_focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.gamma = float(gamma)
        self.alpha = [float(a) for a in alpha] if isinstance(alpha, (list, tuple, np.ndarray)) else float(alpha)
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def call(self, y_true, y_pred):
        target, valid = one_hot_and_valid(y_true, self.num_classes, self.ignore_index)
        focal = keras.losses.categorical_focal_crossentropy(
            target, ops.cast(y_pred, "float32"), alpha=self.alpha, gamma=self.gamma, from_logits=True)
        return _per_image_mean(focal, valid)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "gamma": self.gamma,
                "alpha": self.alpha, "ignore_index": self.ignore_index}


def deep_supervision_losses(loss: keras.losses.Loss, output_names, decay: float = 0.5):
    """``({name: loss}, {name: weight})`` for a deep-supervision U-Net's outputs.

    ``logits`` weighs 1 and ``aux_k`` ``decay**k`` before normalising the weights to
    sum 1, so the total stays on the scale of the single-output loss. Each output
    gets its own copy of the loss (Keras tracks one ``<name>_loss`` per output).
    """
    raw = {n: 1.0 if n == "logits" else decay ** int(n.rsplit("_", 1)[1]) for n in output_names}
    total = sum(raw.values())
    config = loss.get_config()
    losses = {n: loss.__class__.from_config({**config, "name": f"{n}_{config['name']}"}) for n in output_names}
    return losses, {n: w / total for n, w in raw.items()}


def deep_supervision_targets(mask, output_names) -> dict:
    """The same full-resolution mask for every output: ``{name: mask}``."""
    return {n: mask for n in output_names}


def segmentation_class_weights(counts, mode: str) -> np.ndarray | None:
    """Per-class weights from training *pixel* counts (``none`` gives None).

    The modes and their scaling are those of `tfvision.losses.class_weights`:
    ``inverse`` is N / (K n_k); ``sqrt_inverse`` is 1/sqrt(n_k), the radiomics
    notes' ``sqrt(total / n_k)`` up to a constant, scaled so the pixel-weighted
    mean is 1 (so the loss keeps the scale of unweighted cross-entropy).

    >>> segmentation_class_weights([900, 100], "sqrt_inverse").round(3).tolist()
    [0.833, 2.5]
    """
    if mode not in SEG_WEIGHT_MODES:
        raise ValueError(f"class weight mode must be one of {SEG_WEIGHT_MODES}, got {mode!r}")
    return class_weights(np.asarray(counts), mode)


def pixel_class_counts(masks, num_classes: int) -> np.ndarray:
    """Pixels per class over an iterable of integer masks (arrays or eager tensors)."""
    counts = np.zeros(num_classes, np.int64)
    for m in masks:
        m = np.asarray(m).astype(np.int64).ravel()
        counts += np.bincount(m[(m >= 0) & (m < num_classes)], minlength=num_classes)
    return counts


def load_or_compute_class_weights(json_path, compute_fn, mode: str, key: str | None = None):
    """Class weights from a JSON cache; on a miss, ``compute_fn()`` counts pixels once.

    Counting pixels over tens of thousands of slices takes minutes (the
    radiomics notes: 10-15 min -> 1 s with the cache). The file stores the
    counts, not only the weights, so changing ``mode`` needs no recount. It is
    recomputed when ``key`` (e.g. a fingerprint of the training split) differs
    from the cached one. Written atomically.

    Args:
        json_path: the cache file.
        compute_fn: no-argument callable returning per-class pixel counts.
        mode: as in `segmentation_class_weights`.
        key: identifies the data the counts came from; None matches any cache.

    Returns:
        The weights (float32 array), or None for mode ``none``.
    """
    path = Path(json_path)
    cached = read_json(path) if path.exists() else None
    if cached is not None and (key is None or cached.get("key") == key):
        counts, key = np.asarray(cached["counts"], np.int64), cached.get("key")
    else:
        if cached is not None:
            log.info("class weights: cache %s is for another key; recounting", path)
        counts = np.asarray(compute_fn(), np.int64)
    weights = segmentation_class_weights(counts, mode)
    record = {"key": key, "counts": counts.tolist(), "mode": mode,
              "weights": None if weights is None else weights.tolist()}
    if record != cached:
        write_json(path, record)
    return weights
