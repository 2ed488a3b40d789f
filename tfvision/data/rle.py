"""Run-length encoding of binary masks: Kaggle's "start length" strings and COCO's RLE.

Kaggle's competitions write a mask as space-separated ``start length`` pairs
over the flattened image. They differ in the flattening: Airbus and DSB 2018
go down the columns (``order="F"``), while the Sartorius notebooks reshape
row by row (``order="C"``); and in the index of the first pixel (``base``, 1
in all three). Both are parameters here rather than per-competition copies.

COCO's RLE is always column-major: alternating background/foreground counts,
starting with background, stored either as a list (uncompressed) or as
pycocotools' compressed string. Compressed strings are parsed here, not only
by pycocotools, because pycocotools 2.0.11 decodes counts that sum to less than
``height * width`` without complaint into uninitialised memory.

No TensorFlow here: the readers and the metrics run this on NumPy arrays.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def encode(mask, order: str = "F", base: int = 1) -> str:
    """Encode a 2-D boolean mask as Kaggle ``"start length ..."`` pairs.

    >>> encode(np.array([[0, 1], [1, 1]], bool), order="F")
    '2 3'
    >>> encode(np.array([[0, 1], [1, 1]], bool), order="C", base=0)
    '1 3'

    Args:
        mask: [H, W] array; nonzero is foreground.
        order: "F" for column-major pixel order, "C" for row-major.
        base: the index of the first pixel, 1 or 0.

    Returns:
        The runs, sorted, as one space-separated string; "" for an empty mask.
    """
    _check_layout(order, base)
    pixels = np.asarray(mask).astype(bool).ravel(order=order)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], pixels, [False]]).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(map(str, np.stack([starts + base, ends - starts], axis=1).ravel()))


def decode(rle: str, shape: tuple[int, int], order: str = "F", base: int = 1) -> np.ndarray:
    """Decode Kaggle ``"start length ..."`` pairs into a boolean mask of `shape` (H, W).

    >>> decode("2 3", (2, 2), order="F").astype(int).tolist()
    [[0, 1], [1, 1]]

    Args:
        rle: the pairs; "" (or only spaces) is an empty mask.
        shape: (height, width) of the image.
        order: "F" for column-major pixel order, "C" for row-major.
        base: the index of the first pixel, 1 or 0.

    Returns:
        [H, W] bool mask.

    Raises:
        ValueError: the string is malformed (a non-integer, an odd count, a zero or
            negative length, runs overlapping or out of order) or a run lies outside
            the image; the message says which, for per-row reports.
    """
    _check_layout(order, base)
    height, width = (int(s) for s in shape)
    size = height * width
    starts, lengths = _runs(rle)
    starts = starts - base
    ends = starts + lengths
    if len(starts) and starts[0] < 0:
        raise ValueError(f"run starts at {starts[0] + base}, before the first pixel ({base})")
    if len(starts) and ends[-1] > size:
        raise ValueError(f"runs past the image: a run ends at pixel {ends[-1] + base - 1} "
                         f"of {base}..{size + base - 1} ({height}x{width})")
    # Runs that touch (start == previous end) are valid, so add rather than assign.
    steps = np.bincount(starts, minlength=size + 1) - np.bincount(ends, minlength=size + 1)
    return (np.cumsum(steps[:size]) > 0).reshape((height, width), order=order)


def _runs(rle: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check the pairs; starts are still in the string's base."""
    tokens = str(rle).split()
    try:
        values = np.array([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not _is_int64(t))
        raise ValueError(f"RLE value {bad!r} is not an integer (or not one that fits 64 bits)") from None
    if len(values) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(values)}); it needs start/length pairs")
    starts, lengths = values[0::2], values[1::2]
    if (lengths <= 0).any():
        raise ValueError(f"RLE has a zero or negative length ({lengths[lengths <= 0][0]})")
    behind = np.flatnonzero(starts[1:] < starts[:-1] + lengths[:-1])
    if len(behind):
        i = behind[0] + 1
        kind = "out of order" if starts[i] < starts[i - 1] else "overlapping"
        raise ValueError(f"RLE runs are {kind}: start {starts[i]} follows the run "
                         f"{starts[i - 1]}+{lengths[i - 1]}")
    return starts, lengths


