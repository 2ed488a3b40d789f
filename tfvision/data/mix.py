"""Batch-level MixUp and CutMix with targets mixed to match.

Each image is paired with the batch reversed (as timm does), one mixing
coefficient is drawn per batch, and CutMix's coefficient is corrected to the
box area actually pasted, so the target mass matches the pixels. A batch is
mixed with probability `p`; when both are enabled each mixed batch picks one
of them with equal chance. Known-label masks (multi-label) are combined with
AND: a label unknown in either image is unknown in the mix. A segmentation
mask takes CutMix's box with its image, so every pixel keeps the label of the
image it came from; MixUp is refused with masks, since a pixel blended from
two images has no single integer label.

>>> out = mix_batch(batch, mixup_alpha=0.2, cutmix_alpha=1.0, p=0.5)
"""

from __future__ import annotations

import tensorflow as tf


def _beta(alpha: float, seed) -> tf.Tensor:
    a = tf.random.stateless_gamma([], seed, alpha=alpha)
    b = tf.random.stateless_gamma([], seed + [1, 3], alpha=alpha)
    return a / (a + b + 1e-12)


def _cut_box(lam, height, width, seed):
    """Box covering about (1 - lam) of the image; returns mask [H, W] and the real lam."""
    hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ratio = tf.sqrt(1.0 - lam)
    ch, cw = hf * ratio, wf * ratio
    c = tf.random.stateless_uniform([2], seed, 0.0, 1.0) * [hf, wf]
    y0 = tf.cast(tf.clip_by_value(c[0] - ch / 2, 0, hf), tf.int32)
    y1 = tf.cast(tf.clip_by_value(c[0] + ch / 2, 0, hf), tf.int32)
    x0 = tf.cast(tf.clip_by_value(c[1] - cw / 2, 0, wf), tf.int32)
    x1 = tf.cast(tf.clip_by_value(c[1] + cw / 2, 0, wf), tf.int32)
    ys = tf.range(height)[:, None]
    xs = tf.range(width)[None, :]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / (hf * wf)
    return box, 1.0 - area


def mix_batch(batch: dict, mixup_alpha: float, cutmix_alpha: float, p: float) -> dict:
    """Mix ``batch["image"]`` and ``batch["target"]`` (and AND ``batch["known"]``).

    ``batch["mask"]`` (segmentation, [B, H, W, 1] integer labels) is pasted with
    the same CutMix box as its image.

    Raises:
        ValueError: MixUp asked for a batch with masks.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return batch
    if "mask" in batch and mixup_alpha > 0:
        raise ValueError("augment.mix.mixup_alpha: MixUp blends two images at every pixel, which no integer "
                         "mask can label; use CutMix (augment.mix.cutmix_alpha) for segmentation")
    seed = tf.cast(batch["seed"], tf.int32) + [17, 31]
    img, tgt = batch["image"], batch["target"]
    img2, tgt2 = tf.reverse(img, [0]), tf.reverse(tgt, [0])
    u = tf.random.stateless_uniform([2], seed)
    apply = u[0] < p
    use_cut = (u[1] < 0.5) if (mixup_alpha > 0 and cutmix_alpha > 0) else tf.constant(cutmix_alpha > 0)

    no_box = tf.zeros(tf.shape(img)[1:3], tf.bool)  # the pixels taken from the paired image

    def mixup():
        lam = _beta(mixup_alpha, seed + [5, 0]) if mixup_alpha > 0 else tf.constant(1.0)
        return tf.clip_by_value(img * lam + img2 * (1.0 - lam), 0.0, 255.0), lam, no_box  # an ulp can overshoot

    def cutmix():
        lam = _beta(cutmix_alpha, seed + [7, 0]) if cutmix_alpha > 0 else tf.constant(1.0)
        box, lam = _cut_box(lam, tf.shape(img)[1], tf.shape(img)[2], seed + [9, 0])
        return tf.where(box[None, :, :, None], img2, img), lam, box

    def mixed():
        return tf.cond(use_cut, cutmix, mixup)

    def unmixed():
        return img, tf.constant(1.0), no_box

    new_img, lam, box = tf.cond(apply, mixed, unmixed)
    out = {**batch, "image": new_img, "target": tgt * lam + tgt2 * (1.0 - lam)}
    if "mask" in batch:
        m = batch["mask"]
        out["mask"] = tf.where(box[None, :, :, None], tf.reverse(m, [0]), m)
    if "known" in batch:
        k = batch["known"]
        out["known"] = tf.where(apply, k * tf.reverse(k, [0]), k)
    return out
