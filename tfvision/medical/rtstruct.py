"""RTSTRUCT contours rasterised into a label volume on the CT grid they were drawn on.

Contours are polygons in patient coordinates (LPS mm); they are mapped into
the voxel grid of the referenced CT series (the ``[X, Y, Z]`` grid and RAS
affine of :func:`~tfvision.medical.series.load_series`) and filled with an
even-odd rule: a voxel belongs to a structure when its centre lies inside
the polygon, and nested contours on one slice make holes. Structure names
vary by clinic ("GTV-1", "gtv 2", "Poumon Droit"), so a name map with
normalised variants and ``*`` patterns decides which label each one gets.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from tfvision.errors import DataError
from tfvision.medical.dicom import read_dataset
from tfvision.medical.series import scan_dicom, series_geometry


@dataclasses.dataclass
class Structure:
    number: int
    name: str
    contours: list[tuple[str, np.ndarray]]  # (ContourGeometricType, [N, 3] LPS mm)


@dataclasses.dataclass
class RTStruct:
    path: str
    referenced_series_uids: list[str]
    frame_of_reference_uid: str
    structures: list[Structure]


def read_rtstruct(path: str | Path) -> RTStruct:
    """Parse the structures and contours of an RTSTRUCT file.

    >>> [s.name for s in read_rtstruct("rtstruct.dcm").structures]  # doctest: +SKIP
    ['patient', 'Isocenter 1', 'Isocenter 2']

    Args:
        path: the RTSTRUCT file.

    Returns:
        An :class:`RTStruct`.

    Raises:
        DicomError: unreadable file.
        DataError: the file is not an RTSTRUCT.
    """
    ds = read_dataset(path)
    if "StructureSetROISequence" not in ds:
        raise DataError(f"{path}: not an RTSTRUCT (modality {ds.get('Modality', 'unknown')})")
    contours: dict[int, list] = {}
    for rc in ds.get("ROIContourSequence", []):
        contours[int(rc.ReferencedROINumber)] = [
            (str(c.get("ContourGeometricType", "CLOSED_PLANAR")), np.asarray(c.ContourData, float).reshape(-1, 3))
            for c in rc.get("ContourSequence", [])
        ]
    series = [
        str(se.SeriesInstanceUID)
        for fr in ds.get("ReferencedFrameOfReferenceSequence", [])
        for st in fr.get("RTReferencedStudySequence", [])
        for se in st.get("RTReferencedSeriesSequence", [])
    ]
    structures = [Structure(int(r.ROINumber), str(r.ROIName), contours.get(int(r.ROINumber), []))
                  for r in ds.StructureSetROISequence]
    frames = [str(fr.get("FrameOfReferenceUID", "")) for fr in ds.get("ReferencedFrameOfReferenceSequence", [])]
    return RTStruct(str(path), series, str(ds.get("FrameOfReferenceUID", "")) or next(iter(frames), ""), structures)


_LIGATURES = str.maketrans({"œ": "oe", "æ": "ae", "ø": "o", "ł": "l", "đ": "d"})


def normalize_name(name: str) -> str:
    """Lower-case a structure name and drop accents, spaces and separators.

    >>> normalize_name("Poumon Droit"), normalize_name("GTV-1"), normalize_name("Cœur")
    ('poumondroit', 'gtv1', 'coeur')

    Args:
        name: a ROI name as written in the file.

    Returns:
        Only the characters ``[0-9a-z]``, so "GTV-1", "gtv 1" and "Gtv_1" compare equal.
    """
    # NFKD splits "é" into "e" + accent but leaves ligatures: "Cœur" must give "coeur".
    decomposed = unicodedata.normalize("NFKD", name.casefold().translate(_LIGATURES))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return re.sub(r"[^0-9a-z]", "", plain)


def _pattern(variant: str) -> str:
    # Normalise around the wildcards so "GTV *" and "gtv*" mean the same.
    return "*".join(normalize_name(part) for part in variant.split("*"))


def match_structures(names, name_map: dict[str, list[str]]) -> dict[str, Any]:
    """Assign structure names to labels through normalised variants and patterns.

    >>> m = match_structures(["GTV-1", "gtv 2", "Heart"], {"GTV": ["gtv*"], "Lung": ["poumon*"]})
    >>> m["matched"], m["unmatched"], m["missing"]
    ({'GTV': ['GTV-1', 'gtv 2'], 'Lung': []}, ['Heart'], ['Lung'])

    Args:
        names: structure names found in a file.
        name_map: label name -> variants; each variant is compared after
            :func:`normalize_name`, ``*`` matches anything (``"gtv*"``,
            ``"*tumor*"``), and the label name itself is always a variant.

    Returns:
        A dict with ``matched`` (label -> names, all merged into that label),
        ``unmatched`` (names no label wants), ``missing`` (labels with no
        name) and ``ambiguous`` (name -> labels; the first label wins).
    """
    patterns = {label: [_pattern(v) for v in [label, *variants]] for label, variants in name_map.items()}
    matched: dict[str, list[str]] = {label: [] for label in name_map}
    unmatched, ambiguous = [], {}
    for name in names:
        key = normalize_name(name)
        hits = [label for label, pats in patterns.items() if any(fnmatch.fnmatchcase(key, p) for p in pats)]
        if not hits:
            unmatched.append(name)
            continue
        matched[hits[0]].append(name)
        if len(hits) > 1:
            ambiguous[name] = hits
    missing = [label for label, found in matched.items() if not found]
    return {"matched": matched, "unmatched": unmatched, "missing": missing, "ambiguous": ambiguous}


def polygon_mask(xs, ys, shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of one polygon given in voxel coordinates.

    Voxel ``(i, j)`` is inside when its centre is, with a half-open rule on
    the edges so a 10x10 square from 0 to 10 fills exactly 100 voxels and
    two polygons sharing an edge never both claim it.

    >>> int(polygon_mask([0, 10, 10, 0], [0, 0, 10, 10], (20, 20)).sum())
    100

    Args:
        xs: vertex coordinates along axis 0.
        ys: vertex coordinates along axis 1.
        shape: (size along axis 0, size along axis 1).

    Returns:
        bool array of `shape`.
    """
    x0, y0 = np.asarray(xs, float), np.asarray(ys, float)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    mask = np.zeros(shape, bool)
    lo, hi = max(int(np.ceil(y0.min())), 0), min(int(np.ceil(y0.max())), shape[1])
    for j in range(lo, hi):
        cross = (y0 > j) != (y1 > j)  # horizontal edges never cross
        xc = np.sort(x0[cross] + (j - y0[cross]) * (x1[cross] - x0[cross]) / (y1[cross] - y0[cross]))
        for a, b in zip(xc[0::2], xc[1::2], strict=True):
            mask[max(int(np.ceil(a)), 0):min(int(np.ceil(b)), shape[0]), j] = True
    return mask


