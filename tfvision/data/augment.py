"""Batched, per-image-random augmentation on dicts of tensors.

Ops take ``{"image": [B,H,W,C] float32 0..255, "mask": [B,H,W,1] (optional),
"params": [B,P], "seed": [2]}`` and return the same dict. Every random draw is
made once per image and applied to the image and its mask together, so a
segmentation mask never drifts from its image. Masks only see geometric ops,
with nearest-neighbour sampling, so labels are never blended.

Strength comes per image from ``params``: one row of `AugmentParams` values,
gathered from a small table by the image's tier (light/medium/heavy by class
size). One graph serves every tier.

Working on batches rather than single images lets TF vectorise the maths; the
pipeline benchmark shows why that matters on 2 cores.

>>> table = param_table([AugmentParams()])
>>> out = augment_batch({"image": images, "params": tf.gather(table, tiers), "seed": seed})
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from tfvision.config import AugmentParams

# Scalar fields, in table column order. Crop fields are used at decode time.
PARAM_FIELDS = [
    f.name for f in dataclasses.fields(AugmentParams) if f.name not in ("crop_scale", "crop_ratio")
] + ["crop_scale_lo", "crop_scale_hi", "crop_ratio_lo", "crop_ratio_hi"]
_COL = {name: i for i, name in enumerate(PARAM_FIELDS)}


def param_table(tiers: list[AugmentParams]) -> tf.Tensor:
    """[n_tiers, n_params] float32 table, one row per strength tier."""
    rows = []
    for p in tiers:
        row = [float(getattr(p, n)) for n in PARAM_FIELDS[:-4]]
        row += [p.crop_scale[0], p.crop_scale[1], p.crop_ratio[0], p.crop_ratio[1]]
        rows.append(row)
    return tf.constant(rows, tf.float32)


def col(params: tf.Tensor, name: str) -> tf.Tensor:
    return params[:, _COL[name]]


class _Rng:
    """Stateless draws from one batch seed; each call gets its own sub-seed."""

    def __init__(self, seed: tf.Tensor):
        self.seed = tf.cast(seed, tf.int32)
        self.k = 0

    def next_seed(self):
        self.k += 1
        return self.seed + tf.constant([0, 7919], tf.int32) * self.k

    def uniform(self, shape, lo=0.0, hi=1.0):
        return tf.random.stateless_uniform(shape, self.next_seed(), lo, hi)

    def normal(self, shape):
        return tf.random.stateless_normal(shape, self.next_seed())

    def coin(self, p):
        return self.uniform(tf.shape(p)) < p


def _where(cond, a, b):
    return tf.where(tf.reshape(cond, [-1, 1, 1, 1]), a, b)


def flips(batch: dict, rng: _Rng) -> dict:
    p = batch["params"]
    out = dict(batch)
    for name, axis in (("hflip", 2), ("vflip", 1)):
        do = rng.coin(col(p, name))
        for key in ("image", "mask"):
            if key in out:
                out[key] = _where(do, tf.reverse(out[key], [axis]), out[key])
    return out


def affine_matrices(angle, scale, tx, ty, height, width):
    """Per-image 8-parameter projective transforms (output -> input pixel map)
    for rotation `angle` (radians) and zoom `scale` about the centre, then a shift."""
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    # Inverse map: x_in = cos*(x-cx) - sin*(y-cy) + cx - tx ; y_in = sin*(x-cx) + cos*(y-cy) + cy - ty
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    zeros = tf.zeros_like(angle)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def _transform(images, matrices, interpolation):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=matrices, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation=interpolation, fill_mode="REFLECT",
    )


def affine(batch: dict, rng: _Rng) -> dict:
    """Shift / scale / rotate, one draw per image, nearest-neighbour for masks."""
    p = batch["params"]
    img = batch["image"]
    b = tf.shape(img)[0]
    h, w = tf.cast(tf.shape(img)[1], tf.float32), tf.cast(tf.shape(img)[2], tf.float32)
    do = tf.cast(rng.coin(col(p, "affine_p")), tf.float32)
    angle = rng.uniform([b], -1.0, 1.0) * col(p, "rotate") * (math.pi / 180.0) * do
    scale = 1.0 + rng.uniform([b], -1.0, 1.0) * col(p, "scale") * do
    tx = rng.uniform([b], -1.0, 1.0) * col(p, "shift") * w * do
    ty = rng.uniform([b], -1.0, 1.0) * col(p, "shift") * h * do
    m = affine_matrices(angle, scale, tx, ty, h, w)
    out = dict(batch)
    out["image"] = _transform(img, m, "BILINEAR")
    if "mask" in batch:
        mask = tf.cast(batch["mask"], tf.float32)
        out["mask"] = tf.cast(_transform(mask, m, "NEAREST"), batch["mask"].dtype)
    return out


def color(batch: dict, rng: _Rng) -> dict:
    """Brightness, contrast, saturation and hue jitter (saturation and hue on 3 channels only)."""
    p = batch["params"]
    img = batch["image"]
    b = tf.shape(img)[0]
    do = tf.cast(rng.coin(col(p, "color_p")), tf.float32)

    def factor(name):
        return tf.reshape(1.0 + rng.uniform([b], -1.0, 1.0) * col(p, name) * do, [-1, 1, 1, 1])

    img = img * factor("brightness")
    mean = tf.reduce_mean(img, axis=[1, 2, 3], keepdims=True)
    img = (img - mean) * factor("contrast") + mean
    if img.shape[-1] == 3:
        gray = tf.reduce_mean(img, axis=-1, keepdims=True)
        img = gray + (img - gray) * factor("saturation")
        hue = rng.uniform([b], -1.0, 1.0) * col(p, "hue") * do
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(img, 0.0, 255.0) / 255.0)
        h = tf.math.floormod(hsv[..., 0] + tf.reshape(hue, [-1, 1, 1]), 1.0)
        img = tf.image.hsv_to_rgb(tf.stack([h, hsv[..., 1], hsv[..., 2]], -1)) * 255.0
    return {**batch, "image": img}


def noise(batch: dict, rng: _Rng) -> dict:
    p = batch["params"]
    img = batch["image"]
    do = tf.cast(rng.coin(col(p, "noise_p")), tf.float32)
    std = tf.reshape(rng.uniform(tf.shape(do)) * col(p, "noise_std") * do, [-1, 1, 1, 1])
    return {**batch, "image": img + rng.normal(tf.shape(img)) * std}


def blur(batch: dict, rng: _Rng, radius: int = 3) -> dict:
    """Gaussian blur with a per-image sigma, as one depthwise conv over B*C channels."""
    p = batch["params"]
    img = batch["image"]
    b, h, w, c = tf.unstack(tf.shape(img))
    do = rng.coin(col(p, "blur_p"))
    sigma = tf.maximum(rng.uniform([b], 0.1, 1.0) * col(p, "blur_sigma"), 1e-3)
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    k = k / tf.reduce_sum(k, axis=1, keepdims=True)
    identity = tf.one_hot(radius, 2 * radius + 1)
    k = tf.where(do[:, None], k, identity[None, :])  # [B, K]
    k = tf.repeat(k, c, axis=0)  # [B*C, K]
    stacked = tf.reshape(tf.transpose(img, [1, 2, 0, 3]), [1, h, w, b * c])
    kx = tf.transpose(k)[None, :, :, None]  # [1, K, B*C, 1]
    ky = tf.transpose(k)[:, None, :, None]  # [K, 1, B*C, 1]
    pad = [[0, 0], [radius, radius], [radius, radius], [0, 0]]
    out = tf.pad(stacked, pad, mode="SYMMETRIC")
    out = tf.nn.depthwise_conv2d(out, kx, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "VALID")
    out = tf.transpose(tf.reshape(out, [h, w, b, c]), [2, 0, 1, 3])
    return {**batch, "image": out}


def erase(batch: dict, rng: _Rng, max_holes: int = 16) -> dict:
    """Coarse dropout: up to `erase_holes` square holes filled with mid-grey."""
    p = batch["params"]
    img = batch["image"]
    b, h, w = tf.shape(img)[0], tf.shape(img)[1], tf.shape(img)[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    do = rng.coin(col(p, "erase_p"))
    active = tf.range(max_holes, dtype=tf.float32)[None, :] < col(p, "erase_holes")[:, None]  # [B, M]
    cy = rng.uniform([b, max_holes]) * hf
    cx = rng.uniform([b, max_holes]) * wf
    half = (col(p, "erase_size")[:, None] * tf.minimum(hf, wf)) / 2.0
    ys = tf.range(hf)[None, None, :]
    xs = tf.range(wf)[None, None, :]
    in_y = tf.abs(ys - cy[..., None]) <= half[..., None]  # [B, M, H]
    in_x = tf.abs(xs - cx[..., None]) <= half[..., None]  # [B, M, W]
    holes = tf.logical_and(in_y[..., :, None], in_x[..., None, :])  # [B, M, H, W]
    holes = tf.logical_and(holes, active[..., None, None])
    hole = tf.reduce_any(holes, axis=1) & do[:, None, None]
    return {**batch, "image": tf.where(hole[..., None], 127.5, img)}


def _sample(images, ys, xs, nearest: bool):
    """Sample [B,H,W,C] at float coordinates [B,H,W] (clamped at the border)."""
    b, h, w = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    ys = tf.clip_by_value(ys, 0.0, tf.cast(h - 1, tf.float32))
    xs = tf.clip_by_value(xs, 0.0, tf.cast(w - 1, tf.float32))
    bi = tf.broadcast_to(tf.range(b)[:, None, None], tf.shape(ys))

    def at(y, x):
        return tf.gather_nd(images, tf.stack([bi, y, x], axis=-1))

    if nearest:
        return at(tf.cast(tf.round(ys), tf.int32), tf.cast(tf.round(xs), tf.int32))
    y0, x0 = tf.floor(ys), tf.floor(xs)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0i, x0i = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1i, x1i = tf.minimum(y0i + 1, h - 1), tf.minimum(x0i + 1, w - 1)
    top = at(y0i, x0i) * (1 - wx) + at(y0i, x1i) * wx
    bottom = at(y1i, x0i) * (1 - wx) + at(y1i, x1i) * wx
    return top * (1 - wy) + bottom * wy


def elastic(batch: dict, rng: _Rng, grid: int = 4) -> dict:
    """Elastic deformation: a smooth random displacement field (a coarse grid of random
    shifts upsampled bicubically), bilinear for images, nearest for masks."""
    p = batch["params"]
    img = batch["image"]
    b, h, w = tf.shape(img)[0], tf.shape(img)[1], tf.shape(img)[2]
    do = tf.cast(rng.coin(col(p, "elastic_p")), tf.float32)
    amp = tf.reshape(col(p, "elastic_alpha") * do, [-1, 1, 1, 1])
    field = tf.image.resize(rng.uniform([b, grid, grid, 2], -1.0, 1.0), [h, w], method="bicubic") * amp
    ys, xs = tf.meshgrid(tf.range(tf.cast(h, tf.float32)), tf.range(tf.cast(w, tf.float32)), indexing="ij")
    src_y, src_x = ys[None] + field[..., 0], xs[None] + field[..., 1]
    out = {**batch, "image": _sample(img, src_y, src_x, nearest=False)}
    if "mask" in batch:
        out["mask"] = _sample(batch["mask"], src_y, src_x, nearest=True)
    return out


OPS = (flips, affine, elastic, color, noise, blur, erase)


def augment_batch(batch: dict) -> dict:
    """Run every op; each op's own probability decides whether an image is touched."""
    rng = _Rng(batch["seed"])
    for op in OPS:
        batch = op(batch, rng)
    batch["image"] = tf.clip_by_value(batch["image"], 0.0, 255.0)
    return batch


def albumentations_fn(spec: dict):
    """Per-image bridge for an existing `A.Compose` (as `A.to_dict`). Slower than the
    native ops: it leaves the graph through `tf.numpy_function`."""
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it phones home on import
    import albumentations as A
    import numpy as np

    transform = A.from_dict(spec)

    def run(image, mask):
        args = {"image": np.clip(image, 0, 255).astype(np.uint8)}
        if mask.size:
            args["mask"] = mask
        out = transform(**args)
        res_mask = out.get("mask", mask)
        return out["image"].astype(np.float32), np.asarray(res_mask, mask.dtype)

    def op(sample: dict) -> dict:
        mask = sample.get("mask", tf.zeros([0], tf.uint8))
        image, new_mask = tf.numpy_function(run, [sample["image"], mask], [tf.float32, mask.dtype])
        image.set_shape(sample["image"].shape)
        out = {**sample, "image": image}
        if "mask" in sample:
            new_mask.set_shape(sample["mask"].shape)
            out["mask"] = new_mask
        return out

    return op
