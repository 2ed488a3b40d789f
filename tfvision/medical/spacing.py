"""Uneven slice spacing: find the evenly spaced runs of a series, or resample it onto an even grid.

One NIfTI affine has one slice step. A series with a missing slice, or one
that jumps (z = -99.5, 103.0, 104.3, 105.5 on a real scanner), written with the
mean step misplaces slices by up to the size of the jump, so tfvision never
does that: either each evenly spaced run becomes its own volume (``split``),
or the slices are interpolated onto an even grid along the normal (``resample``).
"""

from __future__ import annotations

import numpy as np

UNEVEN_MODES = ("split", "resample")


def irregular_gaps(positions, rel_tol: float = 0.01, abs_tol: float = 1e-3) -> np.ndarray:
    """Indices k where the gap from slice k to k+1 differs from the median gap.

    >>> irregular_gaps([0.0, 2.5, 7.5, 10.0]).tolist()
    [1]

    Args:
        positions: sorted slice positions along the normal (mm).
        rel_tol: allowed deviation as a fraction of the median gap (default 1%).
        abs_tol: allowed deviation in mm, for rounding in the tags.

    Returns:
        Sorted int array (empty when the spacing is even).
    """
    gaps = np.diff(np.asarray(positions, float))
    if gaps.size == 0:
        return np.zeros(0, int)
    median = float(np.median(gaps))
    return np.flatnonzero(np.abs(gaps - median) > max(abs_tol, rel_tol * median))


def even_runs(positions, rel_tol: float = 0.01, abs_tol: float = 1e-3) -> list[range]:
    """Split sorted slice indices at the irregular gaps into evenly spaced runs.

    >>> even_runs([0.0, 2.5, 7.5, 10.0])
    [range(0, 2), range(2, 4)]

    Args:
        positions, rel_tol, abs_tol: as :func:`irregular_gaps`.

    Returns:
        Consecutive index ranges covering all slices; one range when even.
    """
    cuts = [0, *(int(k) + 1 for k in irregular_gaps(positions, rel_tol, abs_tol)), len(positions)]
    return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def even_grid(positions) -> np.ndarray:
    """Even positions from the first to the last slice, with the median gap rounded to fit.

    >>> even_grid([0.0, 2.5, 7.5, 10.0]).tolist()
    [0.0, 2.5, 5.0, 7.5, 10.0]
    """
    positions = np.asarray(positions, float)
    step = float(np.median(np.diff(positions)))
    n = int(round((positions[-1] - positions[0]) / step)) + 1
    return np.linspace(positions[0], positions[-1], n)


def resample_slices(volume: np.ndarray, positions, target, interpolation: str = "linear") -> np.ndarray:
    """Interpolate an ``[X, Y, Z]`` volume along Z from `positions` onto `target`.

    >>> resample_slices(np.stack([np.zeros((1, 1)), np.ones((1, 1))], -1), [0, 10], [0, 5, 10])[0, 0].tolist()
    [0.0, 0.5, 1.0]

    Args:
        volume: slices in the order of `positions`.
        positions: sorted slice positions (mm).
        target: positions to produce, inside ``[positions[0], positions[-1]]``.
        interpolation: ``"linear"`` for images, ``"nearest"`` for label volumes
            (so labels stay the integers they were).

    Returns:
        ``[X, Y, len(target)]`` array of `volume`'s dtype.

    Raises:
        ValueError: unknown `interpolation`.
    """
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', not {interpolation!r}")
    positions, target = np.asarray(positions, float), np.asarray(target, float)
    upper = np.clip(np.searchsorted(positions, target, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = np.clip((target - positions[lower]) / (positions[upper] - positions[lower]), 0.0, 1.0)
    if interpolation == "nearest":
        return volume[:, :, np.where(weight < 0.5, lower, upper)]
    out = volume[:, :, lower] * (1.0 - weight) + volume[:, :, upper] * weight
    return out.astype(volume.dtype)
