"""Gantry tilt: resample a sheared series onto an orthogonal grid (``dicom_to_nifti --tilt resample``).

A tilted gantry moves each slice within the image plane as the table advances,
so the slice step is not along the plane normal and the affine is sheared.
tfvision writes that exactly (sform only, ``qform_code`` 0) by default; some
tools only read orthogonal grids (SimpleITK refuses such a sform), so this
shifts each slice back by its in-plane drift, as dcm2niix's ``_Tilt`` file
does. The drift of slice k is k times the step's in-plane part; the grid
grows along the in-plane axes to hold every slice's whole field of view, and
voxels no slice covers get the volume's minimum (air on CT, 0 for dose).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TILT_MODES = ("keep", "resample")


def _shift2d(image: np.ndarray, di: float, dj: float, shape: tuple[int, int], fill: float) -> np.ndarray:
    """``out[i, j] = image[i - di, j - dj]`` by bilinear interpolation, `fill` outside `image`."""
    i = np.arange(shape[0], dtype=np.float64)[:, None] - di
    j = np.arange(shape[1], dtype=np.float64)[None, :] - dj
    i0, j0 = np.floor(i), np.floor(j)
    wi, wj = i - i0, j - j0
    out = np.zeros(shape, np.float64)
    weight = np.zeros(shape, np.float64)
    for a, wa in ((i0, 1 - wi), (i0 + 1, wi)):
        for b, wb in ((j0, 1 - wj), (j0 + 1, wj)):
            w = np.broadcast_to(wa * wb, shape)
            inside = (a >= 0) & (a < image.shape[0]) & (b >= 0) & (b < image.shape[1])
            inside = np.broadcast_to(inside, shape) & (w > 1e-9)
            ai = np.broadcast_to(np.clip(a, 0, image.shape[0] - 1), shape).astype(int)
            bi = np.broadcast_to(np.clip(b, 0, image.shape[1] - 1), shape).astype(int)
            out += np.where(inside, image[ai, bi] * w, 0.0)
            weight += np.where(inside, w, 0.0)
    # A voxel is inside the slice only when all its neighbours with weight are (no blending with fill).
    return np.where(weight > 1 - 1e-6, out, fill)


def resample_tilt(volume: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Resample a sheared ``[X, Y, Z]`` volume onto the orthogonal grid through its first slice.

    >>> vol, meta = resample_tilt(*load_series("tilted_CT"))  # doctest: +SKIP
    >>> meta["sheared"], meta["tilt_shift_voxels"]  # doctest: +SKIP
    (False, [0.0, -1.86])

    Args:
        volume: the stacked slices, as :func:`~tfvision.medical.series.load_series` returns.
        meta: its meta; ``affine`` maps voxels to RAS and may be sheared.

    Returns:
        ``(volume, meta)``: float32 volume, meta with the orthogonal ``affine``,
        ``shape``, ``spacing``, ``sheared`` False, ``tilt_shift_voxels`` (the
        in-plane drift per slice, in voxels) and a warning. An unsheared input
        comes back unchanged.
    """
    if not meta.get("sheared"):
        return volume, meta
    affine = np.asarray(meta["affine"], float)
    col, row, step = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    normal = np.cross(col, row)
    normal /= np.linalg.norm(normal)
    along = float(step @ normal)
    # The step's in-plane part in voxels: step = along * normal + a * col + b * row.
    (a, b), *_ = np.linalg.lstsq(np.stack([col, row], 1), step - along * normal, rcond=None)
    n = volume.shape[2]
    drift = np.outer(np.arange(n), [a, b])  # where slice k's voxel (0, 0) lies on the first slice's grid
    low = np.floor(drift.min(0) + 1e-6)
    high = np.ceil(drift.max(0) - 1e-6)
    shape = (volume.shape[0] + int(high[0] - low[0]), volume.shape[1] + int(high[1] - low[1]))
    fill = float(volume.min())
    out = np.stack([_shift2d(volume[:, :, k], *(drift[k] - low), shape, fill) for k in range(n)], -1)
    ortho = affine.copy()
    ortho[:3, 2] = along * normal
    ortho[:3, 3] = affine[:3, 3] + low[0] * col + low[1] * row
    degrees = math.degrees(math.atan2(float(np.linalg.norm(step - along * normal)), abs(along)))
    meta = dict(meta, affine=ortho, shape=out.shape, sheared=False, tilt_shift_voxels=[float(a), float(b)],
                spacing=np.linalg.norm(ortho[:3, :3], axis=0).tolist(),
                warnings=[*meta["warnings"], f"gantry tilt {degrees:.2f} deg resampled (linear) onto an orthogonal "
                          f"grid of {out.shape[0]}x{out.shape[1]}x{n}; uncovered voxels = {fill:g}"])
    return out.astype(np.float32), meta
