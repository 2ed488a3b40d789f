"""Decode encoded image bytes into float32 [H, W, C] tensors on the 0..255 scale.

The decoder is chosen from the file's magic bytes, never its extension:
scraped datasets are full of PNGs saved as ``.jpg``. JPEGs are decoded with
``decode_and_crop_jpeg`` (only the crop window is decompressed) and with DCT
downscaling (``ratio`` 2/4/8) when the window is much larger than the target,
which is where most of the input pipeline's speed comes from.

Everything here is graph-friendly: it runs eagerly and inside ``Dataset.map``.

>>> img = decode(tf.io.read_file("x.png"), channels=3)
>>> img.dtype, img.shape[-1]
(tf.float32, 3)
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG"
_DCT_RATIOS = (8, 4, 2)


def is_jpeg(data: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC)


def is_png(data: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, 4), PNG_MAGIC)


def _png_shape(data: tf.Tensor) -> tf.Tensor:
    # IHDR: width then height as big-endian uint32 at byte 16.
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8), tf.int32)
    w = raw[0] * 2**24 + raw[1] * 2**16 + raw[2] * 2**8 + raw[3]
    h = raw[4] * 2**24 + raw[5] * 2**16 + raw[6] * 2**8 + raw[7]
    return tf.stack([h, w])


def is_dicom(data: tf.Tensor) -> tf.Tensor:
    # substr past the end raises, and tf.case evaluates every predicate: pad a short
    # prefix first so files under 132 bytes are simply "not DICOM".
    head = tf.strings.join([tf.strings.substr(data, 0, 132), b"\0" * 132])
    return tf.equal(tf.strings.substr(head, 128, 4), b"DICM")


def dicom_display(data: bytes) -> np.ndarray:
    """DICOM bytes -> float32 [H, W, C] on 0..255 for image models.

    Real-world values (modality LUT, MONOCHROME1 inverted) from
    `tfvision.medical.read_dicom`, then the file's own VOI window when it has
    one, else the 0.5-99.5 percentile range. Multi-frame files give the middle frame.
    """
    import io

    from tfvision.medical.dicom import read_dataset, read_dicom

    raw = data.item() if isinstance(data, np.ndarray) else bytes(data)  # numpy_function gives a 0-d array
    arr, _ = read_dicom(io.BytesIO(raw), warn_missing_rescale=False)
    header = read_dataset(io.BytesIO(raw), pixels=False)
    color = arr.ndim >= 3 and arr.shape[-1] == 3
    if arr.ndim == (4 if color else 3):
        arr = arr[len(arr) // 2]
    if color:
        return arr.astype(np.float32)
    center, width = _first(header.get("WindowCenter")), _first(header.get("WindowWidth"))
    if center is not None and width:
        lo, hi = center - width / 2.0, center + width / 2.0
    else:
        lo, hi = np.percentile(arr, [0.5, 99.5])
    out = np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * 255.0
    return out[..., None].astype(np.float32)


def dicom_shape(data: bytes) -> np.ndarray:
    """[rows, columns] from the DICOM header alone (pixel data is not read).

    The crop window needs the image's size before the decode; decoding the pixels for it
    would decode every DICOM twice per sample (pydicom, outside the graph, is the slow part).
    """
    import io

    from tfvision.medical.dicom import read_dataset

    raw = data.item() if isinstance(data, np.ndarray) else bytes(data)
    header = read_dataset(io.BytesIO(raw), pixels=False)
    return np.array([int(header.Rows), int(header.Columns)], np.int32)


def _first(value):
    if value is None:
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _dicom(data: tf.Tensor) -> tf.Tensor:
    # DICOM has no TF decoder; pydicom runs outside the graph (slower, but it
    # lets DICOM X-rays feed the same classification pipeline).
    img = tf.numpy_function(dicom_display, [data], tf.float32, stateful=False)
    img.set_shape([None, None, None])
    return img


def _dicom_shape(data: tf.Tensor) -> tf.Tensor:
    hw = tf.numpy_function(dicom_shape, [data], tf.int32, stateful=False)
    hw.set_shape([2])
    return hw


def _other(data: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_image(data, channels=0, dtype=tf.float32, expand_animations=False) * 255.0


def image_shape(data: tf.Tensor) -> tf.Tensor:
    """[height, width] of an encoded image, from its header where possible."""
    return tf.case(
        [
            (is_jpeg(data), lambda: tf.image.extract_jpeg_shape(data)[:2]),
            (is_png(data), lambda: _png_shape(data)),
            (is_dicom(data), lambda: _dicom_shape(data)),
        ],
        default=lambda: tf.shape(_other(data))[:2],
    )


def adapt_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Map whatever the file holds (gray, gray+alpha, RGB, RGBA, N bands) to `channels`."""
    c = tf.shape(image)[-1]
    if channels == 1:
        out = tf.case(
            [(c >= 3, lambda: tf.image.rgb_to_grayscale(image[..., :3]))], default=lambda: image[..., :1]
        )
    elif channels == 3:  # the common case returns the decoded tensor untouched (no copy)
        out = tf.case([(tf.equal(c, 3), lambda: image), (c > 3, lambda: image[..., :3])],
                      default=lambda: tf.repeat(image[..., :1], 3, axis=-1))
    else:
        tf.debugging.assert_equal(
            tf.logical_or(tf.equal(c, channels), tf.equal(c, 1)), True,
            message=f"image channels do not match data.channels={channels}",
        )
        out = tf.cond(tf.equal(c, 1), lambda: tf.repeat(image, channels, axis=-1), lambda: image)
    out.set_shape([None, None, channels])
    return out


