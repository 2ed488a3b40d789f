"""Per-image augmentation on dicts of tensors, applied inside the parallel `map`.

Ops take ``{"image": [H,W,C] float32 0..255, "mask": [H,W,1] (optional)}``
plus the image's parameter row and a random source, and return the same dict.
Every random draw is made once per image and applied to the image and its
mask together, so a segmentation mask never drifts from its image. Masks only
see geometric ops, with nearest-neighbour sampling, so labels never blend.

Strength comes per image from its ``params`` row (one `AugmentParams` tier,
light/medium/heavy by class size): one graph serves every tier.

Speed (see benchmarks/README.md): an op runs only on the images whose coin
comes up (`tf.cond`), and an op no tier can fire is not built at all. The
first version ran every op on whole batches, masked with `tf.where`, and
spent ~17 CPU-ms per image, 6x the PyTorch stack. Colour is one 3x3 matrix
per image (not an RGB->HSV->RGB round trip), and the affine warp and colour
each run as one XLA-compiled pass; the medium tier now costs ~0.6 CPU-ms per
224px image on top of decoding.

>>> table = param_table([AugmentParams()])
>>> plan = Plan.from_tiers([AugmentParams()])
>>> out = augment_image({"image": image}, table[0], seed, plan)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
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
    """One parameter for every row of a gathered [N, P] table."""
    return params[:, _COL[name]]


class _Rng:
    """Stateless draws from one seed; each call gets its own sub-seed."""

    def __init__(self, seed: tf.Tensor):
        self.seed = tf.cast(seed, tf.int32)
        self.k = 0

    def next_seed(self):
        self.k += 1
        return self.seed + tf.constant([0, 7919], tf.int32) * self.k

    def uniform(self, shape=(), lo=0.0, hi=1.0):
        return tf.random.stateless_uniform(shape, self.next_seed(), lo, hi)

    def normal(self, shape):
        return tf.random.stateless_normal(shape, self.next_seed())

    def sym(self, magnitude):
        """Uniform in [-magnitude, magnitude]."""
        return self.uniform((), -1.0, 1.0) * magnitude


def _p(params, name):
    return params[_COL[name]]


def hflip(s, p, rng):
    return {**s, **{k: tf.reverse(s[k], [1]) for k in ("image", "mask") if k in s}}


def vflip(s, p, rng):
    return {**s, **{k: tf.reverse(s[k], [0]) for k in ("image", "mask") if k in s}}


def affine_matrix(angle, scale, tx, ty, height, width):
    """8-parameter projective transform (output -> input pixel map) for a rotation by
    `angle` (radians) and zoom `scale` about the centre, then a shift (tx, ty)."""
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    a0, a1 = tf.cos(angle) / scale, -tf.sin(angle) / scale
    b0, b1 = tf.sin(angle) / scale, tf.cos(angle) / scale
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    return tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None, :]


def _reflect(v, n):
    """Mirror coordinates into [0, n-1] (edge pixel not repeated, OpenCV's REFLECT_101).

    Written with floor and abs: XLA's floormod made the coordinates cost more than the
    gathers (benchmarks/README.md).
    """
    top = tf.cast(n - 1, tf.float32)
    period = tf.maximum(2.0 * top, 1.0)
    v = v - period * tf.floor(v / period)  # [0, period)
    return tf.clip_by_value(top - tf.abs(top - v), 0.0, top)


@tf.function(jit_compile=True, reduce_retracing=True)
def _warp(image, matrix, nearest: bool):
    """Resample [H,W,C] through the output->input map `matrix` [1, 8], reflecting at borders.

    A gather warp compiled by XLA: TF's ImageProjectiveTransformV3 kernel (TF 2.21) spent
    2.4 ms on one 224x224 RGB image on this CPU, this 0.5 ms (benchmarks/README.md).
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    m = matrix[0]
    xs = tf.range(tf.cast(w, tf.float32))[None, :]
    ys = tf.range(tf.cast(h, tf.float32))[:, None]
    sx = _reflect(m[0] * xs + m[1] * ys + m[2], w)
    sy = _reflect(m[3] * xs + m[4] * ys + m[5], h)
    flat = tf.reshape(image, [h * w, -1])
    if nearest:
        idx = tf.cast(tf.round(sy), tf.int32) * w + tf.cast(tf.round(sx), tf.int32)
        return tf.reshape(tf.gather(flat, tf.reshape(idx, [-1])), tf.shape(image))
    x0, y0 = tf.floor(sx), tf.floor(sy)
    wx, wy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0i, y0i = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    x1i, y1i = tf.minimum(x0i + 1, w - 1), tf.minimum(y0i + 1, h - 1)

    def at(y, x):
        return tf.gather(flat, y * w + x)

    top = at(y0i, x0i) * (1.0 - wx) + at(y0i, x1i) * wx
    bottom = at(y1i, x0i) * (1.0 - wx) + at(y1i, x1i) * wx
    # Float rounding of the weights can overshoot 255 by an ulp; images stay in 0..255.
    return _clip(top * (1.0 - wy) + bottom * wy)


def affine(s, p, rng):
    """Shift / scale / rotate, nearest-neighbour for masks."""
    h, w = tf.cast(tf.shape(s["image"])[0], tf.float32), tf.cast(tf.shape(s["image"])[1], tf.float32)
    angle = rng.sym(_p(p, "rotate")) * (math.pi / 180.0)
    scale = 1.0 + rng.sym(_p(p, "scale"))
    tx, ty = rng.sym(_p(p, "shift")) * w, rng.sym(_p(p, "shift")) * h
    m = affine_matrix(angle, scale, tx, ty, h, w)
    out = {**s, "image": _warp(s["image"], m, False)}
    if "mask" in s:
        out["mask"] = _warp(s["mask"], m, True)
    return out


# RGB <-> YIQ: hue is a rotation of the (I, Q) plane, so a whole colour jitter is one 3x3 matrix.
_RGB2YIQ = tf.constant([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = tf.linalg.inv(_RGB2YIQ)
_LUMA = tf.constant([0.299, 0.587, 0.114])


def color(s, p, rng):
    """Brightness, contrast, saturation and hue jitter as x -> c*b*(M x) + (1-c)*b*grey, one pass.

    `grey` is the image's mean grey level (luma), the pivot of the contrast change.
    """
    img = s["image"]
    b = 1.0 + rng.sym(_p(p, "brightness"))
    c = 1.0 + rng.sym(_p(p, "contrast"))
    channels = img.shape[-1]
    if channels != 3:  # saturation and hue need RGB; grey is the mean over all channels
        weights = tf.fill([channels], 1.0 / channels)
        return {**s, "image": _apply_color(img, b * c * tf.eye(1), (1.0 - c) * b, weights, False)}
    sat = 1.0 + rng.sym(_p(p, "saturation"))
    theta = rng.sym(_p(p, "hue")) * 2.0 * math.pi
    cos, sin = tf.cos(theta), tf.sin(theta)
    rot = tf.stack([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    hue = _YIQ2RGB @ rot @ _RGB2YIQ
    saturate = sat * tf.eye(3) + (1.0 - sat) * tf.ones([3, 1]) * _LUMA[None, :]
    return {**s, "image": _apply_color(img, b * c * (saturate @ hue), (1.0 - c) * b, _LUMA, True)}


# The contrast pivot is estimated on every 4th row and column: the full-image mean was the
# op's most expensive pass (TF reduces over H and W slowly with 3 channels innermost).
_GREY_STRIDE = 4


@tf.function(jit_compile=True, reduce_retracing=True)
def _apply_color(img, m, grey_weight, luma, rgb: bool):
    """clip(m @ x + grey_weight * grey) per pixel; `m` acts on the channels, 1x1 for non-RGB
    images, which have their plain mean as grey level.

    One fused XLA pass over the image; TF ran the matrix, the offset and the clip as three
    (0.5 against 0.27 CPU-ms per 224px image, benchmarks/README.md).
    """
    grey = tf.reduce_sum(tf.reduce_mean(img[::_GREY_STRIDE, ::_GREY_STRIDE], axis=[0, 1]) * luma)
    if rgb:
        out = img[..., 0:1] * m[:, 0] + img[..., 1:2] * m[:, 1] + img[..., 2:3] * m[:, 2]
    else:
        out = img * m[0, 0]
    return _clip(out + grey_weight * grey)


def _clip(image):
    # Inside each op that can leave 0..255 (by design, or by an ulp of float rounding in a
    # weighted sum), so images that no such op touched skip the pass.
    return tf.clip_by_value(image, 0.0, 255.0)


# Extra rows and columns of the noise bank: 128 x 128 offsets give 16k distinct fields.
NOISE_MARGIN = 128


def noise_bank(shape, seed: int = 0) -> tf.Tensor:
    """A fixed standard-normal field a little larger than the image.

    Drawing H*W*C fresh normals cost 2 CPU-ms per 224x224 RGB image here, 5x the rest of the
    op; a random window of a fixed field costs a slice.
    """
    h, w, c = shape
    field = np.random.default_rng(seed).standard_normal((h + NOISE_MARGIN, w + NOISE_MARGIN, c))
    return tf.constant(field.astype(np.float32))


def noise(s, p, rng):
    """Gaussian noise with a per-image std up to `noise_std`, from a window of `noise_bank`."""
    img = s["image"]
    std = rng.uniform() * _p(p, "noise_std")
    if not img.shape.is_fully_defined():  # unknown size at trace time: no bank to cut from
        return {**s, "image": _clip(img + rng.normal(tf.shape(img)) * std)}
    offset = tf.cast(rng.uniform([2]) * NOISE_MARGIN, tf.int32)
    # Not an XLA-compiled pass, unlike warp and colour: XLA needs a slice's start at compile
    # time, so every new offset compiled the function again (35 CPU-ms a call, at 32 px as at
    # 224 px: 90% of the demo's input time). Plain TF costs 0.5 CPU-ms per 224 px image.
    window = tf.slice(noise_bank(img.shape), [offset[0], offset[1], 0], tf.shape(img))
    return {**s, "image": _clip(img + window * std)}


def blur(s, p, rng, radius: int = 3):
    """Gaussian blur, separable, sigma drawn up to blur_sigma."""
    img = s["image"]
    sigma = tf.maximum(rng.uniform((), 0.1, 1.0) * _p(p, "blur_sigma"), 1e-3)
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * (x / sigma) ** 2)
    k = k / tf.reduce_sum(k)
    c = tf.shape(img)[-1]
    kx = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, c, 1])
    ky = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, c, 1])
    out = tf.pad(img[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    out = tf.nn.depthwise_conv2d(out, kx, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "VALID")
    return {**s, "image": _clip(out[0])}


def erase(s, p, rng, max_holes: int = 16):
    """Coarse dropout: up to `erase_holes` square holes filled with mid-grey."""
    img = s["image"]
    hf, wf = tf.cast(tf.shape(img)[0], tf.float32), tf.cast(tf.shape(img)[1], tf.float32)
    active = tf.range(max_holes, dtype=tf.float32) < _p(p, "erase_holes")
    cy, cx = rng.uniform([max_holes]) * hf, rng.uniform([max_holes]) * wf
    half = _p(p, "erase_size") * tf.minimum(hf, wf) / 2.0
    in_y = tf.abs(tf.range(hf)[None, :] - cy[:, None]) <= half  # [M, H]
    in_x = tf.abs(tf.range(wf)[None, :] - cx[:, None]) <= half  # [M, W]
    holes = tf.logical_and(in_y[:, :, None], in_x[:, None, :]) & active[:, None, None]
    return {**s, "image": tf.where(tf.reduce_any(holes, axis=0)[..., None], 127.5, img)}


def _sample(image, ys, xs, nearest: bool):
    """Sample [H,W,C] at float coordinates [H,W] (clamped at the border)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ys = tf.clip_by_value(ys, 0.0, tf.cast(h - 1, tf.float32))
    xs = tf.clip_by_value(xs, 0.0, tf.cast(w - 1, tf.float32))

    def at(y, x):
        return tf.gather_nd(image, tf.stack([y, x], axis=-1))

    if nearest:
        return at(tf.cast(tf.round(ys), tf.int32), tf.cast(tf.round(xs), tf.int32))
    y0, x0 = tf.floor(ys), tf.floor(xs)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0i, x0i = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1i, x1i = tf.minimum(y0i + 1, h - 1), tf.minimum(x0i + 1, w - 1)
    top = at(y0i, x0i) * (1 - wx) + at(y0i, x1i) * wx
    bottom = at(y1i, x0i) * (1 - wx) + at(y1i, x1i) * wx
    return top * (1 - wy) + bottom * wy


def elastic(s, p, rng, grid: int = 4):
    """Elastic deformation: a smooth random displacement field (a coarse grid of random
    shifts upsampled bicubically), bilinear for images, nearest for masks."""
    img = s["image"]
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    field = tf.image.resize(rng.uniform([1, grid, grid, 2], -1.0, 1.0), [h, w], method="bicubic")[0]
    field = field * _p(p, "elastic_alpha")
    ys, xs = tf.meshgrid(tf.range(tf.cast(h, tf.float32)), tf.range(tf.cast(w, tf.float32)), indexing="ij")
    src_y, src_x = ys + field[..., 0], xs + field[..., 1]
    out = {**s, "image": _clip(_sample(img, src_y, src_x, nearest=False))}
    if "mask" in s:
        out["mask"] = _sample(s["mask"], src_y, src_x, nearest=True)
    return out


# (op, the probability column that gates it), in application order.
OPS = (
    (hflip, "hflip"), (vflip, "vflip"), (affine, "affine_p"), (elastic, "elastic_p"),
    (color, "color_p"), (noise, "noise_p"), (blur, "blur_p"), (erase, "erase_p"),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The ops some tier can fire; the rest are left out of the graph entirely."""

    ops: tuple

    @classmethod
    def from_tiers(cls, tiers: list[AugmentParams]) -> Plan:
        return cls(tuple((op, gate) for op, gate in OPS if any(getattr(t, gate) > 0 for t in tiers)))


def augment_image(sample: dict, params: tf.Tensor, seed: tf.Tensor, plan: Plan) -> dict:
    """Run the planned ops on one image (and mask); each fires on its own coin."""
    rng = _Rng(seed)
    s = {k: sample[k] for k in ("image", "mask") if k in sample}
    for op, gate in plan.ops:
        fire = rng.uniform() < _p(params, gate)
        sub = _Rng(rng.next_seed())  # the op's own stream: the same draws whether or not others fire
        s = tf.cond(fire, lambda op=op, s=s, sub=sub: op(s, params, sub), lambda s=s: s)
    return {**sample, **s}


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