def _is_int64(token: str) -> bool:
    try:
        return abs(int(token)) < 2**63
    except ValueError:
        return False


def _check_layout(order: str, base: int) -> None:
    if order not in ("F", "C"):
        raise ValueError(f"order must be 'F' (column-major) or 'C' (row-major), not {order!r}")
    if base not in (0, 1):
        raise ValueError(f"base must be 1 or 0, not {base!r}")


def coco_rles(masks) -> list[dict]:
    """pycocotools RLEs (bytes counts) of [N, H, W] masks, the form pycocotools' functions take."""
    masks = np.asarray(masks).astype(bool)
    if not len(masks):
        return []
    return coco_mask.encode(np.asfortranarray(np.moveaxis(masks, 0, -1), dtype=np.uint8))


def to_coco(mask) -> dict:
    """COCO compressed RLE of a 2-D mask, counts as str so that it goes into JSON as is.

    Returns:
        ``{"size": [H, W], "counts": str}``.
    """
    rle = coco_rles(np.asarray(mask)[None])[0]
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def from_coco(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (compressed str/bytes or uncompressed list counts) into [H, W] bool.

    Raises:
        ValueError: the counts are not valid (negative, garbled, or not summing to H*W).
    """
    height, width = coco_size(rle)
    counts = coco_counts(rle)
    foreground = np.arange(len(counts)) % 2 == 1  # COCO runs start with background
    return np.repeat(foreground, counts).reshape((height, width), order="F")


def coco_size(rle: dict) -> tuple[int, int]:
    """(H, W) from a COCO RLE's ``size``; ValueError when it is not two non-negative integers."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if (not isinstance(size, list | tuple) or len(size) != 2
            or not all(isinstance(s, int | np.integer) and s >= 0 for s in size)):
        raise ValueError(f"COCO RLE needs 'size': [height, width], got {size!r}")
    return int(size[0]), int(size[1])


def coco_counts(rle: dict) -> np.ndarray:
    """The run counts of a COCO RLE, checked to be non-negative and to cover H*W pixels."""
    height, width = coco_size(rle)
    counts = rle.get("counts")
    if isinstance(counts, str | bytes):
        values = _parse_compressed(counts.encode("ascii") if isinstance(counts, str) else counts)
    elif isinstance(counts, list) and all(isinstance(c, int | np.integer) for c in counts):
        values = np.array(counts, dtype=np.int64)
    else:
        raise ValueError("COCO RLE 'counts' must be a compressed string or a list of integers")
    if (values < 0).any():
        raise ValueError("COCO RLE has a negative count")
    total = int(values.sum())
    if total > height * width:
        raise ValueError(f"runs past the image: COCO RLE counts cover {total} pixels, "
                         f"the image has {height * width} ({height}x{width})")
    if total < height * width:
        raise ValueError(f"COCO RLE counts cover {total} pixels, short of the image's "
                         f"{height * width} ({height}x{width})")
    return values


def _parse_compressed(s: bytes) -> np.ndarray:
    """pycocotools' rleFrString (maskApi.c) in Python: 5 bits a character, offset by 48,
    0x20 = more characters follow, 0x10 in the last = negative; from the fourth count on,
    each is stored as a difference from the count two places back."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = shift = 0
        more = True
        while more:
            if p == len(s):
                raise ValueError("COCO RLE string ends inside a count")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"COCO RLE string has a character {chr(s[p])!r} outside '0'..'o'")
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                x -= 1 << shift  # sign-extend
        if len(counts) > 2:  # maskApi.c tests m>2: the first three are stored whole
            x += counts[-2]
        counts.append(x)
    return np.array(counts, dtype=np.int64)
