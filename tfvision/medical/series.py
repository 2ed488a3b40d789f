"""Group DICOM files into series and stack one series into a volume with its affine.

Volumes come back in NIfTI/MONAI order ``[X, Y, Z]`` = (column, row, slice),
so ``meta["affine"]`` maps ``volume[i, j, k]`` to RAS millimetres directly and
``nibabel.Nifti1Image(volume, meta["affine"])`` is a correct NIfTI. (Single
files from :func:`~tfvision.medical.dicom.read_dicom` stay ``[frames, H, W]``.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tfvision.errors import DataError
from tfvision.medical.dicom import ACQUISITION_TAGS, DicomError, read_dicom, read_header
from tfvision.medical.mosaic import tile_headers, untile
from tfvision.medical.spacing import (
    UNEVEN_MODES,
    even_grid,
    even_runs,
    irregular_gaps,
    resample_slices,
)

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
# DICOM patient space is LPS, NIfTI is RAS: the first two axes change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass
class DicomScan:
    """What a directory scan found: image series, non-image objects, bad files."""

    series: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # uid -> headers
    non_image: list[dict] = dataclasses.field(default_factory=list)  # RTSTRUCT, SR, ...
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)

    def merge(self, other: DicomScan) -> DicomScan:
        for uid, metas in other.series.items():
            self.series.setdefault(uid, []).extend(metas)
        self.non_image.extend(other.non_image)
        self.failed.extend(other.failed)
        return self


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:  # extension-less exports (UID file names) still carry the DICM magic
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def find_dicom_files(root: str | Path) -> list[Path]:
    """All DICOM files under `root`, recursively, skipping hidden entries.

    >>> files = find_dicom_files("LUNG1-001")  # doctest: +SKIP

    Args:
        root: a directory (patients often nest series several levels deep).

    Returns:
        Sorted paths with a DICOM suffix or the ``DICM`` magic bytes.

    Raises:
        DataError: `root` does not exist.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts) and _looks_dicom(p)
    ]


def scan_dicom(source) -> DicomScan:
    """Read headers (no pixels) and group image files by SeriesInstanceUID.

    >>> sorted(scan_dicom("LUNG1-001").series)  # doctest: +SKIP

    Args:
        source: a directory (searched with :func:`find_dicom_files`) or file paths.

    Returns:
        A :class:`DicomScan`; unreadable files land in ``failed``, never raise.

    Raises:
        DataError: a `source` directory does not exist.
    """
    scan = DicomScan()
    for path in find_dicom_files(source) if isinstance(source, (str, Path)) else source:
        try:
            meta = read_header(path)
        except DicomError as e:
            scan.failed.append((str(path), str(e)))
            continue
        if not meta["is_image"]:
            scan.non_image.append(meta)
            continue
        uid = meta["series_instance_uid"] or f"unknown-series:{Path(path).parent}"
        scan.series.setdefault(uid, []).append(meta)
    return scan


