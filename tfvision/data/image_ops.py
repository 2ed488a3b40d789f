"""Image kernels written once for batches, shared by both augmentation placements.

Every kernel takes images ``[B, H, W, C]`` float32 on the 0..255 scale (masks
``[B, H, W, 1]`` integer) and one parameter per sample (``[B]``), and makes no
random draw itself. The host pipeline (`augment`) calls them per image, as a
batch of one, inside tf.data's parallel map; accelerator-side augmentation
(`batch_augment`) calls them on whole batches inside the train step. So the
two placements share every line of image math and differ only in where the
draws are made and how an op is gated (`tf.cond` per image on the host,
`tf.where` over the batch on the accelerator).

>>> m = affine_matrix(tf.zeros([2]), tf.ones([2]), tf.zeros([2]), tf.zeros([2]), 32.0, 32.0)
>>> warp(images, m, False)  # identity warp of a batch of two
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def clip(image):
    # Inside each op that can leave 0..255 (by design, or by an ulp of float rounding in a
    # weighted sum), so images that no such op touched skip the pass.
    return tf.clip_by_value(image, 0.0, 255.0)


def affine_matrix(angle, scale, tx, ty, height, width):
    """Projective transforms [N, 8] (output -> input pixel map) for rotations by `angle`
    (radians) and zooms `scale` about the centre, then shifts (tx, ty); scalars give N = 1."""
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    a0, a1 = tf.cos(angle) / scale, -tf.sin(angle) / scale
    b0, b1 = tf.sin(angle) / scale, tf.cos(angle) / scale
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    zero = tf.zeros_like(a0)
    return tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=-1), [-1, 8])


def reflect(v, n):
    """Mirror coordinates into [0, n-1] (edge pixel not repeated, OpenCV's REFLECT_101).

    Written with floor and abs: XLA's floormod made the coordinates cost more than the
    gathers (benchmarks/README.md).
    """
    top = tf.cast(n - 1, tf.float32)
    period = tf.maximum(2.0 * top, 1.0)
    v = v - period * tf.floor(v / period)  # [0, period)
    return tf.clip_by_value(top - tf.abs(top - v), 0.0, top)


@tf.function(jit_compile=True, reduce_retracing=True)
def warp(images, matrices, nearest: bool):
    """Resample [B,H,W,C] through the output->input maps `matrices` [B, 8], reflecting at borders.

    A gather warp compiled by XLA: TF's ImageProjectiveTransformV3 kernel (TF 2.21) spent
    2.4 ms on one 224x224 RGB image on this CPU, this 0.5 ms (benchmarks/README.md).
    """
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    m = matrices[:, :, None, None]  # [B, 8, 1, 1]
    xs = tf.range(tf.cast(w, tf.float32))[None, None, :]
    ys = tf.range(tf.cast(h, tf.float32))[None, :, None]
    sx = tf.reshape(reflect(m[:, 0] * xs + m[:, 1] * ys + m[:, 2], w), [b, -1])  # [B, H*W]
    sy = tf.reshape(reflect(m[:, 3] * xs + m[:, 4] * ys + m[:, 5], h), [b, -1])
    flat = tf.reshape(images, [b, h * w, -1])

    def at(y, x):
        return tf.gather(flat, y * w + x, batch_dims=1)

    return tf.reshape(_resample(at, sy, sx, h, w, nearest), shape)


def _resample(at, ys, xs, h, w, nearest: bool):
    """Values at float coordinates inside [0, h-1] x [0, w-1] from `at(y, x)`, a gather at
    integer ones: the nearest pixel, or the bilinear blend of the four around."""
    if nearest:
        return at(tf.cast(tf.round(ys), tf.int32), tf.cast(tf.round(xs), tf.int32))
    y0, x0 = tf.floor(ys), tf.floor(xs)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0i, x0i = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1i, x1i = tf.minimum(y0i + 1, h - 1), tf.minimum(x0i + 1, w - 1)
    top = at(y0i, x0i) * (1.0 - wx) + at(y0i, x1i) * wx
    bottom = at(y1i, x0i) * (1.0 - wx) + at(y1i, x1i) * wx
    # Float rounding of the weights can overshoot 255 by an ulp; images stay in 0..255.
    return clip(top * (1.0 - wy) + bottom * wy)


# RGB <-> YIQ: hue is a rotation of the (I, Q) plane, so a whole colour jitter is one 3x3 matrix.
# NumPy, not tf.constant: a TF op at import starts TensorFlow's runtime, after which
# MultiWorkerMirroredStrategy (collective ops) and virtual devices can no longer be configured.
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
YIQ2RGB = np.linalg.inv(RGB2YIQ).astype(np.float32)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def color_matrix(brightness, contrast, saturation, hue):
    """[N, 3, 3] channel matrices b*c*(S @ H) from factors (1 = unchanged) and hue angles
    (radians), each a scalar or [N]."""
    cos, sin = tf.cos(hue), tf.sin(hue)
    one, zero = tf.ones_like(hue), tf.zeros_like(hue)
    rot = tf.reshape(tf.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], axis=-1), [-1, 3, 3])
    sat = tf.reshape(saturation, [-1, 1, 1])
    saturate = sat * tf.eye(3) + (1.0 - sat) * tf.ones([3, 1]) * LUMA[None, :]
    return tf.reshape(brightness * contrast, [-1, 1, 1]) * (saturate @ YIQ2RGB @ rot @ RGB2YIQ)


# The contrast pivot is estimated on every 4th row and column: the full-image mean was the
# op's most expensive pass (TF reduces over H and W slowly with 3 channels innermost).
GREY_STRIDE = 4


@tf.function(jit_compile=True, reduce_retracing=True)
def apply_color(images, m, grey_weight, luma, rgb: bool):
    """clip(m @ x + grey_weight * grey) per pixel, per sample: `m` [B,k,k] acts on the channels
    (1x1 for non-RGB images, which have their plain mean as grey level), `grey_weight` [B].

    One fused XLA pass over the images; TF ran the matrix, the offset and the clip as three
    (0.5 against 0.27 CPU-ms per 224px image, benchmarks/README.md).
    """
    grey = tf.reduce_sum(tf.reduce_mean(images[:, ::GREY_STRIDE, ::GREY_STRIDE], axis=[1, 2]) * luma, axis=-1)
    m = m[:, None, None]  # [B, 1, 1, k, k]
    if rgb:
        out = images[..., 0:1] * m[..., 0] + images[..., 1:2] * m[..., 1] + images[..., 2:3] * m[..., 2]
    else:
        out = images * m[..., 0]
    return clip(out + (grey_weight * grey)[:, None, None, None])


def blur(images, sigma, radius: int = 3):
    """Separable Gaussian blur with a per-sample `sigma` [B], symmetric padding."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    k = k / tf.reduce_sum(k, axis=1, keepdims=True)  # [B, K]
    shape = tf.shape(images)
    b, c = shape[0], images.shape[-1]
    # One depthwise conv for the batch: samples folded into channels, one kernel per (sample, channel).
    kern = tf.transpose(tf.repeat(k, c, axis=0))  # [K, B*C]
    kx = tf.reshape(kern, [1, 2 * radius + 1, b * c, 1])
    ky = tf.reshape(kern, [2 * radius + 1, 1, b * c, 1])
    folded = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, shape[1], shape[2], b * c])
    out = tf.pad(folded, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    out = tf.nn.depthwise_conv2d(out, kx, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "VALID")
    return clip(tf.transpose(tf.reshape(out, [shape[1], shape[2], b, c]), [2, 0, 1, 3]))


def erase(images, holes, half, cy, cx):
    """Fill the first `holes` [B] of the squares centred at (cy, cx) [B, M] with half side
    `half` [B] (pixels) with mid-grey."""
    hf, wf = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    active = tf.range(tf.shape(cy)[1], dtype=tf.float32)[None, :] < holes[:, None]  # [B, M]
    in_y = tf.abs(tf.range(hf)[None, None, :] - cy[:, :, None]) <= half[:, None, None]  # [B, M, H]
    in_x = tf.abs(tf.range(wf)[None, None, :] - cx[:, :, None]) <= half[:, None, None]  # [B, M, W]
    box = in_y[:, :, :, None] & in_x[:, :, None, :] & active[:, :, None, None]
    return tf.where(tf.reduce_any(box, axis=1)[..., None], 127.5, images)


def elastic_coords(shifts, alpha, height, width):
    """Source coordinates (ys, xs) [B, H, W] of a smooth displacement field: the coarse random
    `shifts` [B, g, g, 2] in -1..1 upsampled bicubically, times `alpha` [B] pixels."""
    field = tf.image.resize(shifts, [height, width], method="bicubic") * alpha[:, None, None, None]
    ys, xs = tf.meshgrid(tf.range(tf.cast(height, tf.float32)), tf.range(tf.cast(width, tf.float32)),
                         indexing="ij")
    return ys[None] + field[..., 0], xs[None] + field[..., 1]


def sample(images, ys, xs, nearest: bool):
    """Sample [B,H,W,C] at float coordinates [B,H,W] (clamped at the border)."""
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    ys = tf.clip_by_value(ys, 0.0, tf.cast(h - 1, tf.float32))
    xs = tf.clip_by_value(xs, 0.0, tf.cast(w - 1, tf.float32))

    def at(y, x):
        return tf.gather_nd(images, tf.stack([y, x], axis=-1), batch_dims=1)

    return _resample(at, ys, xs, h, w, nearest)