def contours_to_mask(contours, affine: np.ndarray, shape) -> tuple[np.ndarray, list[str]]:
    """Rasterise the contours of one structure onto an ``[X, Y, Z]`` grid.

    >>> mask, warnings = contours_to_mask(structure.contours, meta["affine"], vol.shape)  # doctest: +SKIP

    Args:
        contours: (geometric type, [N, 3] LPS mm points) pairs.
        affine: voxel -> RAS affine of the grid.
        shape: (X, Y, Z).

    Returns:
        ``(mask, warnings)``: bool mask and the contours that were skipped.
    """
    to_voxel = np.linalg.inv(affine)
    mask = np.zeros(shape, bool)
    skipped: dict[str, int] = {}
    for kind, points in contours:
        ijk = (points * [-1.0, -1.0, 1.0]) @ to_voxel[:3, :3].T + to_voxel[:3, 3]  # LPS -> RAS -> voxel
        k = int(np.round(ijk[:, 2].mean()))
        if np.ptp(ijk[:, 2]) > 0.5:
            reason = "not parallel to the slices"
        elif not 0 <= k < shape[2] or abs(ijk[:, 2].mean() - k) > 0.25:
            reason = "not on a slice of the grid"
        elif kind == "POINT":
            i, j = np.round(ijk[0, :2]).astype(int)
            if 0 <= i < shape[0] and 0 <= j < shape[1]:
                mask[i, j, k] = True
            continue
        elif kind != "CLOSED_PLANAR" or len(points) < 3:
            reason = f"{kind} with {len(points)} point(s) encloses no area"
        else:
            mask[:, :, k] ^= polygon_mask(ijk[:, 0], ijk[:, 1], shape[:2])  # XOR: inner contours are holes
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return mask, [f"{n} contour(s) skipped: {reason}" for reason, n in skipped.items()]


