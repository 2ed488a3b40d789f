"""Minimal lossless PNG writer for 8/16-bit grey or RGB arrays (numpy + zlib).

Slices of CT volumes are stored as 16-bit PNGs: lossless for windowed values,
decoded natively by TensorFlow (`decode_png(dtype=uint16)`), and raw bytes fit
TFRecord shards unchanged. Pillow cannot write 16-bit RGB, hence this writer.

>>> write_png("slice.png", np.zeros((4, 4), np.uint16))
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from tfvision.fileio import atomic_path

_COLOR = {1: 0, 3: 2, 4: 6}  # grey, RGB, RGBA


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(array: np.ndarray) -> bytes:
    a = np.asarray(array)
    if a.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG needs uint8 or uint16, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    h, w, c = a.shape
    depth = 16 if a.dtype == np.uint16 else 8
    raw = np.ascontiguousarray(a.astype(">u2" if depth == 16 else np.uint8)).view(np.uint8).reshape(h, -1)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), raw], axis=1)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, depth, _COLOR[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def write_png(path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(encode_png(array))