def slice_normal(orientation) -> np.ndarray:
    """Unit normal of the image plane: row cosines x column cosines (LPS)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def slice_affine(orientation, origin, pixel_spacing, step) -> np.ndarray:
    """4x4 affine from voxel (column, row, slice) to RAS millimetres.

    >>> slice_affine([1, 0, 0, 0, 1, 0], [10, 20, 30], [2, 1], [0, 0, 3])[:3, 3].tolist()
    [-10.0, -20.0, 30.0]

    Args:
        orientation: ImageOrientationPatient (row then column direction cosines).
        origin: ImagePositionPatient of the first slice (LPS mm).
        pixel_spacing: PixelSpacing as DICOM stores it: (between rows, between columns).
        step: LPS vector from one slice to the next.

    Returns:
        The affine as float64 [4, 4].
    """
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(orientation[:3], float) * float(pixel_spacing[1])  # along a row
    lps[:3, 1] = np.asarray(orientation[3:], float) * float(pixel_spacing[0])  # down a column
    lps[:3, 2] = np.asarray(step, float)
    lps[:3, 3] = np.asarray(origin, float)
    return LPS_TO_RAS @ lps


def _frame_headers(meta: dict) -> list[dict]:
    """One pseudo-header per frame of a multi-frame file, with its position."""
    n, ipp, iop = meta["number_of_frames"], meta["image_position_patient"], meta["image_orientation_patient"]
    positions = meta["frame_positions"]
    if (not positions or len(positions) != n) and ipp and iop:
        offsets = meta["grid_frame_offsets"]  # RTDOSE: offsets along the normal
        if offsets and offsets[0] != 0 and abs(offsets[0] - ipp[2]) < 1e-3:
            # PS3.3 C.8.8.3.2: a first element equal to IPP z means absolute z positions
            # (allowed for axial grids only), so make them relative to the first frame.
            offsets = [o - offsets[0] for o in offsets]
        if not offsets or len(offsets) != n:
            step = meta["spacing_between_slices"] or meta["slice_thickness"] or 1.0
            offsets = [k * step for k in range(n)]
        normal = slice_normal(iop)
        positions = [(np.asarray(ipp) + o * normal).tolist() for o in offsets]
    return [
        dict(meta, frame=k, instance_number=k + 1,
             image_position_patient=positions[k] if positions and len(positions) == n else None)
        for k in range(n)
    ]


def order_slices(headers: list[dict]) -> tuple[list[dict], np.ndarray | None, list[str]]:
    """Sort slice headers along the slice normal, else by InstanceNumber.

    >>> ordered, positions, warnings = order_slices(scan.series[uid])  # doctest: +SKIP

    Args:
        headers: per-slice metas from :func:`~tfvision.medical.dicom.read_header`.

    Returns:
        ``(ordered, positions, warnings)``; positions (IPP projected on the
        normal, mm) are None when the geometry tags are absent.

    Raises:
        DataError: neither positions nor instance numbers are available.
    """
    if all(h["image_position_patient"] and h["image_orientation_patient"] for h in headers):
        normal = slice_normal(headers[0]["image_orientation_patient"])
        # SliceLocation is unreliable across vendors; the IPP projection is not.
        pos = np.array([normal @ np.asarray(h["image_position_patient"]) for h in headers])
        order = np.argsort(pos, kind="stable")
        return [headers[i] for i in order], pos[order], []
    if all(h["instance_number"] is not None for h in headers):
        ordered = sorted(headers, key=lambda h: h["instance_number"])
        return ordered, None, ["no ImagePositionPatient/ImageOrientationPatient: ordered by InstanceNumber, "
                               "affine approximated from spacing only"]
    raise DataError(f"{headers[0]['path']}: cannot order slices (no position and no InstanceNumber)")


def spacing_warnings(positions: np.ndarray, rel_tol: float = 0.01, abs_tol: float = 1e-3) -> list[str]:
    """Report uneven gaps between consecutive sorted slice positions.

    >>> spacing_warnings(np.array([0.0, 2.5, 5.0, 10.0]))[0][:21]
    'uneven slice spacing:'

    Args:
        positions: sorted slice positions along the normal (mm).
        rel_tol, abs_tol: allowed deviation from the median gap (fraction, mm).

    Returns:
        Warning strings (empty when the spacing is even).

    Raises:
        DataError: two slices share a position (duplicated or mixed acquisitions).
    """
    gaps = np.diff(positions)
    if np.any(gaps < abs_tol):
        k = int(np.argmax(gaps < abs_tol))
        raise DataError(f"duplicate slice position {positions[k]:.3f} mm (several acquisitions in one series?); "
                        f"split them with acquisition_groups (dicom_to_nifti does)")
    bad = irregular_gaps(positions, rel_tol, abs_tol)
    if bad.size == 0:
        return []
    return [f"uneven slice spacing: gaps {gaps.min():.3f}..{gaps.max():.3f} mm (median {np.median(gaps):.3f}), "
            f"{bad.size} irregular gap(s): " + ", ".join(f"{gaps[k]:.3f} mm after slice {k}" for k in bad[:10])]


def orientation_groups(headers: list[dict], tol: float = 1e-3) -> list[list[dict]]:
    """Group slice headers whose ImageOrientationPatient agree within `tol` (cosines).

    >>> [len(g) for g in orientation_groups([{"image_orientation_patient": [1, 0, 0, 0, 1, 0]}] * 2)]
    [2]

    Args:
        headers: per-slice metas; a missing orientation joins the first group.
        tol: largest difference of any direction cosine (1e-3 is about 0.06 degrees).

    Returns:
        Groups in order of first appearance, each keeping the input order.
    """
    groups: list[tuple[np.ndarray, list[dict]]] = []
    for h in headers:
        iop = np.asarray(h["image_orientation_patient"] or (groups[0][0] if groups else [1, 0, 0, 0, 1, 0]), float)
        match = next((g for ref, g in groups if np.abs(iop - ref).max() <= tol), None)
        if match is None:
            groups.append((iop, match := []))
        match.append(h)
    return [g for _, g in groups]


def _repeats_positions(headers: list[dict], abs_tol: float = 1e-3) -> bool:
    if len(headers) < 2 or not all(h["image_position_patient"] and h["image_orientation_patient"] for h in headers):
        return False
    normal = slice_normal(headers[0]["image_orientation_patient"])
    pos = np.sort([normal @ np.asarray(h["image_position_patient"]) for h in headers])
    return bool(np.any(np.diff(pos) < abs_tol))


def acquisition_groups(headers: list[dict]) -> list[tuple[dict | None, list[dict]]]:
    """Split parallel slices that repeat their positions into one group per acquisition.

    Two echoes, the time points of a dynamic series, or a repeated scan can share
    one SeriesInstanceUID and the same slice positions. Each becomes its own group,
    told apart by the first of EchoNumbers, TemporalPositionIdentifier and
    AcquisitionNumber whose values leave no position repeated inside any group.

    >>> [tag for tag, _ in acquisition_groups(scan.series[uid])]  # doctest: +SKIP
    [{'tag': 'EchoNumbers', 'value': 1}, {'tag': 'EchoNumbers', 'value': 2}]

    Args:
        headers: per-file metas of one orientation group (see :func:`orientation_groups`).

    Returns:
        ``[(acquisition, headers), ...]`` sorted by the tag's value; ``acquisition``
        is ``{"tag", "value"}``, or None (one group) when no position repeats.

    Raises:
        DataError: positions repeat and none of the three tags separates them.
    """
    if not _repeats_positions(headers):
        return [(None, headers)]
    for key, tag in ACQUISITION_TAGS.items():
        values = [h.get(key) for h in headers]
        if None in values or len(set(values)) < 2:
            continue
        groups: dict[int, list[dict]] = {}
        for h, v in zip(headers, values, strict=True):
            groups.setdefault(v, []).append(h)
        if not any(_repeats_positions(g) for g in groups.values()):
            return [({"tag": tag, "value": v}, groups[v]) for v in sorted(groups)]
    raise DataError(f"series {headers[0]['series_instance_uid']}: duplicate slice positions that neither "
                    f"{', '.join(ACQUISITION_TAGS.values())} tells apart; refusing to stack or guess")


def series_geometry(headers: list[dict], tolerance: float = 0.01) -> dict[str, Any]:
    """Validate one series and compute its ordering, shape and affine (no pixels read).

    >>> geo = series_geometry(scan_dicom("LUNG1-001").series[uid])  # doctest: +SKIP
    >>> geo["shape"], geo["affine"]  # doctest: +SKIP

    Args:
        headers: header metas of the files of one series.
        tolerance: a gap differing from the median by more than this fraction
            is uneven (then ``runs`` has several ranges).

    Returns:
        A dict with ``ordered`` (headers in slice order), ``shape`` (X, Y, Z),
        ``affine`` (RAS; from the first to the last slice, so only right when
        ``runs`` is one range), ``spacing`` (mm per axis), ``positions``,
        ``runs`` (evenly spaced index ranges, see :func:`~tfvision.medical.spacing.even_runs`), ``sheared``
        (the slice step is not along the plane normal: gantry tilt) and ``warnings``.

    Raises:
        DataError: empty or mixed series, differing image shapes, duplicate
            positions, non-parallel slices (see :func:`orientation_groups`).
    """
    if not headers:
        raise DataError("empty series")
    uids = {h["series_instance_uid"] for h in headers}
    if len(uids) > 1:
        raise DataError(f"files from {len(uids)} series were given as one: {sorted(uids)}")
    if any(h["samples_per_pixel"] > 1 for h in headers):
        raise DataError(f"series {uids.pop()} is colour; only grey series stack into volumes")
    if any(h["number_of_frames"] > 1 for h in headers):
        if len(headers) > 1:
            raise DataError(f"series {uids.pop()} mixes a multi-frame file with other files")
        headers = _frame_headers(headers[0])
    if any(h.get("mosaic") is not None and "tile" not in h for h in headers):
        if len(headers) > 1:  # each MOSAIC file is a whole volume: several are acquisitions, split them first
            raise DataError(f"series {uids.pop()}: {len(headers)} MOSAIC files given as one volume; each is a "
                            f"volume of its own (see acquisition_groups)")
        try:
            headers = tile_headers(headers[0])
        except ValueError as e:
            raise DataError(str(e)) from None
    shapes = Counter((h["rows"], h["columns"]) for h in headers)
    if len(shapes) > 1:
        raise DataError(f"series {headers[0]['series_instance_uid']}: slices differ in size {dict(shapes)}")
    ordered, positions, warnings = order_slices(headers)
    first = ordered[0]
    iop = first["image_orientation_patient"] or [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    if len(groups := orientation_groups(ordered)) > 1:
        # One NIfTI affine describes parallel planes only (PS3.3 C.7.6.2.1.1 gives each image its own).
        raise DataError(f"series {first['series_instance_uid']}: ImageOrientationPatient differs between slices "
                        f"({len(groups)} orientations, e.g. a localizer or radial series); non-parallel planes "
                        f"are never stacked: convert each orientation group on its own (dicom_to_nifti does)")
    if len({tuple(h["pixel_spacing"] or ()) for h in ordered}) > 1:
        warnings.append("PixelSpacing differs between slices; the affine uses the first slice")
    pixel_spacing = first["pixel_spacing"] or [1.0, 1.0]
    if positions is not None and len(ordered) > 1:
        warnings += spacing_warnings(positions, tolerance)
        ipp0, ipp1 = (np.asarray(ordered[i]["image_position_patient"]) for i in (0, -1))
        step = (ipp1 - ipp0) / (len(ordered) - 1)
        sheared = bool(np.linalg.norm(np.cross(step / np.linalg.norm(step), slice_normal(iop))) > 1e-3)
        if sheared:
            warnings.append("slices are sheared (gantry tilt?): the affine is not orthogonal, so NIfTI "
                            "files carry it as the sform only (qform_code 0)")
    else:
        thickness = first["spacing_between_slices"] or first["slice_thickness"] or 1.0
        step, sheared = slice_normal(iop) * thickness, False
    origin = first["image_position_patient"] or [0.0, 0.0, 0.0]
    affine = slice_affine(iop, origin, pixel_spacing, step)
    return {
        "ordered": ordered,
        "shape": (int(first["columns"]), int(first["rows"]), len(ordered)),
        "affine": affine,
        "spacing": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "positions": None if positions is None else positions.tolist(),
        "runs": even_runs(positions, tolerance) if positions is not None else [range(len(ordered))],
        "sheared": sheared,
        "warnings": warnings,
    }


def _headers_for(source, series_uid: str | None) -> list[dict]:
    if not (isinstance(source, (str, Path)) and Path(source).is_dir()):
        return [read_header(f) for f in ([source] if isinstance(source, (str, Path)) else source)]
    series = scan_dicom(source).series
    uid = series_uid or (next(iter(series)) if len(series) == 1 else None)
    if uid not in series:
        raise DataError(f"{source}: holds {len(series)} image series {sorted(series)}; pass series_uid=")
    return series[uid]


def _stack(geo: dict) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the slices of `geo` into ``[X, Y, Z]`` with the first-to-last-slice affine."""
    ordered, warnings = geo["ordered"], list(geo["warnings"])
    volume = np.empty(geo["shape"], np.float32)
    rescales, defaulted, units = set(), 0, set()
    if "frame" in ordered[0]:  # one multi-frame file: decode once, pick frames in order
        frames, m = read_dicom(ordered[0]["path"], warn_missing_rescale=False)
        slices = ((h, frames[h["frame"]], m) for h in ordered)
    elif "tile" in ordered[0]:  # one MOSAIC file: decode once, cut each slice from its tile
        tiled, m = read_dicom(ordered[0]["path"], warn_missing_rescale=False)
        slices = ((h, untile(tiled, h), m) for h in ordered)
    else:
        slices = ((h, *read_dicom(h["path"], warn_missing_rescale=False)) for h in ordered)
    for k, (h, arr, m) in enumerate(slices):
        if arr.shape != (h["rows"], h["columns"]):
            raise DataError(f"{h['path']}: pixel array {arr.shape} is not one grey slice")
        volume[:, :, k] = arr.T  # (row, column) -> (x = column, y = row)
        rescales.add(tuple(m["frame_rescale"][h["frame"]]) if m.get("frame_rescale")
                     else (m["rescale_slope"], m["rescale_intercept"]))
        units.add(m["unit"])
        defaulted += bool(m["rescale_defaulted"])
    if defaulted:
        # One line per series instead of one per slice.
        warnings.append(f"{defaulted} of {len(ordered)} slice(s) lack RescaleSlope/RescaleIntercept; used 1/0")
    first = ordered[0]
    meta = {key: first[key] for key in ("series_instance_uid", "study_instance_uid", "frame_of_reference_uid",
                                        "patient_id", "modality", "series_number")}
    meta.update(
        affine=geo["affine"], spacing=geo["spacing"], shape=geo["shape"], axes="xyz (column, row, slice)",
        image_orientation_patient=first["image_orientation_patient"],
        image_position_patient=first["image_position_patient"],
        rescale=sorted(rescales), unit=units.pop() if len(units) == 1 else None,
        files=list(dict.fromkeys(h["path"] for h in ordered)),
        slice_positions=geo["positions"], sheared=geo["sheared"], warnings=warnings,
        mosaic=first.get("mosaic"),
    )
    return volume, meta


