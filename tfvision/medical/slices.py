"""Volumes (NIfTI or DICOM series) + label volumes -> 2D slice files for training.

Each slice becomes a 16-bit PNG of the windowed intensities (one channel per
window: lossless for [0, 1] values, decoded natively by TensorFlow, storable
as-is in TFRecord shards) and an integer label PNG. Slices are cut along
`axis` of the array as nibabel returns it (axis 2 of a RAS NIfTI is axial).
Images are resized bilinearly and masks by nearest neighbour; the label set of
every mask slice is checked to survive. Empty slices (no foreground) are kept,
dropped, or kept at `empty_ratio` per non-empty slice.

The same windowing is applied at prediction time (`window_volume`), so a
model sees the same intensities in training and in volume inference.

>>> rows = volume_to_slices("ct.nii.gz", "labels.nii.gz", "out/", "patient01", ["lung"])
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tfvision.errors import DataError
from tfvision.fileio import build_dir, safe_name
from tfvision.medical import windowing
from tfvision.medical.png import write_png


def load_volume(path) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) from a NIfTI file, or a DICOM series folder (HU, RAS affine)."""
    path = Path(path)
    if path.is_dir():
        from tfvision.medical.series import load_series

        volume, meta = load_series(path)
        return volume.astype(np.float32), np.asarray(meta["affine"])
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def window_volume(volume: np.ndarray, windows: list) -> np.ndarray:
    """[..., C] float32 in [0, 1], one channel per window: a preset name, [low, high] in
    the volume's units, ``minmax`` (per volume) or ``zscore`` (per volume, +-3 sd)."""
    channels = []
    for w in windows:
        if isinstance(w, (list, tuple)):
            lo, hi = float(w[0]), float(w[1])
            channels.append(windowing.window(volume, center=(lo + hi) / 2, width=hi - lo))
        elif w == "minmax":
            lo, hi = float(volume.min()), float(volume.max())
            channels.append((volume - lo) / max(hi - lo, 1e-6))
        elif w == "zscore":
            channels.append(np.clip((windowing.zscore(volume) + 3.0) / 6.0, 0.0, 1.0))
        elif w in windowing.PRESETS:
            channels.append(windowing.window(volume, preset=w))
        else:
            raise DataError(f"data.windows: unknown window {w!r} (presets: {sorted(windowing.PRESETS)}, "
                            "minmax, zscore, or [low, high])")
    return np.stack(channels, axis=-1).astype(np.float32)


def _resize(a: np.ndarray, size, order: int) -> np.ndarray:
    if size is None or a.shape[:2] == tuple(size):
        return a
    from scipy.ndimage import zoom

    factors = (size[0] / a.shape[0], size[1] / a.shape[1]) + (1,) * (a.ndim - 2)
    out = zoom(a, factors, order=order, mode="nearest", grid_mode=True)
    return out[: size[0], : size[1]]


def volume_to_slices(image_path, mask_path, out_dir, patient: str, windows: list, *, axis: int = 2,
                     empty: str = "keep", empty_ratio: float = 0.2, size=None, seed: int = 0) -> list[dict]:
    """Write slice PNGs of one volume under `out_dir`; return rows ``{path, mask, group,
    label, slice}`` with paths relative to `out_dir` (the folder may be moved afterwards)."""
    volume, _ = load_volume(image_path)
    labels, _ = load_volume(mask_path)
    if volume.shape != labels.shape:
        raise DataError(f"{mask_path}: label volume shape {labels.shape} differs from image {volume.shape}")
    if not np.allclose(labels, np.round(labels)):
        raise DataError(f"{mask_path}: label volume holds non-integer values")
    labels = np.round(labels).astype(np.int32)
    if labels.min() < 0 or labels.max() > 65535:
        raise DataError(f"{mask_path}: labels must lie in 0..65535")
    img = np.moveaxis(window_volume(volume, windows), axis, 0)
    lab = np.moveaxis(labels, axis, 0)
    fg = np.flatnonzero(lab.reshape(len(lab), -1).max(axis=1) > 0)
    fg_set = set(fg.tolist())
    bg = np.setdiff1d(np.arange(len(lab)), fg)
    if empty == "drop":
        bg = bg[:0]
    elif empty == "ratio":
        rng = np.random.default_rng(seed)
        bg = np.sort(rng.choice(bg, size=min(len(bg), int(round(empty_ratio * len(fg)))), replace=False))
    keep = np.sort(np.concatenate([fg, bg]))
    mask_dtype = np.uint8 if labels.max() < 256 else np.uint16
    stem = Path(str(image_path)).name.split(".")[0]
    folder = safe_name(patient)  # the CSV's patient id may be "../x" or "/abs"
    rows = []
    for z in keep:
        im = _resize(img[z], size, order=1)
        mk = _resize(lab[z], size, order=0)
        if not set(np.unique(mk)) <= set(np.unique(lab[z])):  # nearest neighbour invents no label
            raise AssertionError("mask resize produced a label that was not in the slice")
        iname, mname = f"{folder}/{stem}_s{z:04d}.png", f"{folder}/{stem}_s{z:04d}_mask.png"
        write_png(Path(out_dir) / iname, np.round(np.clip(im, 0, 1) * 65535).astype(np.uint16))
        write_png(Path(out_dir) / mname, mk.astype(mask_dtype))
        rows.append({"path": iname, "mask": mname, "group": patient, "slice": int(z),
                     "label": "foreground" if z in fg_set else "empty"})
    return rows


def slice_cache(cache_root: Path, key: dict, build) -> Path:
    """Build slices once into ``cache_root/slices/<hash of key>`` (atomically) and reuse them.

    `cache_root` is the dataset's derived-data folder (`DataConfig.derived_dir`), never the
    dataset itself, which may be read-only.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def build_all(tmp: Path):
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(key, indent=2, default=str))  # written last: the marker

    final = Path(cache_root) / "slices" / digest
    return build_dir(final, build_all, "key.json",
                     f"data.cache_dir: {final} exists and is not a slice cache tfvision built (no key.json); "
                     f"point data.cache_dir elsewhere")
