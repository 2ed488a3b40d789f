"""Siemens MOSAIC: one DICOM image that tiles every slice of a volume (fMRI, DWI).

The file's Rows x Columns hold a ``g x g`` grid of tiles (``g = ceil(sqrt(n))``),
tile ``k`` at grid row ``k // g``, column ``k % g``. Its ImagePositionPatient is
the corner of the whole tiled image, not of any slice, so the first slice lies
half the difference between the tiled and the tile size further along the row
and column directions (nibabel's ``MosaicWrapper.image_position``, dcm2niix's
``nii_SiemensMosaic``), and slice ``k`` a further ``k`` slice steps along the
slice normal. The slice count ``n`` is not in any standard tag: it is
NumberOfImagesInMosaic, from the CSA image header (0029,1010) or Siemens'
private (0019,100A). Without it the grid is guesswork (AcquisitionMatrix gives
the tile size but not how many tiles are slices), so the file is refused
rather than written as one tiled image.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np


def is_mosaic(ds) -> bool:
    """True for a Siemens MOSAIC image (ImageType holds ``MOSAIC``)."""
    return "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _csa(ds) -> dict:
    """The CSA image header's tags, or {} when nibabel is missing or the header is unreadable."""
    try:
        with warnings.catch_warnings():
            # nibabel 5.x's nicom/__init__ warns on import that its DICOM *readers* are experimental;
            # only the CSA parser is used here, and the warning would fail strict test runs.
            warnings.simplefilter("ignore", UserWarning)
            from nibabel.nicom import csareader
    except ImportError:  # the private (0019,100A) tag below still works without nibabel
        return {}
    try:
        return (csareader.get_csa_header(ds, "image") or {}).get("tags", {})
    except Exception:  # truncated or anonymised CSA blobs raise anything; the count is then unknown
        return {}


def mosaic_meta(ds) -> dict[str, Any]:
    """The MOSAIC fields tfvision keeps in a header meta (headers only, no pixels needed).

    >>> mosaic_meta(pydicom.dcmread("siemens_dwi_0.dcm"))["mosaic"]  # doctest: +SKIP
    48

    Args:
        ds: a ``pydicom.Dataset``.

    Returns:
        ``{"mosaic": n, "mosaic_normal": [x, y, z] | None}``: n is 0 for a MOSAIC
        whose slice count cannot be read, None for any other image.
    """
    if not is_mosaic(ds):
        return {"mosaic": None, "mosaic_normal": None}
    tags = _csa(ds)
    items = (tags.get("NumberOfImagesInMosaic") or {}).get("items") or []
    count = int(items[0]) if items else 0
    if not count:
        creator = next((ds[t].value for t in [(0x0019, 0x0010)] if t in ds), "")
        if str(creator).strip() == "SIEMENS MR HEADER" and (0x0019, 0x100A) in ds:
            count = int(ds[0x0019, 0x100A].value)
    normal = (tags.get("SliceNormalVector") or {}).get("items") or []
    return {"mosaic": count, "mosaic_normal": [float(v) for v in normal] if len(normal) == 3 else None}


def tile_headers(meta: dict) -> list[dict]:
    """One pseudo-header per slice of a MOSAIC file, with the slice's size and position.

    >>> [h["image_position_patient"] for h in tile_headers(read_header("dwi.dcm"))][:1]  # doctest: +SKIP

    Args:
        meta: the file's header meta (``mosaic`` from :func:`mosaic_meta`).

    Returns:
        Headers with ``tile`` (index into the grid), the tile's ``rows`` and
        ``columns`` and the slice's ``image_position_patient`` (LPS mm).

    Raises:
        ValueError: the slice count is unknown, the tiles do not divide the
            image, or the geometry tags are missing.
    """
    n, rows, cols = meta["mosaic"], meta["rows"], meta["columns"]
    if not n:
        raise ValueError(f"{meta['path']}: Siemens MOSAIC without a readable NumberOfImagesInMosaic (CSA header "
                         f"(0029,1010) or (0019,100A)); refusing to write the {rows}x{cols} tiled image as one slice")
    grid = math.ceil(math.sqrt(n))
    if rows % grid or cols % grid:
        raise ValueError(f"{meta['path']}: MOSAIC of {n} slices needs a {grid}x{grid} grid, which does not divide "
                         f"{rows}x{cols}; refusing to guess the tiles")
    ipp, iop, spacing = meta["image_position_patient"], meta["image_orientation_patient"], meta["pixel_spacing"]
    if not (ipp and iop and spacing):
        raise ValueError(f"{meta['path']}: MOSAIC without ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    tile_rows, tile_cols = rows // grid, cols // grid
    row_cos, col_cos = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    # IPP is the tiled image's corner: move it to the centre-aligned first tile (nibabel's MosaicWrapper).
    first = (np.asarray(ipp, float) + row_cos * spacing[1] * (cols - tile_cols) / 2
             + col_cos * spacing[0] * (rows - tile_rows) / 2)
    normal = np.asarray(meta["mosaic_normal"] or np.cross(row_cos, col_cos), float)
    step = (meta["spacing_between_slices"] or meta["slice_thickness"] or 1.0) * normal / np.linalg.norm(normal)
    return [dict(meta, tile=k, rows=tile_rows, columns=tile_cols, instance_number=k + 1,
                 image_position_patient=(first + k * step).tolist()) for k in range(n)]


def untile(pixels: np.ndarray, header: dict) -> np.ndarray:
    """The ``[rows, columns]`` slice of tile ``header["tile"]`` cut from the tiled image."""
    rows, cols = header["rows"], header["columns"]
    r, c = divmod(header["tile"], pixels.shape[1] // cols)
    return pixels[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols]
