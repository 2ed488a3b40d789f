"""Read one DICOM file into real-world values (Hounsfield units for CT).

The reader follows pydicom's modality LUT semantics, inverts MONOCHROME1,
decodes compressed transfer syntaxes through pydicom's pixel handlers and
turns every failure into a :class:`DicomError` that names the file, so that a
batch job can list the bad files and go on with the others.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tfvision.errors import DataError
from tfvision.medical.mosaic import mosaic_meta

log = logging.getLogger(__name__)

# Which package decodes which transfer syntax, for the error message. pydicom
# reports missing *plugins* but not what a user should `pip install`.
_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg (a release with HTJ2K support)",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg (a release with HTJ2K support)",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg (a release with HTJ2K support)",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}
# header meta key -> tag that numbers the acquisitions sharing one series (PS3.3 C.7.6.1, C.8.3.1, C.7.6.2).
ACQUISITION_TAGS = {"echo_number": "EchoNumbers", "temporal_position": "TemporalPositionIdentifier",
                    "acquisition_number": "AcquisitionNumber"}
# MPEG-2/4, H.264, HEVC: video streams pydicom cannot decode at all.
_VIDEO = {f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)}
_NO_DECODER = (
    "no pydicom pixel decoder exists for it; transcode the file first, "
    "e.g. with python-gdcm or dcmtk (`gdcmconv --raw`, `dcmdjpeg`)"
)


class DicomError(DataError):
    """A DICOM file cannot be read, has no pixel data, or cannot be decoded."""


def require(module: str, package: str | None = None):
    """Import an optional heavy dependency, or say which package to install.

    >>> np_mod = require("numpy")

    Args:
        module: the module to import, e.g. ``"pydicom"``.
        package: the pip package providing it when it differs from `module`.

    Returns:
        The imported module.

    Raises:
        ImportError: the module is missing; the message names the package.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = package or module
        raise ImportError(f"tfvision.medical needs {pkg!r}: pip install {pkg}") from None


def read_dataset(path: str | Path, *, pixels: bool = True):
    """Parse a DICOM file with pydicom; raise :class:`DicomError` on failure.

    >>> ds = read_dataset("CT_small.dcm", pixels=False)  # doctest: +SKIP

    Args:
        path: the file.
        pixels: False stops before the pixel data (fast header scans).

    Returns:
        The ``pydicom.Dataset``.

    Raises:
        DicomError: the file is unreadable or not DICOM.
    """
    pydicom = require("pydicom")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except pydicom.errors.InvalidDicomError:
        try:  # maybe an old file without the 128-byte preamble
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
        except Exception as e:
            raise DicomError(f"{path}: not a DICOM file: {e}") from None
    except Exception as e:  # truncated files raise anything from EOFError to ValueError
        raise DicomError(f"{path}: cannot be parsed as DICOM: {e}") from None
    # pydicom "parses" garbage after a DICM magic or with force=True into
    # private tags; insist on what every real object (even ACR-NEMA) has.
    meta_class = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    if "SOPClassUID" not in ds and not meta_class and not ("Rows" in ds and "Columns" in ds):
        raise DicomError(f"{path}: not a DICOM object (no SOP Class UID, no image size); corrupt or foreign file")
    return ds


def _lookup(ds, sequence: str, keyword: str):
    """A tag from the top level, else from the enhanced multi-frame functional groups."""
    if keyword in ds:
        return ds[keyword].value
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(groups, [])[:1]:  # shared group, else the first frame
            for sub in item.get(sequence, [])[:1]:
                if keyword in sub:
                    return sub[keyword].value
    return None


def _has_pixels(ds) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _first_int(value) -> int | None:
    """An IS tag as one int (EchoNumbers may hold several values: the first), None when empty."""
    if value is None or value == "":
        return None
    try:
        return int(value[0] if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else value)
    except (TypeError, ValueError, IndexError):
        return None


def _floats(value) -> list[float] | None:
    return None if value is None else [float(v) for v in value]


