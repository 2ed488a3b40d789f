"""Losses and class weighting. Keras 3 supplies the losses; this module picks and
configures them, and turns class counts into weights.

Single-label class weights become per-sample weights in the input pipeline
rather than `fit(class_weight=...)`: that works with soft (MixUp/CutMix,
label-smoothed) targets and under a distribution strategy alike. Multi-label
class weights weigh each label inside `MaskedBinaryLoss` instead (see
`label_weights`).
"""

from __future__ import annotations

import keras
import numpy as np

from tfvision.config import LossConfig


def class_weights(counts: np.ndarray, mode: str) -> np.ndarray | None:
    """Per-class weights from training counts.

    - ``inverse``: N / (K * n_k), scikit-learn's "balanced"; the weighted mean over samples is 1.
    - ``normalized``: 1 / n_k scaled so the mean over classes is 1.
    - ``sqrt_inverse``: 1 / sqrt(n_k) scaled so the weighted mean over samples is 1
      (the milder choice of the radiomics notes).

    >>> class_weights(np.array([90, 10]), "inverse").round(3).tolist()
    [0.556, 5.0]
    """
    if mode == "none":
        return None
    counts = np.asarray(counts, np.float64)
    safe = np.maximum(counts, 1.0)
    n, k = counts.sum(), len(counts)
    if mode == "inverse":
        w = n / (k * safe)
    elif mode == "normalized":
        w = (1.0 / safe) / np.mean(1.0 / safe)
    elif mode == "sqrt_inverse":
        w = 1.0 / np.sqrt(safe)
        w = w * n / np.sum(w * counts)
    else:
        raise ValueError(f"unknown class weight mode {mode!r}")
    return w.astype(np.float32)


def classification_loss(cfg: LossConfig) -> keras.losses.Loss:
    """Softmax cross-entropy (with label smoothing) or categorical focal loss, on logits."""
    if cfg.name == "focal":
        return keras.losses.CategoricalFocalCrossentropy(
            gamma=cfg.focal_gamma, from_logits=True, label_smoothing=cfg.label_smoothing
        )
    return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing)


def split_packed(y_true, num_classes: int):
    """Multi-label targets travel as ``concat([target, known], -1)`` so the mask reaches the loss."""
    return y_true[..., :num_classes], y_true[..., num_classes:]


def label_weights(positives: np.ndarray, mode: str) -> np.ndarray | None:
    """Multi-label class weights: one weight per finding, applied per label in the loss.

    A sample weight cannot carry them: a sample has no single class, and summing the
    weights of its positive classes gave every sample without a positive (a "No
    Finding" row) weight 0, so those rows never trained. Here each finding is its
    own binary problem, and its weight scales that problem's term (positives and
    negatives alike, as ``weight`` does in PyTorch's ``BCEWithLogitsLoss``): rare
    findings count for more in the shared features, no sample is ever dropped, and
    each finding's positive/negative balance stays the job of ``alpha``.
    The `class_weights` of the positive counts are scaled to mean 1 over findings,
    so the loss keeps its unweighted size (``inverse`` and ``normalized`` then agree).

    >>> label_weights(np.array([90, 10]), "inverse").astype(float).round(3).tolist()
    [0.2, 1.8]
    """
    w = class_weights(positives, mode)
    return None if w is None else (w / w.mean()).astype(np.float32)


@keras.saving.register_keras_serializable(package="tfvision")
class MaskedBinaryLoss(keras.losses.Loss):
    """Sigmoid cross-entropy or binary focal loss over known labels only.

    ``y_true`` is ``concat([target, known])``. Unknown entries (known == 0)
    contribute exactly zero loss and zero gradient; a sample's loss is the
    mean over its known entries. With ``alpha`` (per class), positives are
    weighted by it, as the CheXpert seed does with neg/pos; with
    ``class_weights`` (per class, see `label_weights`), each label's term is.

    >>> loss = MaskedBinaryLoss(num_classes=2, gamma=2.0)
    >>> float(loss(np.array([[1., 0., 1., 0.]]), np.array([[3., -50.]])))  # 2nd label unknown
    0.0001...

    Args:
        num_classes: K; ``y_true`` has 2K columns.
        gamma: focal exponent; 0 gives plain binary cross-entropy.
        alpha: None, or K positive-class weights.
        label_smoothing: targets move towards 0.5 by this amount.
        class_weights: None, or K weights of each class's whole term.
    """

    def __init__(self, num_classes, gamma=0.0, alpha=None, label_smoothing=0.0, class_weights=None,
                 name="masked_binary", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else [float(a) for a in alpha]
        self.label_smoothing = float(label_smoothing)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_true = ops.cast(y_true, "float32")
        logits = ops.cast(y_pred, "float32")
        target, known = split_packed(y_true, self.num_classes)
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        # log(1 + exp(-|x|)) form: stable for large logits.
        bce = ops.maximum(logits, 0.0) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))
        if self.gamma:
            p = ops.sigmoid(logits)
            p_t = target * p + (1.0 - target) * (1.0 - p)
            bce = bce * ops.power(1.0 - p_t, self.gamma)
        if self.alpha is not None:
            a = ops.convert_to_tensor(self.alpha, "float32")
            bce = bce * (target * a + (1.0 - target))
        if self.class_weights is not None:
            bce = bce * ops.convert_to_tensor(self.class_weights, "float32")
        bce = ops.where(known > 0, bce, 0.0)
        return ops.sum(bce, axis=-1) / ops.maximum(ops.sum(known, axis=-1), 1.0)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "gamma": self.gamma,
                "alpha": self.alpha, "label_smoothing": self.label_smoothing, "class_weights": self.class_weights}


def multilabel_loss(cfg: LossConfig, num_classes: int, positives=None, negatives=None) -> MaskedBinaryLoss:
    """Masked BCE (``crossentropy``) or masked focal loss, with alpha neg/pos or fixed, and the
    `label_weights` of the training positives when `cfg.class_weights` asks for them."""
    alpha = None
    if cfg.alpha == "neg_pos":
        alpha = (np.asarray(negatives, np.float64) / np.maximum(np.asarray(positives, np.float64), 1.0)).tolist()
    elif isinstance(cfg.alpha, float):
        alpha = [cfg.alpha] * num_classes
    gamma = cfg.focal_gamma if cfg.name == "focal" else 0.0
    weights = label_weights(positives, cfg.class_weights) if positives is not None else None
    return MaskedBinaryLoss(num_classes, gamma=gamma, alpha=alpha, label_smoothing=cfg.label_smoothing,
                            class_weights=None if weights is None else weights.tolist())
