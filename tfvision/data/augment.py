"""Per-image augmentation on dicts of tensors, applied inside the parallel `map`.

Ops take ``{"image": [H,W,C] float32 0..255, "mask": [H,W,1] (optional)}``
plus the image's parameter row and a random source, and return the same dict.
They are written once for batches (``[B,H,W,C]`` with ``[B, P]`` rows, each
sample its own draws; the image math is in `image_ops`): the host runs each
image as a batch of one, and ``augment.placement: "accelerator"`` runs whole
batches in the train step (`batch_augment`).
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
import functools
import math

import numpy as np
import tensorflow as tf

from tfvision.config import AugmentParams
from tfvision.data import image_ops as ops
from tfvision.data.image_ops import affine_matrix

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


_KEYS = ("image", "mask")


def _per_sample(op):
    """Let `op`, written for batches (``[B,H,W,C]`` images, ``[B, P]`` parameter rows), also
    take one image and its ``[P]`` row (the host's call): it then runs as a batch of one."""

    @functools.wraps(op)
    def run(s, p, rng):
        if p.shape.rank == 2:
            return op(s, p, rng)
        out = op({k: s[k][None] for k in _KEYS if k in s}, p[None], rng)
        return {**s, **{k: out[k][0] for k in _KEYS if k in out}}

    return run


def _n(p):
    """The batch size, static where it is known (XLA and TPUs want static shapes)."""
    return p.shape[0] if p.shape[0] is not None else tf.shape(p)[0]


def _sym(rng, p, name):
    """Per sample, uniform in [-m, m] for the sample's magnitude m = its `name` parameter."""
    return rng.uniform([_n(p)], -1.0, 1.0) * col(p, name)


def _hw(image):
    shape = tf.shape(image)
    return tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)


@_per_sample
def hflip(s, p, rng):
    return {**s, **{k: tf.reverse(s[k], [2]) for k in _KEYS if k in s}}


@_per_sample
def vflip(s, p, rng):
    return {**s, **{k: tf.reverse(s[k], [1]) for k in _KEYS if k in s}}


def _warp(image, matrix, nearest: bool):
    """Resample one [H,W,C] image through `matrix` [1, 8] (`image_ops.warp`, a batch of one)."""
    return ops.warp(image[None], matrix, nearest)[0]


@_per_sample
def affine(s, p, rng):
    """Shift / scale / rotate, nearest-neighbour for masks."""
    h, w = _hw(s["image"])
    angle = _sym(rng, p, "rotate") * (math.pi / 180.0)
    scale = 1.0 + _sym(rng, p, "scale")
    tx, ty = _sym(rng, p, "shift") * w, _sym(rng, p, "shift") * h
    m = affine_matrix(angle, scale, tx, ty, h, w)
    out = {**s, "image": ops.warp(s["image"], m, False)}
    if "mask" in s:
        out["mask"] = ops.warp(s["mask"], m, True)
    return out


@_per_sample
def color(s, p, rng):
    """Brightness, contrast, saturation and hue jitter as x -> c*b*(M x) + (1-c)*b*grey, one pass.

    `grey` is the image's mean grey level (luma), the pivot of the contrast change.
    """
    img = s["image"]
    b = 1.0 + _sym(rng, p, "brightness")
    c = 1.0 + _sym(rng, p, "contrast")
    channels = img.shape[-1]
    if channels != 3:  # saturation and hue need RGB; grey is the mean over all channels
        weights = tf.fill([channels], 1.0 / channels)
        return {**s, "image": ops.apply_color(img, tf.reshape(b * c, [-1, 1, 1]), (1.0 - c) * b, weights, False)}
    sat = 1.0 + _sym(rng, p, "saturation")
    theta = _sym(rng, p, "hue") * 2.0 * math.pi
    m = ops.color_matrix(b, c, sat, theta)
    return {**s, "image": ops.apply_color(img, m, (1.0 - c) * b, ops.LUMA, True)}


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


@_per_sample
def noise(s, p, rng):
    """Gaussian noise with a per-image std up to `noise_std`: on one image (the host) from a
    window of `noise_bank`, on a batch (the accelerator) fresh, since one window for the whole
    batch would give every image the same field."""
    img = s["image"]
    std = (rng.uniform([_n(p)]) * col(p, "noise_std"))[:, None, None, None]
    if img.shape[0] != 1 or not img.shape.is_fully_defined():  # a batch, or no size to cut a bank for
        return {**s, "image": ops.clip(img + rng.normal(tf.shape(img)) * std)}
    offset = tf.cast(rng.uniform([2]) * NOISE_MARGIN, tf.int32)
    # Not an XLA-compiled pass, unlike warp and colour: XLA needs a slice's start at compile
    # time, so every new offset compiled the function again (35 CPU-ms a call, at 32 px as at
    # 224 px: 90% of the demo's input time). Plain TF costs 0.5 CPU-ms per 224 px image.
    window = tf.slice(noise_bank(img.shape[1:]), [offset[0], offset[1], 0], img.shape[1:])
    return {**s, "image": ops.clip(img + window[None] * std)}


@_per_sample
def blur(s, p, rng):
    """Gaussian blur, separable, sigma drawn up to blur_sigma."""
    sigma = tf.maximum(rng.uniform([_n(p)], 0.1, 1.0) * col(p, "blur_sigma"), 1e-3)
    return {**s, "image": ops.blur(s["image"], sigma)}


@_per_sample
def erase(s, p, rng, max_holes: int = 16):
    """Coarse dropout: up to `erase_holes` square holes filled with mid-grey."""
    hf, wf = _hw(s["image"])
    cy, cx = rng.uniform([_n(p), max_holes]) * hf, rng.uniform([_n(p), max_holes]) * wf
    half = col(p, "erase_size") * tf.minimum(hf, wf) / 2.0
    return {**s, "image": ops.erase(s["image"], col(p, "erase_holes"), half, cy, cx)}


@_per_sample
def elastic(s, p, rng, grid: int = 4):
    """Elastic deformation: a smooth random displacement field (a coarse grid of random
    shifts upsampled bicubically), bilinear for images, nearest for masks."""
    shape = tf.shape(s["image"])
    shifts = rng.uniform([_n(p), grid, grid, 2], -1.0, 1.0)
    ys, xs = ops.elastic_coords(shifts, col(p, "elastic_alpha"), shape[1], shape[2])
    out = {**s, "image": ops.sample(s["image"], ys, xs, nearest=False)}
    if "mask" in s:
        out["mask"] = ops.sample(s["mask"], ys, xs, nearest=True)
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
        fire = rng.uniform() < params[_COL[gate]]
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