def header_meta(ds, path: str | Path) -> dict[str, Any]:
    """The metadata tfvision keeps from a dataset (JSON-serialisable).

    >>> meta = header_meta(read_dataset("CT_small.dcm"), "CT_small.dcm")  # doctest: +SKIP

    Args:
        ds: a ``pydicom.Dataset`` (pixel data not needed).
        path: the file it came from.

    Returns:
        A dict: uids, modality, patient id, geometry (``pixel_spacing`` as
        (row, column) mm, ``image_position_patient``, ``image_orientation_patient``),
        frame count and per-frame positions for multi-frame objects.
    """
    frames = int(ds.get("NumberOfFrames") or 1)
    spacing = _lookup(ds, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is None:
        spacing = ds.get("ImagerPixelSpacing")  # projection radiographs (DX/CR)
    per_frame = [
        _floats(item.PlanePositionSequence[0].ImagePositionPatient)
        for item in ds.get("PerFrameFunctionalGroupsSequence", [])
        if "PlanePositionSequence" in item
    ]
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    thickness = _lookup(ds, "PixelMeasuresSequence", "SliceThickness")
    between = ds.get("SpacingBetweenSlices")
    return {
        "path": str(path),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "modality": str(ds.get("Modality", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "series_number": None if ds.get("SeriesNumber") is None else int(ds.SeriesNumber),
        "instance_number": None if ds.get("InstanceNumber") is None else int(ds.InstanceNumber),
        "rows": None if ds.get("Rows") is None else int(ds.Rows),
        "columns": None if ds.get("Columns") is None else int(ds.Columns),
        "number_of_frames": frames,
        "samples_per_pixel": int(ds.get("SamplesPerPixel") or 1),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "pixel_spacing": _floats(spacing),
        "slice_thickness": None if thickness is None else float(thickness),
        "spacing_between_slices": None if between is None else float(between),
        "image_position_patient": _floats(_lookup(ds, "PlanePositionSequence", "ImagePositionPatient")),
        "image_orientation_patient": _floats(
            _lookup(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
        ),
        "frame_positions": per_frame or None,
        "grid_frame_offsets": _floats(ds.get("GridFrameOffsetVector")),
        # What tells two acquisitions at the same positions apart (see series.acquisition_groups).
        **{key: _first_int(ds.get(tag)) for key, tag in ACQUISITION_TAGS.items()},
        **mosaic_meta(ds),
        "transfer_syntax": None if ts is None else f"{ts.name} ({ts})",
        # Header scans stop before the pixels, so image-ness is judged by Rows.
        "is_image": "Rows" in ds or _has_pixels(ds),
    }


def read_header(path: str | Path) -> dict[str, Any]:
    """Header metadata of one file without decoding its pixels.

    >>> read_header("CT_small.dcm")["modality"]  # doctest: +SKIP
    'CT'

    Args:
        path: the file.

    Returns:
        The :func:`header_meta` dict.

    Raises:
        DicomError: the file is unreadable or not DICOM.
    """
    return header_meta(read_dataset(path, pixels=False), path)


def _check_decodable(ds, path) -> None:
    """Fail early, with an install hint, when no handler can decode the syntax."""
    from pydicom.pixels import get_decoder

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        return  # pydicom guesses the encoding of old files; let it try
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        how = "pydicom has no video decoder; decode the stream with PyAV (pip install av)" if ts in _VIDEO else _NO_DECODER
        raise DicomError(f"{path}: transfer syntax {ts.name} ({ts}) is not supported: {how}") from None
    if not decoder.is_available:
        raise DicomError(
            f"{path}: transfer syntax {ts.name} ({ts}) needs a decoder: "
            f"pip install {_HINTS.get(str(ts), 'pylibjpeg')}"
        )


def _rescale(ds, meta: dict, path, warn: bool) -> tuple[float, float]:
    slope = _lookup(ds, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _lookup(ds, "PixelValueTransformationSequence", "RescaleIntercept")
    missing = [n for n, v in (("RescaleSlope", slope), ("RescaleIntercept", intercept)) if v is None]
    meta["rescale_defaulted"] = missing
    if missing and warn:
        # Defaults keep the raw values; warn because for CT they are then not HU.
        log.warning("%s: %s missing; using slope=1, intercept=0 for the absent tag(s)", path, " and ".join(missing))
    return (1.0 if slope is None else float(slope)), (0.0 if intercept is None else float(intercept))


def _frame_rescales(ds, frames: int) -> list[tuple[float, float]] | None:
    """Per-frame (slope, intercept) of an enhanced multi-frame object whose frames differ, else None.

    Pixel Value Transformation is a functional group (PS3.3 C.7.6.16.2.9): shared by all frames or
    given per frame, and per frame it may vary (Philips scales frames of one file differently).
    """
    shared = ds.get("SharedFunctionalGroupsSequence") or [{}]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if "RescaleSlope" in ds or shared[0].get("PixelValueTransformationSequence") or len(per_frame) != frames:
        return None
    pairs = []
    for item in per_frame:
        seq = item.get("PixelValueTransformationSequence")
        if not seq or "RescaleSlope" not in seq[0]:
            return None
        pairs.append((float(seq[0].RescaleSlope), float(seq[0].get("RescaleIntercept", 0.0))))
    return pairs if len(set(pairs)) > 1 else None


def read_dicom(path: str | Path, *, warn_missing_rescale: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM image as float32 real-world values plus its metadata.

    Grey images go through the modality LUT (RescaleSlope/Intercept, or a
    Modality LUT Sequence) exactly as ``pydicom.pixels.apply_modality_lut``;
    an absent slope or intercept defaults to 1 or 0 with a logged warning.
    RT Dose is multiplied by DoseGridScaling, so it comes out in Gy.
    MONOCHROME1 is inverted as ``max + min - x`` so that bright always means
    dense. Colour images come back as RGB without rescaling.

    >>> hu, meta = read_dicom("CT_small.dcm")  # doctest: +SKIP
    >>> hu.shape, meta["rescale_intercept"]  # doctest: +SKIP
    ((128, 128), -1024.0)

    Args:
        path: the file.
        warn_missing_rescale: log the missing-rescale warning (series readers
            turn it off and warn once per series instead).

    Returns:
        ``(array, meta)``: the array is [H, W] for one frame, [frames, H, W]
        for multi-frame files, with a trailing channel axis for colour. Meta
        is :func:`header_meta` plus ``rescale_slope``, ``rescale_intercept``
        (the first frame's; ``frame_rescale`` lists every frame's when they differ),
        ``rescale_defaulted`` (the tags that were absent), ``modality_lut``,
        ``dose_grid_scaling`` (RT Dose, already applied), ``unit`` (``"HU"``
        for CT, ``"Gy"`` or ``"relative"`` for RT Dose, else RescaleType or None),
        ``inverted`` and ``spacing`` (mm per array axis, None where unknown).

    Raises:
        DicomError: unreadable file, no pixel data, unsupported or undecodable
            transfer syntax.
    """
    ds = read_dataset(path)
    meta = header_meta(ds, path)
    if not _has_pixels(ds):
        raise DicomError(f"{path}: no pixel data (modality {meta['modality'] or 'unknown'}); not an image")
    _check_decodable(ds, path)
    try:
        raw = ds.pixel_array
    except Exception as e:  # corrupt streams: the handlers raise Runtime/Value errors
        raise DicomError(f"{path}: cannot decode pixel data ({meta['transfer_syntax']}): {e}") from None
    slope, intercept, lut = 1.0, 0.0, False
    meta["rescale_defaulted"] = []
    if meta["samples_per_pixel"] == 1:
        if ds.get("ModalityLUTSequence"):
            from pydicom.pixels import apply_modality_lut

            arr, lut = apply_modality_lut(raw, ds).astype(np.float64), True
        else:
            # RT Dose has no Rescale tags: DoseGridScaling below is its modality transform.
            dose = meta["modality"] == "RTDOSE"
            slope, intercept = _rescale(ds, meta, path, warn_missing_rescale and not dose)
            meta["rescale_defaulted"] = [] if dose else meta["rescale_defaulted"]
            pairs = None if dose else _frame_rescales(ds, meta["number_of_frames"])
            if pairs:  # each frame through its own transform
                slopes, intercepts = np.asarray(pairs).T[:, :, None, None]
                meta["frame_rescale"] = pairs
            else:
                slopes, intercepts = slope, intercept
            # Same arithmetic as apply_modality_lut: float64, multiply, then add.
            arr = raw.astype(np.float64) * slopes + intercepts
    else:
        arr = raw.astype(np.float64)
    meta["inverted"] = meta["photometric_interpretation"] == "MONOCHROME1"
    if meta["inverted"]:
        arr = arr.max() + arr.min() - arr
    meta["unit"] = "HU" if meta["modality"] == "CT" else (str(ds.get("RescaleType", "")) or None)
    scaling = ds.get("DoseGridScaling") if meta["modality"] == "RTDOSE" else None
    if scaling is not None:
        # RT Dose stores integers; DoseGridScaling (PS3.3 C.8.8.3.1) turns them into dose.
        arr = arr * float(scaling)
        meta["unit"] = "Gy" if str(ds.get("DoseUnits", "")).upper() == "GY" else "relative"
    meta.update(rescale_slope=slope, rescale_intercept=intercept, modality_lut=lut,
                dose_grid_scaling=None if scaling is None else float(scaling))
    plane = meta["pixel_spacing"] or [None, None]
    offsets = meta["grid_frame_offsets"] or []
    step = abs(offsets[1] - offsets[0]) if len(offsets) > 1 else None  # RTDOSE grids
    step = step or meta["spacing_between_slices"] or meta["slice_thickness"]
    meta["spacing"] = ([step] if meta["number_of_frames"] > 1 else []) + list(plane)
    return arr.astype(np.float32), meta