# DCT downscaling may leave the window this much smaller than the target; the
# resize then upsamples by at most 1/0.8. Within the scale jitter of a random
# crop, and it halves decode time for typical crops (benchmarks/README.md).
DCT_SLACK = 0.8


def _jpeg(data, window, target):
    """Decode a JPEG crop window (uint8), letting libjpeg downscale by the largest DCT ratio
    that still leaves at least DCT_SLACK x `target` pixels."""
    y, x, h, w = window[0], window[1], window[2], window[3]
    min_h = tf.cast(tf.math.ceil(tf.cast(target[0], tf.float32) * DCT_SLACK), tf.int32)
    min_w = tf.cast(tf.math.ceil(tf.cast(target[1], tf.float32) * DCT_SLACK), tf.int32)
    branches = []
    for r in _DCT_RATIOS:
        fits = tf.logical_and(h // r >= min_h, w // r >= min_w)

        def dec(r=r):
            win = tf.stack([y // r, x // r, tf.maximum(h // r, 1), tf.maximum(w // r, 1)])
            return tf.io.decode_and_crop_jpeg(data, win, channels=0, ratio=r)

        branches.append((fits, dec))
    return tf.case(branches, default=lambda: tf.io.decode_and_crop_jpeg(data, window, channels=0))


def _png(data):
    img = tf.io.decode_png(data, channels=0, dtype=tf.uint16)  # 8-bit input is scaled by 257
    return tf.cast(img, tf.float32) * (255.0 / 65535.0)


def _crop(image, window):
    return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]


def _full_window(data, window):
    if window is None:
        hw = image_shape(data)
        window = tf.stack([0, 0, hw[0], hw[1]])
    return tf.cast(window, tf.int32)


def decode(
    data: tf.Tensor,
    channels: int,
    window: tf.Tensor | None = None,
    target: tuple[int, int] | None = None,
) -> tf.Tensor:
    """Decode `data` to float32 [h, w, channels] in 0..255, at the file's own size.

    Args:
        data: scalar string tensor with the file bytes.
        channels: output channels (see `adapt_channels`).
        window: optional int32 [y, x, h, w] crop in source pixels.
        target: optional (H, W) the caller will resize to; enables DCT downscaling for JPEG.

    Raises:
        tf.errors.InvalidArgumentError: empty, truncated or non-image bytes.
    """
    tgt = tf.constant(target or (1 << 30, 1 << 30), tf.int32)
    img = _by_format(data, _full_window(data, window), tgt, lambda x: tf.cast(x, tf.float32))
    return adapt_channels(img, channels)


def decode_resized(data: tf.Tensor, channels: int, size: tuple[int, int], window: tf.Tensor | None = None) -> tf.Tensor:
    """Decode (the `window` crop of) `data` and resize it to `size`: float32 [H, W, channels], 0..255.

    The one decode-and-resize used by training, evaluation, extraction and the exported
    bytes signature, so they all see the same pixels. JPEGs are resized straight from
    uint8 (bilinear reads them as floats anyway): casting the decoded crop to float32
    first cost a third of the resize (benchmarks/README.md).
    """
    size = tuple(int(v) for v in size)
    img = _by_format(data, _full_window(data, window), tf.constant(size, tf.int32), lambda x: tf.image.resize(x, size))
    return adapt_channels(img, channels)


def _by_format(data, window, target, finish):
    """The `window` crop of `data`, decoded by its magic bytes; `finish` runs inside each
    branch on the decoder's own dtype (uint8 for JPEG), so the branches agree on float32."""
    return tf.case(
        [
            (is_jpeg(data), lambda: finish(_jpeg(data, window, target))),
            (is_png(data), lambda: finish(_crop(_png(data), window))),
            (is_dicom(data), lambda: finish(_crop(_dicom(data), window))),
        ],
        default=lambda: finish(_crop(_other(data), window)),
    )


def decode_mask(data: tf.Tensor, window: tf.Tensor | None = None) -> tf.Tensor:
    """Decode an integer label image (8- or 16-bit PNG) to int32 [h, w, 1], unscaled.

    Unlike `decode`, values are labels, not intensities: a 16-bit label 300 stays 300.
    """
    depth = tf.io.decode_raw(tf.strings.substr(data, 24, 1), tf.uint8)[0]
    labels = tf.cond(
        tf.equal(depth, 16),
        lambda: tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16), tf.int32),
        lambda: tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint8), tf.int32),
    )
    if window is not None:
        window = tf.cast(window, tf.int32)
        labels = labels[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
    return labels


def describe_error(exc: Exception) -> str:
    """Short human reason from a TF decode error ("jpeg::Uncompress failed ...")."""
    msg = getattr(exc, "message", None) or str(exc)
    msg = re.sub(r"\{\{[^}]*\}\}", "", msg)
    msg = re.sub(r"\[Op:[^\]]*\]", "", msg)
    msg = re.sub(r"\s*name:\s*$", "", msg.strip())
    return " ".join(msg.split()) or type(exc).__name__
