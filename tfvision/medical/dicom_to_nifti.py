"""Convert every DICOM image series under a directory to NIfTI.

    python -m tfvision.medical.dicom_to_nifti IN_DIR OUT_DIR [--workers N] [--uneven split|resample]
        [--tilt keep|resample]

Writes ``OUT_DIR/<PatientID>/<SeriesInstanceUID>.nii.gz`` plus a ``.json``
with the kept metadata, and ``OUT_DIR/conversion_report.json``. Headers are
scanned and series converted in worker processes, one task per study; a
series that fails is reported and never stops the others. Exit status is 0
when at least one series converted, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tfvision.errors import UserError
from tfvision.fileio import atomic_path, claim_dir, safe_name, write_text
from tfvision.medical.batch import map_tasks
from tfvision.medical.dicom import read_header, require
from tfvision.medical.series import (
    DicomScan,
    acquisition_groups,
    find_dicom_files,
    load_series,
    load_series_runs,
    orientation_groups,
    scan_dicom,
)
from tfvision.medical.spacing import UNEVEN_MODES
from tfvision.medical.tilt import TILT_MODES, resample_tilt

_SCAN_CHUNK = 256  # files per header-scan task: big enough to amortise process hops
REPORT = "conversion_report.json"  # written last; marks a folder a conversion made
_KEEP = ("series_instance_uid", "study_instance_uid", "frame_of_reference_uid", "patient_id", "modality",
         "series_number", "spacing", "shape", "axes", "image_orientation_patient", "image_position_patient",
         "rescale", "unit", "slice_positions", "source_positions", "gaps", "run", "acquisition", "sheared", "tilt_shift_voxels", "mosaic", "warnings", "files")
# File-name suffix of each acquisition that repeats a series' slice positions (see acquisition_groups).
_SUFFIX = {"EchoNumbers": "echo", "TemporalPositionIdentifier": "time", "AcquisitionNumber": "acq"}


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def nifti_image(nib, volume: np.ndarray, affine: np.ndarray, sheared: bool):
    """A NIfTI image whose every transform with a code above 0 is the exact `affine`.

    A qform is a rotation, so it cannot hold the shear of a gantry-tilted series:
    nibabel would store the nearest orthogonal matrix, which misplaced voxels by
    42 mm on a real tilted CT, and NIfTI readers may use either transform (ITK and
    SimpleITK prefer the qform). A sheared affine is therefore written as the sform
    alone, with ``qform_code`` 0 (pixdim still holds the voxel sizes).

    >>> nifti_image(nibabel, vol, meta["affine"], meta["sheared"]).header["qform_code"]  # doctest: +SKIP
    array(0, dtype=int16)

    Args:
        nib: the nibabel module.
        volume: ``[X, Y, Z]`` data.
        affine: voxel -> RAS (scanner) affine.
        sheared: True when the slice step is not along the plane normal.

    Returns:
        A ``nibabel.Nifti1Image`` with ``sform_code`` 1 (scanner) and ``qform_code``
        1, or 0 when `sheared`.
    """
    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code=1)  # 1 = scanner coordinates
    image.set_qform(affine, code=0 if sheared else 1)
    return image


def convert_series(files: list[str], out_dir: str | Path, uneven: str = "split",
                   tolerance: float = 0.01, tilt: str = "keep") -> dict[str, Any]:
    """Convert one series; return a result record instead of raising.

    Evenly spaced series give ``<SeriesInstanceUID>.nii.gz``. Uneven ones (a gap
    off the median by more than `tolerance`) are never written with a mean step:
    ``uneven="split"`` writes each evenly spaced run as ``<uid>_run<n>.nii.gz``,
    ``"resample"`` interpolates (linearly) onto an even grid; ``gaps`` reports
    the gaps either way. Slices in different orientations (a localizer, a
    radial series) are never stacked: each orientation is ``<uid>_orient<n>``.
    Acquisitions that repeat the slice positions (echoes, time points, a repeated
    scan) are separate 3D files, ``<uid>_echo<n>``, ``_time<n>`` or ``_acq<n>``
    (see :func:`~tfvision.medical.series.acquisition_groups`), not one 4D file:
    every tfvision consumer (slicing, volume inference, RTSTRUCT labels) reads 3D.
    A gantry-tilted (sheared) series is written exactly, sform only, with
    ``tilt="keep"``, or resampled onto an orthogonal grid with ``"resample"``
    (see :func:`~tfvision.medical.tilt.resample_tilt`).

    >>> convert_series(["CT/1.dcm", "CT/2.dcm"], "out")["status"]  # doctest: +SKIP
    'ok'

    Args:
        files: the files of one series.
        out_dir: output root.
        uneven: ``"split"`` or ``"resample"``.
        tolerance: allowed deviation of a gap from the median gap (fraction).
        tilt: ``"keep"`` or ``"resample"``.

    Returns:
        ``{"status": "ok"|"failed", "series_instance_uid", "output" (the first
        file), "outputs", "split_by" (the acquisition tags that split it), "gaps",
        "unit" | "error", "warnings"}``.
    """
    try:
        # Non-parallel planes (localizers, radial MR) are never stacked: each orientation is its own volume.
        groups = orientation_groups([read_header(f) for f in files])
        parts, split_by = [], set()
        for g, group in enumerate(groups):
            for acquisition, headers in acquisition_groups(group):
                paths = [h["path"] for h in headers]
                runs = load_series_runs(paths, tolerance=tolerance) if uneven == "split" else [
                    load_series(paths, uneven=uneven, tolerance=tolerance)]
                tag = "" if acquisition is None else f"_{_SUFFIX[acquisition['tag']]}{acquisition['value']}"
                if acquisition is not None:
                    split_by.add(acquisition["tag"])
                    for _, meta in runs:
                        meta["acquisition"] = acquisition
                        meta["warnings"].append(f"slice positions repeat: split by {acquisition['tag']}, "
                                                f"this is {acquisition['tag']} {acquisition['value']}")
                parts += [(volume, meta, (f"_orient{g}" if len(groups) > 1 else "") + tag
                           + (f"_run{meta['run']}" if len(runs) > 1 else "")) for volume, meta in runs]
        outputs = []
        for volume, meta, suffix in parts:
            if tilt == "resample":
                volume, meta = resample_tilt(volume, meta)
            uid = meta["series_instance_uid"]
            name = safe_name(uid) + suffix
            target = Path(out_dir) / safe_name(meta["patient_id"]) / f"{name}.nii.gz"
            _write_volume(volume, meta, target)
            outputs.append(str(target))
        return {"status": "ok", "series_instance_uid": uid, "output": outputs[0], "outputs": outputs,
                "split_by": sorted(split_by), "gaps": meta["gaps"], "unit": meta["unit"], "warnings": meta["warnings"]}
    except Exception as e:  # one bad series must not stop the batch
        return {"status": "failed", "series_instance_uid": None, "files": len(files),
                "first_file": str(files[0]) if files else None, "error": f"{type(e).__name__}: {e}"}


def _write_volume(volume: np.ndarray, meta: dict, target: Path) -> None:
    """Write one volume and its JSON sidecar (atomically)."""
    nib = require("nibabel")
    # CT HU are integers: int16 halves the disk space (a lesson of 160 GB datasets).
    if np.array_equal(volume, np.round(volume)) and -32768 <= volume.min() and volume.max() <= 32767:
        volume = volume.astype(np.int16)
    image = nifti_image(nib, volume, meta["affine"], meta["sheared"])
    with atomic_path(target, suffix=".nii.gz") as tmp:  # nibabel gzips by the name's ending
        nib.save(image, tmp)
    kept = {k: meta.get(k) for k in _KEEP} | {"affine": meta["affine"], "dtype": str(volume.dtype)}
    text = json.dumps(kept, indent=1, default=_jsonable)
    write_text(target.with_name(target.name[:-7] + ".json"), text)


def convert_study(series: dict[str, list[str]], out_dir: str, uneven: str = "split",
                  tolerance: float = 0.01, tilt: str = "keep") -> list[dict[str, Any]]:
    """Convert the series of one study (one worker task)."""
    results = []
    for uid, files in series.items():
        result = convert_series(files, out_dir, uneven, tolerance, tilt)
        result["series_instance_uid"] = result["series_instance_uid"] or uid
        results.append(result)
    return results


def convert(in_dir: str | Path, out_dir: str | Path, workers: int = 1, progress: bool = True,
            uneven: str = "split", tolerance: float = 0.01, tilt: str = "keep") -> dict[str, Any]:
    """Convert all series under `in_dir`; see the module docstring.

    >>> report = convert("LUNG1", "nifti", workers=4)  # doctest: +SKIP
    >>> len(report["converted"]), report["failed"]  # doctest: +SKIP

    Args:
        in_dir: DICOM root (searched recursively).
        out_dir: output root.
        workers: processes; 1 converts in this process.
        progress: show tqdm bars on stderr.
        uneven, tolerance, tilt: see :func:`convert_series`.

    Returns:
        ``{"converted": [...], "failed": [...], "unreadable": [(path, reason)],
        "non_image": count}``; also written to ``out_dir/conversion_report.json``.
    """
    # The report is written first as "running": it marks out_dir as a conversion's own, so a
    # killed run can be rerun into the same folder; the final report replaces it.
    write_text(Path(out_dir) / REPORT, json.dumps({"status": "running"}) + "\n")
    files = [str(p) for p in find_dicom_files(in_dir)]
    chunks = [(files[i : i + _SCAN_CHUNK],) for i in range(0, len(files), _SCAN_CHUNK)]
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        scan = DicomScan()
        for chunk, result in map_tasks(pool, scan_dicom, chunks, progress, "scanning"):
            scan.merge(result if isinstance(result, DicomScan) else
                       DicomScan(failed=[(f, f"scan failed: {result}") for f in chunk[0]]))
        studies: dict[str, dict[str, list[str]]] = {}
        for uid, headers in scan.series.items():
            studies.setdefault(headers[0]["study_instance_uid"], {})[uid] = [h["path"] for h in headers]
        tasks = [(series, str(out_dir), uneven, tolerance, tilt) for series in studies.values()]
        results = []
        for (series, *_), result in map_tasks(pool, convert_study, tasks, progress, "converting"):
            results += result if isinstance(result, list) else [
                {"status": "failed", "series_instance_uid": uid, "error": f"worker failed: {result!r}"}
                for uid in series]
    finally:
        if pool is not None:
            pool.shutdown()
    report = {
        "status": "finished",
        "converted": [r for r in results if r["status"] == "ok"],
        "failed": [r for r in results if r["status"] != "ok"],
        "unreadable": scan.failed,
        "non_image": len(scan.non_image),
    }
    text = json.dumps(report, indent=1, default=_jsonable)
    write_text(Path(out_dir) / REPORT, text)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfvision.medical.dicom_to_nifti", description=__doc__.split("\n")[0])
    parser.add_argument("in_dir", type=Path, help="DICOM root, searched recursively (only read)")
    parser.add_argument("out_dir", type=Path, help="where the .nii.gz and .json files go: a new or empty folder, "
                        "or one an earlier conversion wrote (it holds conversion_report.json)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--uneven", choices=UNEVEN_MODES, default="split",
                        help="a series with uneven slice spacing: write each evenly spaced run as its own file "
                        "(split, the default) or interpolate linearly onto an even grid (resample)")
    parser.add_argument("--uneven-tolerance", type=float, default=0.01,
                        help="a gap off the median gap by more than this fraction is uneven (default 0.01)")
    parser.add_argument("--tilt", choices=TILT_MODES, default="keep",
                        help="a gantry-tilted (sheared) series: write it exactly, sform only with qform_code 0 (keep, "
                        "the default), or interpolate linearly onto an orthogonal grid like dcm2niix's _Tilt (resample)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from tfvision.cli import run_command

    return run_command(run, parse_args, argv)


def run(args: argparse.Namespace) -> int:
    from tfvision.fileio import check_output_outside

    if not args.in_dir.is_dir():
        raise UserError(f"{args.in_dir} is not a directory")
    check_output_outside(args.out_dir, [args.in_dir], "out_dir")
    claim_dir(args.out_dir, REPORT, f"out_dir: {args.out_dir} holds files that no conversion wrote (no {REPORT}); "
              f"give a new or empty folder")
    report = convert(args.in_dir, args.out_dir, workers=max(1, args.workers), progress=not args.no_progress,
                     uneven=args.uneven, tolerance=args.uneven_tolerance, tilt=args.tilt)
    ok, failed, bad = report["converted"], report["failed"], report["unreadable"]
    print(f"converted {len(ok)} series, {len(failed)} failed, {len(bad)} unreadable file(s), "
          f"{report['non_image']} non-image object(s) skipped")
    for r in ok:
        for w in r["warnings"]:
            print(f"WARNING {r['series_instance_uid']}: {w}")
    for r in failed:
        print(f"FAILED series {r['series_instance_uid']}: {r['error']}")
    for path, reason in bad:
        print(f"UNREADABLE {path}: {reason.removeprefix(f'{path}: ')}")
    if not ok:
        raise UserError(f"in_dir: no series could be converted from {args.in_dir} ({len(failed)} failed, "
                        f"{len(bad)} unreadable file(s)); see {args.out_dir / REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