def _regrid(meta: dict, ordered: list[dict], first: int, last: int, n: int) -> dict[str, Any]:
    """`meta` for `n` evenly spaced slices from slice `first` to slice `last` of `ordered`."""
    ipp0, ipp1 = (np.asarray(ordered[k]["image_position_patient"], float) for k in (first, last))
    iop = ordered[first]["image_orientation_patient"]
    thickness = ordered[first]["spacing_between_slices"] or ordered[first]["slice_thickness"] or 1.0
    step = (ipp1 - ipp0) / (n - 1) if n > 1 else slice_normal(iop) * thickness
    affine = slice_affine(iop, ipp0, ordered[first]["pixel_spacing"] or [1.0, 1.0], step)
    shape = (*meta["shape"][:2], n)
    return dict(meta, affine=affine, shape=shape, spacing=np.linalg.norm(affine[:3, :3], axis=0).tolist(),
                image_position_patient=ipp0.tolist())


def load_series(source, series_uid: str | None = None, *, uneven: str = "resample", tolerance: float = 0.01,
                interpolation: str = "linear") -> tuple[np.ndarray, dict[str, Any]]:
    """Stack one DICOM series into a float32 volume ``[X, Y, Z]`` with its RAS affine.

    A series with uneven slice spacing (beyond `tolerance`) is never written
    with a mean step: it is resampled onto an even grid (``uneven="resample"``),
    or refused here (``"split"``: use :func:`load_series_runs`).

    >>> vol, meta = load_series("LUNG1-001/CT")  # doctest: +SKIP
    >>> nibabel.Nifti1Image(vol, meta["affine"])  # doctest: +SKIP

    Args:
        source: a directory holding one series, a list of its files, or one
            multi-frame file.
        series_uid: which series to take when the directory holds several.
        uneven: ``"resample"`` or ``"split"`` (see above).
        tolerance: allowed deviation of a gap from the median gap, as a fraction.
        interpolation: ``"linear"`` for images, ``"nearest"`` for label volumes.

    Returns:
        ``(volume, meta)``: meta has ``affine``, ``spacing``, ``shape``, the
        series uids, ``patient_id``, ``modality``, ``rescale`` values,
        ``unit`` (``"HU"``, ``"Gy"``, ...; None when unknown or mixed), ordered
        ``files``, ``slice_positions`` (of the output slices), ``source_positions``
        and ``gaps`` (the irregular gaps, when resampled), ``sheared`` and
        ``warnings`` (uneven spacing, orientation changes, defaulted rescale tags).

    Raises:
        DataError: inconsistent series (see :func:`series_geometry`), or uneven
            spacing with ``uneven="split"``.
        DicomError: a file cannot be decoded.
    """
    if uneven not in UNEVEN_MODES:
        raise ValueError(f"uneven must be one of {UNEVEN_MODES}, not {uneven!r}")
    geo = series_geometry(_headers_for(source, series_uid), tolerance)
    if len(geo["runs"]) > 1 and uneven == "split":
        raise DataError(f"series {geo['ordered'][0]['series_instance_uid']}: {geo['warnings'][0]}; "
                        f"load its evenly spaced runs with load_series_runs, or resample")
    volume, meta = _stack(geo)
    meta["gaps"] = _gaps(geo)
    if len(geo["runs"]) > 1:
        target = even_grid(geo["positions"])
        volume = resample_slices(volume, geo["positions"], target, interpolation)
        meta = _regrid(meta, geo["ordered"], 0, len(geo["ordered"]) - 1, len(target))
        meta.update(slice_positions=target.tolist(), source_positions=geo["positions"])
        meta["warnings"].append(f"resampled ({interpolation}) onto {len(target)} slices "
                                f"{float(np.diff(target)[0]):.3f} mm apart")
    for w in meta["warnings"]:
        log.warning("series %s: %s", meta["series_instance_uid"], w)
    return volume, meta


