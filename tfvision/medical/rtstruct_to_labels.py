"""Paint RTSTRUCT contours into NIfTI label volumes on the exact grid of their image series.

    python -m tfvision.medical.rtstruct_to_labels --rtstruct RS.dcm --series CT_DIR --map names.json \\
        --output labels.nii.gz
    python -m tfvision.medical.rtstruct_to_labels --patients IN_DIR --map names.json --output OUT_DIR [--workers N]

``names.json`` maps each label to the structure names that mean it, e.g.
``{"GTV": ["gtv*"], "Lung": ["lung*", "poumon*"]}``: labels are numbered 1, 2, ...
in that order, and names are compared as :func:`~tfvision.medical.rtstruct.match_structures`
does. The label volume has the image series' shape and affine (the same file
``dicom_to_nifti`` writes for the series), and a JSON report beside it lists
the label numbers, which ROI names went to each label, the missing labels, the
unmatched names and the contours that could not be drawn.

With ``--patients``, every RTSTRUCT under each first-level folder (a patient) is
painted onto the series it references in that same folder, in worker processes;
one that fails is reported and never stops the others. Output goes to
``OUT_DIR/<patient>/<RTSTRUCT file name>.nii.gz`` plus ``OUT_DIR/labels_report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tfvision.errors import UserError
from tfvision.fileio import (
    check_output_outside,
    check_replaceable,
    claim_dir,
    owned_output,
    safe_name,
    write_json,
    write_text,
)
from tfvision.medical.batch import map_tasks
from tfvision.medical.dicom import require
from tfvision.medical.dicom_to_nifti import nifti_image
from tfvision.medical.rtstruct import rtstruct_to_labels
from tfvision.medical.series import find_dicom_files, scan_dicom

REPORT = "labels_report.json"  # written by --patients runs; marks OUT_DIR as one of ours


def read_name_map(path: str | Path) -> dict[str, list[str]]:
    """Load and check a ``{"label": ["variant", ...]}`` JSON name map.

    >>> read_name_map("names.json")  # doctest: +SKIP
    {'GTV': ['gtv*'], 'Lung': ['lung*']}

    Args:
        path: the JSON file.

    Returns:
        Label name -> list of name variants, in file order (the label numbers).

    Raises:
        UserError: unreadable file, not JSON, or not an object of string lists.
    """
    try:
        name_map = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--map: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"--map: {path} is not JSON: {e}") from None
    if not (isinstance(name_map, dict) and name_map and all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in name_map.values())):
        raise UserError(f'--map: {path} must be a JSON object of label -> list of names, e.g. {{"GTV": ["gtv*"]}}')
    return name_map


def label_series(rtstruct: str | Path, series: str | Path, name_map: dict[str, list[str]],
                 output: str | Path, flag: str = "--output") -> dict[str, Any]:
    """Write the label volume of one RTSTRUCT and its JSON report; return the report.

    >>> label_series("RS.dcm", "CT", {"GTV": ["gtv*"]}, "gtv.nii.gz")["missing"]  # doctest: +SKIP
    []

    Args:
        rtstruct: the RTSTRUCT file.
        series: folder searched for the image series it references.
        name_map: label -> name variants (see :func:`read_name_map`).
        output: the ``.nii.gz`` to write; the report goes to the same name with ``.json``.
        flag: the option named when `output` is a file tfvision did not write.

    Returns:
        The report: ``labels`` (name -> value), ``matched``, ``missing``,
        ``unmatched``, ``ambiguous``, ``empty``, ``voxels``, ``warnings``, the
        grid's ``series_instance_uid``, ``shape`` and ``affine``, and the paths.

    Raises:
        DataError: the referenced series is not under `series`, or is inconsistent.
        UserError: `output` exists and tfvision did not write it.
    """
    nib = require("nibabel")
    volume, report = rtstruct_to_labels(rtstruct, series, name_map)
    output = Path(output)
    report.update(rtstruct=str(rtstruct), series=str(series), output=str(output), shape=list(volume.shape))
    side = output.with_name(output.name.removesuffix(".gz").removesuffix(".nii") + ".json")
    check_replaceable(side, flag)  # before the volume, so a refusal leaves no half pair
    with owned_output(output, flag, suffix=".nii.gz" if output.name.endswith(".gz") else ".nii") as tmp:
        nib.save(nifti_image(nib, volume, report["affine"], report["sheared"]), tmp)
    with owned_output(side, flag, suffix=".json") as tmp:
        write_json(tmp, report)
    return report


def _patient_rtstructs(root: Path) -> list[tuple[str, str]]:
    """(RTSTRUCT path, patient folder) for every RTSTRUCT under a first-level folder of `root`."""
    found = []
    for patient in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        scan = scan_dicom(find_dicom_files(patient))
        found += [(m["path"], str(patient)) for m in scan.non_image if m["modality"] == "RTSTRUCT"]
    return found


def _label_one(rtstruct: str, patient: str, name_map: dict, out_dir: str) -> dict[str, Any]:
    """One worker task: never raises, so one bad patient cannot stop the batch."""
    target = Path(out_dir) / safe_name(Path(patient).name) / f"{safe_name(Path(rtstruct).stem)}.nii.gz"
    try:
        report = label_series(rtstruct, patient, name_map, target)
        return {"status": "ok", "rtstruct": rtstruct, "output": str(target), "missing": report["missing"],
                "unmatched": report["unmatched"], "warnings": report["warnings"]}
    except Exception as e:
        return {"status": "failed", "rtstruct": rtstruct, "error": f"{type(e).__name__}: {e}"}


def label_patients(in_dir: str | Path, name_map: dict, out_dir: str | Path, workers: int = 1,
                   progress: bool = True) -> dict[str, Any]:
    """Label every RTSTRUCT of every patient folder under `in_dir`; see the module docstring.

    >>> label_patients("NSCLC", {"GTV": ["gtv*"]}, "labels", workers=4)["failed"]  # doctest: +SKIP
    []

    Args:
        in_dir: one folder per patient, each holding RTSTRUCTs and their image series.
        name_map: label -> name variants.
        out_dir: output root (new, empty or an earlier run's).
        workers: processes; 1 runs in this process.
        progress: show a tqdm bar on stderr.

    Returns:
        ``{"status", "labelled": [...], "failed": [...]}``, also written to
        ``out_dir/labels_report.json``.
    """
    out_dir = Path(out_dir)
    # Written first as "running", so a killed run's folder is still recognised as ours.
    write_text(out_dir / REPORT, json.dumps({"status": "running"}) + "\n")
    tasks = [(rs, patient, name_map, str(out_dir)) for rs, patient in _patient_rtstructs(Path(in_dir))]
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(tasks) > 1 else None
    try:
        results = [r if isinstance(r, dict) else {"status": "failed", "rtstruct": task[0],
                                                   "error": f"worker failed: {r!r}"}
                   for task, r in map_tasks(pool, _label_one, tasks, progress, "labelling")]
    finally:
        if pool is not None:
            pool.shutdown()
    results.sort(key=lambda r: r["rtstruct"])
    report = {"status": "finished", "labels": {name: k for k, name in enumerate(name_map, 1)},
              "labelled": [r for r in results if r["status"] == "ok"],
              "failed": [r for r in results if r["status"] != "ok"]}
    write_text(out_dir / REPORT, json.dumps(report, indent=1) + "\n")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfvision.medical.rtstruct_to_labels",
                                     description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--rtstruct", type=Path, help="one RTSTRUCT file (with --series)")
    source.add_argument("--patients", type=Path, help="a folder of patient folders, each with RTSTRUCTs and series")
    parser.add_argument("--series", type=Path, help="folder holding the image series the RTSTRUCT references")
    parser.add_argument("--map", type=Path, required=True, help='JSON {"label": ["name variant", ...]}')
    parser.add_argument("--output", type=Path, required=True,
                        help="the label .nii.gz (--rtstruct), or the output folder (--patients)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    name_map = read_name_map(args.map)
    if args.patients is not None:
        if not args.patients.is_dir():
            raise UserError(f"--patients: {args.patients} is not a directory")
        check_output_outside(args.output, [args.patients], "--output")
        claim_dir(args.output, REPORT, f"--output: {args.output} holds files that no labelling run wrote "
                  f"(no {REPORT}); give a new or empty folder")
        report = label_patients(args.patients, name_map, args.output, max(1, args.workers), not args.no_progress)
        ok, failed = report["labelled"], report["failed"]
        print(f"labelled {len(ok)} RTSTRUCT(s), {len(failed)} failed")
        for r in failed:
            print(f"FAILED {r['rtstruct']}: {r['error']}")
        if not ok:
            raise UserError(f"--patients: no RTSTRUCT could be labelled under {args.patients}; "
                            f"see {args.output / REPORT}")
        return 0
    if args.series is None:
        raise UserError("--series: required with --rtstruct (the folder holding the referenced image series)")
    if not args.rtstruct.is_file():
        raise UserError(f"--rtstruct: {args.rtstruct} is not a file")
    if not args.series.is_dir():
        raise UserError(f"--series: {args.series} is not a directory")
    if not args.output.name.endswith((".nii.gz", ".nii")):
        raise UserError(f"--output: {args.output} must end in .nii.gz or .nii")
    check_output_outside(args.output, [args.series, args.rtstruct.parent], "--output")
    report = label_series(args.rtstruct, args.series, name_map, args.output)
    print(f"wrote {args.output} {tuple(report['shape'])}: " + ", ".join(
        f"{name}={value} ({report['voxels'][name]} voxels)" for name, value in report["labels"].items()))
    for key in ("missing", "unmatched", "empty"):
        if report[key]:
            print(f"{key}: {', '.join(report[key])}")
    for w in report["warnings"]:
        print(f"WARNING {w}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from tfvision.cli import run_command

    return run_command(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
