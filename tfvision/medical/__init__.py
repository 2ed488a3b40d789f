"""Medical-imaging I/O: DICOM, series to volumes, RTSTRUCT masks, HU windowing.

Pure numpy + pydicom + nibabel (no TensorFlow), so data preparation runs in
plain worker processes. pydicom is imported on first use. The converter is
``python -m tfvision.medical.dicom_to_nifti`` (not imported here, so that
``-m`` runs it cleanly).
"""

from tfvision.medical.dicom import DicomError, read_dicom, read_header
from tfvision.medical.rtstruct import (
    match_structures,
    normalize_name,
    rasterize_rtstruct,
    read_rtstruct,
    rtstruct_to_labels,
)
from tfvision.medical.series import load_series, scan_dicom, series_geometry
from tfvision.medical.windowing import PRESETS, crop_uniform_borders, window, zscore

__all__ = [
    "PRESETS",
    "DicomError",
    "crop_uniform_borders",
    "load_series",
    "match_structures",
    "normalize_name",
    "rasterize_rtstruct",
    "read_dicom",
    "read_header",
    "read_rtstruct",
    "rtstruct_to_labels",
    "scan_dicom",
    "series_geometry",
    "window",
    "zscore",
]