def _gaps(geo: dict) -> list[dict[str, float]]:
    """The gaps between evenly spaced runs: where the series breaks, and by how much."""
    positions = geo["positions"] or []
    return [{"after_slice": run.stop - 1, "gap_mm": positions[run.stop] - positions[run.stop - 1]}
            for run in geo["runs"][:-1]]


def load_series_runs(source, series_uid: str | None = None, *,
                     tolerance: float = 0.01) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """One volume per evenly spaced run of a series (one item when the spacing is even).

    >>> [meta["shape"] for _, meta in load_series_runs("CT_with_a_missing_slice")]  # doctest: +SKIP
    [(512, 512, 40), (512, 512, 61)]

    Args:
        source, series_uid, tolerance: as :func:`load_series`.

    Returns:
        ``[(volume, meta), ...]`` in slice order; each meta as :func:`load_series`
        plus ``run`` (its index) and ``gaps`` (the irregular gaps of the series).

    Raises:
        DataError, DicomError: as :func:`load_series`.
    """
    geo = series_geometry(_headers_for(source, series_uid), tolerance)
    volume, meta = _stack(geo)
    gaps, out = _gaps(geo), []
    for n, run in enumerate(geo["runs"]):
        part = _regrid(meta, geo["ordered"], run.start, run.stop - 1, len(run))
        part.update(run=n, gaps=gaps, files=list(dict.fromkeys(geo["ordered"][k]["path"] for k in run)),
                    slice_positions=None if geo["positions"] is None else geo["positions"][run.start:run.stop])
        if len(geo["runs"]) > 1:
            part["warnings"] = [*meta["warnings"], f"split into {len(geo['runs'])} evenly spaced runs; "
                                f"this is run {n} (slices {run.start}..{run.stop - 1})"]
        out.append((volume[:, :, run.start:run.stop], part))
    for w in out[0][1]["warnings"]:
        log.warning("series %s: %s", meta["series_instance_uid"], w)
    return out