def rasterize_rtstruct(rts: RTStruct, affine, shape, name_map: dict[str, list[str]],
                       labels: dict[str, int] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Paint the mapped structures of `rts` into one label volume.

    Structures matched to one label are merged (union), e.g. GTV-1 and GTV-2.
    Where labels overlap, the one listed first in `name_map` wins, so list
    small targets (GTV) before the organs that contain them (lung).

    >>> vol, report = rasterize_rtstruct(rts, meta["affine"], ct.shape, {"GTV": ["gtv*"]})  # doctest: +SKIP

    Args:
        rts: from :func:`read_rtstruct`.
        affine: voxel -> RAS affine of the target grid.
        shape: (X, Y, Z) of the target grid.
        name_map: see :func:`match_structures`.
        labels: label name -> integer; default 1, 2, ... in `name_map` order.

    Returns:
        ``(label_volume, report)``: uint8/uint16 ``[X, Y, Z]`` volume and the
        :func:`match_structures` report plus ``labels``, ``voxels`` per label,
        ``empty`` (matched structures that drew nothing) and ``warnings``.
    """
    labels = labels or {name: k for k, name in enumerate(name_map, 1)}
    report = match_structures([s.name for s in rts.structures], name_map)
    by_name = {s.name: s for s in rts.structures}
    volume = np.zeros(shape, np.uint8 if max(labels.values(), default=0) < 256 else np.uint16)
    report.update(labels=labels, empty=[], warnings=[], voxels={})
    for label in reversed(list(name_map)):  # reversed: earlier labels overwrite later ones
        union = np.zeros(shape, bool)
        for name in report["matched"][label]:
            mask, warnings = contours_to_mask(by_name[name].contours, np.asarray(affine, float), shape)
            report["warnings"] += [f"{name}: {w}" for w in warnings]
            if not mask.any():
                report["empty"].append(name)
            union |= mask
        volume[union] = labels[label]
    report["voxels"] = {label: int((volume == labels[label]).sum()) for label in name_map}
    return volume, report


def rtstruct_to_labels(rtstruct_path: str | Path, dicom_root: str | Path, name_map: dict[str, list[str]],
                       labels: dict[str, int] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Label volume of an RTSTRUCT on the CT series it references.

    >>> vol, report = rtstruct_to_labels("RS.dcm", "LUNG1-001", {"GTV": ["gtv*"]})  # doctest: +SKIP
    >>> report["missing"], report["affine"].shape  # doctest: +SKIP
    ([], (4, 4))

    Args:
        rtstruct_path: the RTSTRUCT file.
        dicom_root: directory searched for the referenced series (by its
            SeriesInstanceUID; headers only, no pixels are decoded).
        name_map: see :func:`match_structures`.
        labels: see :func:`rasterize_rtstruct`.

    Returns:
        ``(label_volume, report)`` as :func:`rasterize_rtstruct`, the report
        also holding ``affine``, ``series_instance_uid`` and ``sheared`` of the grid.

    Raises:
        DataError: the referenced series is not under `dicom_root`, or its slice
            spacing is uneven (no one grid fits it).
    """
    rts = read_rtstruct(rtstruct_path)
    scan = scan_dicom(dicom_root)
    uid = next((u for u in rts.referenced_series_uids if u in scan.series), None)
    if uid is None:
        raise DataError(f"{rtstruct_path}: referenced series {rts.referenced_series_uids or '(none listed)'} "
                        f"not found under {dicom_root}; it holds {sorted(scan.series)}")
    geo = series_geometry(scan.series[uid])
    if len(geo["runs"]) > 1:
        # The first-to-last affine of an uneven series is the mean step: contours would land up to a gap
        # away from their slice, and dicom_to_nifti writes no file on that grid to pair the labels with.
        raise DataError(f"{rtstruct_path}: series {uid} has uneven slice spacing ({geo['warnings'][0]}); one "
                        f"label grid cannot follow it: refusing rather than misplace contours")
    volume, report = rasterize_rtstruct(rts, geo["affine"], geo["shape"], name_map, labels)
    report.update(affine=geo["affine"], series_instance_uid=uid, sheared=geo["sheared"])
    report["warnings"] = geo["warnings"] + report["warnings"]
    ct_frame = geo["ordered"][0]["frame_of_reference_uid"]
    if rts.frame_of_reference_uid and ct_frame and rts.frame_of_reference_uid != ct_frame:
        report["warnings"].append(f"frame of reference {rts.frame_of_reference_uid} differs from the CT's {ct_frame}")
    return volume, report
