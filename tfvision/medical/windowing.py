"""Intensity windowing, z-scoring and border cropping for medical images.

Pure numpy. Windows use the radiology convention ``[center - width/2,
center + width/2]`` mapped linearly to [0, 1] and clipped (not the DICOM
VOI LUT formula with its ``- 0.5`` / ``- 1`` offsets: the difference is below
one HU and the simple form is what papers and model cards quote).
"""

from __future__ import annotations

import numpy as np

from tfvision.errors import DataError

# (center, width) in HU.
PRESETS: dict[str, tuple[float, float]] = {
    # -1000..400 HU: air in the lungs to dense soft tissue (the NSCLC radiomics range).
    "lung": (-300.0, 1400.0),
    # W350 L50: soft tissue of the mediastinum, vessels, nodes.
    "mediastinum": (50.0, 350.0),
    # W2000 L500: -500..1500 HU, cortical bone without saturating.
    "bone": (500.0, 2000.0),
    # W80 L40: 0..80 HU, grey/white matter contrast on head CT.
    "brain": (40.0, 80.0),
}


def window(hu, center: float | None = None, width: float | None = None, preset: str | None = None) -> np.ndarray:
    """Map a window of Hounsfield units linearly onto [0, 1].

    >>> window(np.array([-1000.0, -300.0, 400.0]), preset="lung").tolist()
    [0.0, 0.5, 1.0]

    Args:
        hu: array of HU (any shape).
        center: window level in HU (with `width`).
        width: window width in HU, > 0.
        preset: one of :data:`PRESETS` instead of center/width.

    Returns:
        float32 array in [0, 1], same shape as `hu`.

    Raises:
        ValueError: unknown preset, both or neither of preset and center/width,
            or a width that is not positive.
    """
    if preset is not None:
        if center is not None or width is not None:
            raise ValueError("give either preset= or center=/width=, not both")
        if preset not in PRESETS:
            raise ValueError(f"unknown window preset {preset!r}; choose from {sorted(PRESETS)}")
        center, width = PRESETS[preset]
    if center is None or width is None:
        raise ValueError("window() needs preset= or both center= and width=")
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    low = center - width / 2.0
    out = (np.asarray(hu, np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def zscore(volume, mask=None, eps: float = 1e-8) -> np.ndarray:
    """Standardise a volume by its own mean and standard deviation.

    Statistics are per volume (per patient), as scanners and patients differ;
    with `mask` they come from the masked voxels only (e.g. the body, so that
    the air around the patient does not dominate), but every voxel is scaled.

    >>> [round(v, 3) for v in zscore(np.array([1.0, 2.0, 3.0])).tolist()]
    [-1.225, 0.0, 1.225]

    Args:
        volume: array of any shape.
        mask: optional boolean array of the same shape.
        eps: added to the std so a constant volume gives zeros, not NaN.

    Returns:
        float32 array, same shape.

    Raises:
        DataError: the mask has a different shape or selects no voxel.
    """
    volume = np.asarray(volume, np.float32)
    values = volume
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != volume.shape:
            raise DataError(f"zscore mask shape {mask.shape} differs from volume shape {volume.shape}")
        if not mask.any():
            raise DataError("zscore mask selects no voxel")
        values = volume[mask]
    mean, std = values.mean(dtype=np.float64), values.std(dtype=np.float64)
    return ((volume - mean) / (std + eps)).astype(np.float32)


def uniform_border_box(image, tol: float = 0.0) -> tuple[int, int, int, int]:
    """Bounding box that drops outer rows/columns of (near-)uniform value.

    A row or column counts as border when its peak-to-peak range (over all
    channels) is at most `tol`; this catches black padding and white
    MONOCHROME1 padding alike, where a fixed "dark" threshold catches only one.

    >>> img = np.zeros((4, 5)); img[1:3, 1:4] = [[1, 2, 3], [4, 5, 6]]
    >>> uniform_border_box(img)
    (1, 3, 1, 4)

    Args:
        image: [H, W] or [H, W, C].
        tol: largest range still treated as uniform (use ~7 on 8-bit JPEGs,
            whose padding is noisy).

    Returns:
        ``(top, bottom, left, right)`` half-open; ``(0, 0, 0, 0)`` if all uniform.
    """
    img = np.asarray(image)
    if img.ndim == 3:
        img = img.reshape(img.shape[0], img.shape[1], -1)
    else:
        img = img[..., None]
    rows = np.flatnonzero(np.ptp(img, axis=(1, 2)) > tol)
    cols = np.flatnonzero(np.ptp(img, axis=(0, 2)) > tol)
    if rows.size == 0 or cols.size == 0:
        return (0, 0, 0, 0)
    # Only the outer run is trimmed: a uniform row inside the anatomy stays.
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_uniform_borders(image, tol: float = 0.0, max_fraction: float = 0.7) -> np.ndarray:
    """Crop uniform padding around an image, refusing implausible crops.

    >>> img = np.zeros((10, 10)); img[2:8, 3:9] = np.arange(36).reshape(6, 6)
    >>> crop_uniform_borders(img).shape
    (6, 6)

    Args:
        image: [H, W] or [H, W, C].
        tol: see :func:`uniform_border_box`.
        max_fraction: largest fraction of the area that may be removed; beyond
            it the "padding" is more likely a dark image than a border.

    Returns:
        The cropped view of `image`.

    Raises:
        DataError: the crop would remove more than `max_fraction` of the area.
    """
    image = np.asarray(image)
    top, bottom, left, right = uniform_border_box(image, tol)
    height, width = image.shape[:2]
    removed = 1.0 - (bottom - top) * (right - left) / float(height * width)
    if removed > max_fraction:
        raise DataError(
            f"cropping uniform borders would remove {removed:.0%} of a {height}x{width} image "
            f"(limit {max_fraction:.0%}); the image is probably blank or almost uniform"
        )
    return image[top:bottom, left:right]
