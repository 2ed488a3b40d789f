"""DICOM -> NIfTI geometry on the scanner cases where converters go wrong (issue 13).

Real DICOM only: pydicom's bundled series (``dicomdirtests``, ``rtdose.dcm``) and
nibabel's test files, some with only their geometry tags rewritten. The oracle
is the geometry the tags define (PS3.3 C.7.6.2.1.1): voxel (column i, row j) of
a slice lies at IPP + i * dc * row_cosines + j * dr * column_cosines (LPS mm).
Each file is also compared with dcm2niix and SimpleITK (GDCM) where they are
installed (the ``test`` extra): the 8 corner voxels of each tool's output are
matched to the tag corners as a set, so the tools' different axis flips do not
matter. ``corner_errors`` collects the errors for the report table (``-s``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402

from tfvision.errors import DataError  # noqa: E402
from tfvision.medical.dicom_to_nifti import convert_series  # noqa: E402
from tfvision.medical.rtstruct_to_labels import main as labels_main  # noqa: E402
from tfvision.medical.series import load_series  # noqa: E402

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
DICOMDIR = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
corner_errors: dict[tuple[str, str], float] = {}  # (case, tool) -> max corner error, mm


def data(name: str) -> str:
    path = get_testdata_file(name, download=False)  # never the network
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return path


def series_dir(name: str) -> Path:
    folder = DICOMDIR / name
    if not folder.is_dir():
        pytest.skip(f"pydicom test series {name} not bundled")
    return folder


# ------------------------------------------------------------------ oracles


def tag_corners(datasets) -> np.ndarray:
    """[8, 3] RAS corners of the slices' own geometry: first and last slice along the normal."""
    def world(ds, i, j):
        iop = np.asarray(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        return (np.asarray(ds.ImagePositionPatient, float) + i * dc * iop[:3] + j * dr * iop[3:]) * LPS_TO_RAS

    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    ordered = sorted(datasets, key=lambda ds: normal @ np.asarray(ds.ImagePositionPatient, float))
    return np.array([world(ds, i, j) for ds in (ordered[0], ordered[-1])
                     for i in (0, ds.Columns - 1) for j in (0, ds.Rows - 1)])


def affine_corners(affine, shape) -> np.ndarray:
    ijk = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (ijk @ np.asarray(affine, float).T)[:, :3]


def corner_error(expected: np.ndarray, got: np.ndarray) -> float:
    """Largest distance (mm) from an expected corner to the nearest corner of `got`."""
    return float(np.linalg.norm(expected[:, None] - got[None], axis=-1).min(axis=1).max())


def nifti_transforms(path) -> dict[str, np.ndarray]:
    """Every transform a NIfTI reader may use: the qform and sform whose code is above 0."""
    header = nib.load(path).header
    out = {}
    if header["qform_code"] > 0:
        out["qform"] = header.get_qform()
    if header["sform_code"] > 0:
        out["sform"] = header.get_sform()
    return out


def sitk_corners(image) -> np.ndarray:
    """[8, 3] RAS corners of a SimpleITK image (ITK works in LPS)."""
    size = image.GetSize()
    idx = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    return np.array([image.TransformIndexToPhysicalPoint(p) for p in idx]) * LPS_TO_RAS


def record(case: str, tool: str, error: float) -> float:
    corner_errors[(case, tool)] = round(error, 3)
    print(f"corner error | {case} | {tool} | {error:.3f} mm")
    return error


def sitk_dicom_error(case: str, folder: Path, expected: np.ndarray) -> float | None:
    """SimpleITK (GDCM) reading the DICOM series itself."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return record(case, "SimpleITK (DICOM)", corner_error(expected, sitk_corners(reader.Execute())))


def sitk_nifti_error(case: str, path: Path, expected: np.ndarray) -> float | None:
    """SimpleITK reading tfvision's NIfTI: it prefers the qform when its code is above 0."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:  # ITK refuses some non-orthogonal sforms outright
        print(f"SimpleITK cannot read {path.name}: {str(e).splitlines()[-1]}")
        return None
    return record(case, "SimpleITK (tfvision NIfTI)", corner_error(expected, sitk_corners(image)))


def dcm2niix(folder: Path, out: Path, *flags: str) -> list[Path]:
    """Run dcm2niix (the binary of its PyPI wheel) into `out`; the .nii files it wrote."""
    exe = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))
    if exe is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "n", "-b", "n", *flags, "-f", "%s_%z", "-o", str(out), str(folder)],
                   capture_output=True, text=True, timeout=60, check=True)
    return sorted(out.glob("*.nii"))


def tfvision_error(case: str, files, out: Path, expected: np.ndarray) -> tuple[float, Path]:
    """Convert with tfvision; every transform with a code above 0 must give the tag corners."""
    result = convert_series([str(f) for f in files], out)
    assert result["status"] == "ok", result
    path = Path(result["output"])
    shape = nib.load(path).shape
    errors = {name: corner_error(expected, affine_corners(a, shape)) for name, a in nifti_transforms(path).items()}
    assert errors, "no transform with a code above 0"
    record(case, "tfvision", max(errors.values()))
    return max(errors.values()), path


def read_series(folder: Path):
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir()) if f.name != "DICOMDIR"]


# ------------------------------------------------------------- gantry tilt


def write_tilted(src: Path, dst: Path, degrees: float) -> list:
    """The slices of a real CT with ImagePositionPatient rewritten to a gantry tilt.

    Slices stay axial, but each one moves along y by its z step times tan(tilt),
    as on a scanner whose gantry leans while the table moves; GantryDetectorTilt
    is set to match. Pixels and every other tag are the scanner's.
    """
    dst.mkdir(parents=True, exist_ok=True)
    datasets = read_series(src)
    z0 = min(float(ds.ImagePositionPatient[2]) for ds in datasets)
    for ds in datasets:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - z0) * np.tan(np.deg2rad(degrees)), z]
        ds.GantryDetectorTilt = degrees
        ds.save_as(dst / f"{ds.InstanceNumber:04d}.dcm")
    return datasets


def test_gantry_tilt_is_written_as_sform_only(tmp_path):
    datasets = write_tilted(series_dir("98892001/CT5N"), tmp_path / "tilt", 20.0)
    expected = tag_corners(datasets)
    error, path = tfvision_error("CT gantry tilt 20 deg", sorted((tmp_path / "tilt").iterdir()), tmp_path / "out",
                                 expected)
    assert error < 1e-3
    header = nib.load(path).header
    assert header["qform_code"] == 0 and header["sform_code"] == 1
    # The qform nibabel would have written (its nearest rotation) misplaces the corners: why code 0.
    qform_error = corner_error(expected, affine_corners(header.get_qform(), nib.load(path).shape))
    assert qform_error > 0.5
    np.testing.assert_allclose(header.get_zooms(), np.linalg.norm(header.get_sform()[:3, :3], axis=0), rtol=1e-6)
    vol, meta = load_series(tmp_path / "tilt")
    assert meta["sheared"] and any("qform_code 0" in w for w in meta["warnings"])
    # Pixels are untouched by the geometry: slice k is the k-th file along the normal.
    first = min(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj)[:, :, 0],
                                  (first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)).T)
    sitk_nifti_error("CT gantry tilt 20 deg", path, expected)
    sitk_dicom_error("CT gantry tilt 20 deg", tmp_path / "tilt", expected)
    for nii in dcm2niix(tmp_path / "tilt", tmp_path / "dcm2niix"):
        # dcm2niix writes the sheared input on an orthogonal grid (and a resampled _Tilt copy).
        img = nib.load(nii)
        record("CT gantry tilt 20 deg", f"dcm2niix {nii.stem.split('_', 1)[-1]}".strip(),
               corner_error(expected, affine_corners(img.affine, img.shape)))


def test_untilted_real_ct_keeps_its_qform(tmp_path):
    folder = series_dir("98892001/CT5N")
    expected = tag_corners(read_series(folder))
    error, path = tfvision_error("CT axial", sorted(folder.iterdir()), tmp_path / "out", expected)
    assert error < 1e-3 and nib.load(path).header["qform_code"] == 1
    sitk_nifti_error("CT axial", path, expected)
    sitk_dicom_error("CT axial", folder, expected)
    for nii in dcm2niix(folder, tmp_path / "dcm2niix"):
        img = nib.load(nii)
        assert record("CT axial", "dcm2niix", corner_error(expected, affine_corners(img.affine, img.shape))) < 1e-2


# ----------------------------------------------------------------- RT Dose


def dose_corners(ds) -> np.ndarray:
    """[8, 3] RAS corners of an RT Dose grid: frame k lies GridFrameOffsetVector[k] along the normal."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    offsets = np.asarray(ds.GridFrameOffsetVector, float)
    offsets = offsets - offsets[0]  # PS3.3 C.8.8.3.2: relative, or absolute z when offsets[0] == IPP z
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.asarray(ds.ImagePositionPatient, float)
    return np.array([(ipp + o * normal + i * dc * iop[:3] + j * dr * iop[3:]) * LPS_TO_RAS
                     for o in (offsets[0], offsets[-1]) for i in (0, ds.Columns - 1) for j in (0, ds.Rows - 1)])


@pytest.mark.parametrize("units, absolute", [("RELATIVE", False), ("GY", True)])
def test_rt_dose_is_scaled_and_placed_by_grid_offsets(tmp_path, units, absolute):
    ds = pydicom.dcmread(data("rtdose.dcm"))
    ds.DoseUnits = units
    if absolute:  # the same grid with GridFrameOffsetVector as absolute z (first element == IPP z)
        z0 = float(ds.ImagePositionPatient[2])
        ds.GridFrameOffsetVector = [z0 + float(o) for o in ds.GridFrameOffsetVector]
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "rtdose.dcm")
    case = f"RT Dose ({'absolute' if absolute else 'relative'} offsets)"
    expected = dose_corners(ds)
    error, path = tfvision_error(case, [tmp_path / "in" / "rtdose.dcm"], tmp_path / "out", expected)
    assert error < 1e-3
    dose = np.asarray(nib.load(path).dataobj)
    scaling = float(ds.DoseGridScaling)  # 1e-6: raw values are ~1e6 times the dose
    np.testing.assert_allclose(dose[:, :, 4], ds.pixel_array[4].T * scaling, rtol=1e-6)
    side = path.with_name(path.name.replace(".nii.gz", ".json")).read_text()
    assert f'"unit": "{"Gy" if units == "GY" else "relative"}"' in side
    sitk_nifti_error(case, path, expected)
    try:
        import SimpleITK as sitk
    except ImportError:
        sitk = None
    if sitk is not None:
        image = sitk.ReadImage(str(tmp_path / "in" / "rtdose.dcm"))
        record(case, "SimpleITK (DICOM)", corner_error(expected, sitk_corners(image)))
    for nii in dcm2niix(tmp_path / "in", tmp_path / "dcm2niix"):
        # dcm2niix ignores GridFrameOffsetVector, so its frame spacing is not the grid's: recorded,
        # not asserted; the tag geometry above is the oracle.
        img = nib.load(nii)
        record(case, "dcm2niix", corner_error(expected, affine_corners(img.affine, img.shape)))


# ------------------------------------------- RTSTRUCT labels on the exact grid


def write_rtstruct_case(folder: Path) -> list:
    """pydicom's real rtstruct.dcm beside a real CT whose geometry tags are rewritten to hold it.

    The RTSTRUCT outlines x in [-200, 200], y in [-150, 150] mm on z = -200, -190,
    -180 mm. The 16x16 CT gets 30 mm pixels from -245 mm (no voxel centre on an
    edge) and slices at z = -210 ... -170 mm, and the series UIDs the RTSTRUCT names.
    """
    rs = pydicom.dcmread(data("rtstruct.dcm"), force=True)
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    series_uid = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
    (folder / "ct").mkdir(parents=True)
    datasets = read_series(series_dir("98892001/CT5N"))
    for k, ds in enumerate(sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))):
        ds.ImagePositionPatient, ds.PixelSpacing = [-245.0, -245.0, -210.0 + 10 * k], [30.0, 30.0]
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series_uid, frame.FrameOfReferenceUID
        ds.save_as(folder / "ct" / f"{k}.dcm")
    (folder / "rs").mkdir()
    rs.save_as(folder / "rs" / "rtstruct.dcm")
    return datasets


def inside_body(datasets) -> np.ndarray:
    """[X, Y, Z] oracle from the tags: voxel centres inside the RTSTRUCT's rectangles."""
    ordered = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    mask = np.zeros((ordered[0].Columns, ordered[0].Rows, len(ordered)), bool)
    for k, ds in enumerate(ordered):
        x0, y0, z = (float(v) for v in ds.ImagePositionPatient)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        x, y = x0 + dc * np.arange(ds.Columns), y0 + dr * np.arange(ds.Rows)
        if z in (-200.0, -190.0, -180.0):
            mask[:, :, k] = (np.abs(x) < 200)[:, None] & (np.abs(y) < 150)[None, :]
    return mask


def run_labels_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "tfvision.medical.rtstruct_to_labels",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_rtstruct_cli_writes_labels_on_the_series_grid(tmp_path):
    datasets = write_rtstruct_case(tmp_path / "in")
    (tmp_path / "names.json").write_text('{"Body": ["patient"], "Lung": ["lung*"]}')
    out = tmp_path / "out" / "labels.nii.gz"
    proc = run_labels_cli("--rtstruct", tmp_path / "in" / "rs" / "rtstruct.dcm", "--series", tmp_path / "in" / "ct",
                          "--map", tmp_path / "names.json", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "Body=1 (390 voxels)" in proc.stdout and "missing: Lung" in proc.stdout
    labels = nib.load(out)
    expected = inside_body(datasets)
    assert int(expected.sum()) == 3 * 13 * 10  # 13 x 10 centres on each of the 3 contoured slices
    np.testing.assert_array_equal(np.asarray(labels.dataobj), expected.astype(np.uint8))
    # The exact grid: the CT's own NIfTI (dicom_to_nifti) has the same shape and transforms.
    ct = nib.load(convert_series(sorted((tmp_path / "in" / "ct").iterdir()), tmp_path / "ct")["output"])
    assert labels.shape == ct.shape
    np.testing.assert_allclose(labels.header.get_sform(), ct.header.get_sform(), atol=1e-6)
    np.testing.assert_allclose(labels.header.get_qform(), ct.header.get_qform(), atol=1e-6)
    assert corner_error(tag_corners(datasets), affine_corners(labels.affine, labels.shape)) < 1e-3
    report = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert report["labels"] == {"Body": 1, "Lung": 2} and report["matched"]["Body"] == ["patient"]
    assert report["missing"] == ["Lung"] and report["unmatched"] == ["Isocenter 1", "Isocenter 2"]
    assert report["voxels"] == {"Body": 390, "Lung": 0}


def test_rtstruct_cli_user_errors_exit_2_with_one_line(tmp_path):
    write_rtstruct_case(tmp_path / "in")
    (tmp_path / "names.json").write_text('{"Body": ["patient"]}')
    (tmp_path / "bad.json").write_text('["patient"]')
    rs, ct = tmp_path / "in" / "rs" / "rtstruct.dcm", tmp_path / "in" / "ct"
    cases = {
        "inside the input folder": ("--series", ct, "--map", tmp_path / "names.json", "--output", ct / "l.nii.gz"),
        "must be a JSON object": ("--series", ct, "--map", tmp_path / "bad.json", "--output", tmp_path / "l.nii.gz"),
        "not found under": ("--series", tmp_path / "in" / "rs", "--map", tmp_path / "names.json",
                            "--output", tmp_path / "l.nii.gz"),
    }
    for message, args in cases.items():
        proc = run_labels_cli("--rtstruct", rs, *args) if message == "not found under" else None
        if proc is not None:  # one run through the real interpreter, the rest in-process (fast)
            code, err = proc.returncode, proc.stderr
        else:
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf):
                code = labels_main(["--rtstruct", str(rs), *map(str, args)])
            err = buf.getvalue()
        assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
        assert message in err
    assert sorted(p.name for p in ct.iterdir()) == [f"{k}.dcm" for k in range(5)]  # nothing written into inputs
    assert not (tmp_path / "l.nii.gz").exists()


def test_rtstruct_cli_patients_in_parallel_survive_a_bad_one(tmp_path):
    write_rtstruct_case(tmp_path / "in" / "P1")
    (tmp_path / "in" / "P2").mkdir()  # an RTSTRUCT whose series is missing must fail alone
    shutil.copy(tmp_path / "in" / "P1" / "rs" / "rtstruct.dcm", tmp_path / "in" / "P2")
    (tmp_path / "names.json").write_text('{"Body": ["patient"]}')
    proc = run_labels_cli("--patients", tmp_path / "in", "--map", tmp_path / "names.json",
                          "--output", tmp_path / "out", "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "labelled 1 RTSTRUCT(s), 1 failed" in proc.stdout and "not found under" in proc.stdout
    report = json.loads((tmp_path / "out" / "labels_report.json").read_text())
    assert [Path(r["rtstruct"]).parent.name for r in report["failed"]] == ["P2"]
    assert int(np.asarray(nib.load(tmp_path / "out" / "P1" / "rtstruct.nii.gz").dataobj).sum()) == 390


# ---------------------------------------------------------- uneven spacing


def test_missing_slice_is_split_or_resampled_never_a_mean_step(tmp_path):
    # A real CT with its middle file removed: gaps 2.5, 5.0, 2.5 mm. The full series is the oracle.
    full = sorted(read_series(series_dir("98892001/CT5N")), key=lambda d: float(d.ImagePositionPatient[2]))
    kept = [ds for k, ds in enumerate(full) if k != 2]
    (tmp_path / "in").mkdir()
    for ds in kept:
        ds.save_as(tmp_path / "in" / f"{ds.InstanceNumber}.dcm")
    files = sorted((tmp_path / "in").iterdir())
    split = convert_series(files, tmp_path / "split", uneven="split")
    assert split["status"] == "ok" and len(split["outputs"]) == 2, split
    assert split["gaps"] == [{"after_slice": 1, "gap_mm": pytest.approx(5.0, abs=1e-4)}]
    errors = []
    for path, run in zip(split["outputs"], (kept[:2], kept[2:]), strict=True):
        img = nib.load(path)
        errors.append(corner_error(tag_corners(run), affine_corners(img.affine, img.shape)))
        assert img.shape[2] == 2 and json.loads(Path(path[:-7] + ".json").read_text())["gaps"] == split["gaps"]
    assert record("CT missing slice (split)", "tfvision", max(errors)) < 1e-3
    resampled = convert_series(files, tmp_path / "resampled", uneven="resample")
    img = nib.load(resampled["output"])
    expected = tag_corners(full)
    assert record("CT missing slice (resample)", "tfvision", corner_error(expected, affine_corners(img.affine,
                                                                                                   img.shape))) < 1e-3
    hu = [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in full]
    vol = np.asarray(img.dataobj, np.float64)
    np.testing.assert_allclose(vol[:, :, 1], hu[1].T)  # measured slices keep their values
    np.testing.assert_allclose(vol[:, :, 2], ((hu[1] + hu[3]) / 2).T, atol=0.5)  # linear, stored as float
    # Corners only see the end slices: a mean-step stack (SimpleITK warns "non uniform sampling") still
    # gets them right while its middle slices sit 0.8 mm off, which the split/resample checks above catch.
    sitk_dicom_error("CT missing slice", tmp_path / "in", expected)
    for nii in dcm2niix(tmp_path / "in", tmp_path / "dcm2niix"):
        img = nib.load(nii)
        record("CT missing slice", f"dcm2niix {nii.stem.split('_', 1)[-1]}".strip(),
               corner_error(expected if img.shape[2] == 5 else tag_corners(kept), affine_corners(img.affine,
                                                                                                  img.shape)))


# ------------------------------------------------------ orientation groups


def test_non_parallel_slices_are_written_as_separate_volumes(tmp_path):
    # pydicom's MR700 is a real radial MR series: 7 planes turning about one axis, one SeriesInstanceUID.
    # One affine cannot hold them, so each plane is its own volume.
    folder = series_dir("98892003/MR700")
    datasets = read_series(folder)
    result = convert_series(sorted(folder.iterdir()), tmp_path / "out")
    assert result["status"] == "ok" and len(result["outputs"]) == 7, result
    assert sorted(Path(p).name.split("_")[-1] for p in result["outputs"]) == [f"orient{g}.nii.gz" for g in range(7)]
    matched, errors = set(), []
    for path in result["outputs"]:
        img = nib.load(path)
        per_plane = [corner_error(tag_corners([ds]), affine_corners(img.affine, img.shape)) for ds in datasets]
        matched.add(int(np.argmin(per_plane)))
        errors.append(min(per_plane))
    assert matched == set(range(7))  # every plane written once, each where its own tags put it
    assert record("MR radial, 7 planes in 1 series", "tfvision", max(errors)) < 1e-3
    with pytest.raises(DataError, match="non-parallel planes are never stacked"):
        load_series(folder)
    dcm_errors = []
    for nii in dcm2niix(folder, tmp_path / "dcm2niix"):  # dcm2niix splits too: one file per plane
        img = nib.load(nii)
        dcm_errors.append(min(corner_error(tag_corners([ds]), affine_corners(img.affine, img.shape[:3]))
                              for ds in datasets))
    if dcm_errors:
        record("MR radial, 7 planes in 1 series", f"dcm2niix ({len(dcm_errors)} files)", max(dcm_errors))


# ------------------------------------------------------------ Siemens MOSAIC


NIBABEL_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"


def siemens_dwi(folder: Path, *b_values: int) -> list[Path]:
    """nibabel's real Siemens DWI mosaics (48 slices of 128x128 tiled in 896x896), unzipped into `folder`."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for b in b_values:
        src = NIBABEL_DATA / f"siemens_dwi_{b}.dcm.gz"
        if not src.is_file():
            pytest.skip(f"nibabel test file {src.name} not installed")
        out.append(folder / f"dwi_{b}.dcm")
        out[-1].write_bytes(gzip.decompress(src.read_bytes()))
    return out


def mosaic_oracle(path: Path):
    """nibabel's MosaicWrapper: the [8, 3] RAS corners of the unpacked volume, and its data [row, column, slice]."""
    import warnings

    with warnings.catch_warnings():  # nibabel warns on import that its DICOM readers are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers
    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
    assert type(wrapper).__name__ == "MosaicWrapper"
    lps = affine_corners(wrapper.affine, wrapper.image_shape)  # nibabel's affine is LPS, (row, column, slice)
    return lps * LPS_TO_RAS, wrapper.get_data()


def test_siemens_mosaic_is_unpacked_into_slices(tmp_path):
    (path,) = siemens_dwi(tmp_path / "in", 0)
    # nibabel ships these files with zeroed pixels; a pattern (tile number * 100 + row % 100) shows which
    # tile lands in which slice. Geometry and every other tag are the scanner's.
    ds = pydicom.dcmread(path)
    rows = np.arange(ds.Rows)[:, None] % 128 % 100 + 100 * (np.arange(ds.Rows)[:, None] // 128 * 7
                                                             + np.arange(ds.Columns)[None, :] // 128)
    ds.PixelData = rows.astype(np.uint16).tobytes()
    ds.save_as(path)
    expected, oracle = mosaic_oracle(path)
    error, out = tfvision_error("Siemens MOSAIC (DWI, 48 slices)", [path], tmp_path / "out", expected)
    assert error < 1e-3
    img = nib.load(out)
    assert img.shape == (128, 128, 48)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(1, 0, 2), oracle)
    side = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    assert side["mosaic"] == 48
    sitk_nifti_error("Siemens MOSAIC (DWI, 48 slices)", out, expected)
    sitk_dicom_error("Siemens MOSAIC (DWI, 48 slices)", tmp_path / "in", expected)  # GDCM keeps the tiled image
    for nii in dcm2niix(tmp_path / "in", tmp_path / "dcm2niix"):
        got = nib.load(nii)
        assert got.shape == (128, 128, 48)
        assert record("Siemens MOSAIC (DWI, 48 slices)", "dcm2niix",
                      corner_error(expected, affine_corners(got.affine, got.shape))) < 1e-2


def test_siemens_mosaic_without_its_slice_count_is_refused(tmp_path):
    (path,) = siemens_dwi(tmp_path / "in", 0)
    ds = pydicom.dcmread(path)
    for tag in [(0x0029, 0x1010), (0x0029, 0x1020), (0x0019, 0x100A)]:  # the CSA headers, NumberOfImagesInMosaic
        if tag in ds:
            del ds[tag]
    ds.save_as(path)
    result = convert_series([path], tmp_path / "out")
    assert result["status"] == "failed" and "NumberOfImagesInMosaic" in result["error"], result
    assert not (tmp_path / "out").exists()  # never a tiled image


# ------------------------------------------------ acquisitions sharing positions


def test_two_mosaic_acquisitions_at_the_same_positions_are_separate_volumes(tmp_path):
    # nibabel's real b=0 and b=1000 DWI mosaics: one series, the same 48 positions, AcquisitionNumber 1 and 2.
    paths = siemens_dwi(tmp_path / "in", 0, 1000)
    result = convert_series(paths, tmp_path / "out")
    assert result["status"] == "ok" and result["split_by"] == ["AcquisitionNumber"], result.get("error")
    assert [Path(p).name.rsplit("_", 1)[-1] for p in result["outputs"]] == ["acq1.nii.gz", "acq2.nii.gz"]
    for path, dicom in zip(result["outputs"], paths, strict=True):
        img = nib.load(path)
        assert img.shape == (128, 128, 48)
        record("Siemens MOSAIC, 2 acquisitions (per volume)", "tfvision",
               corner_error(mosaic_oracle(dicom)[0], affine_corners(img.affine, img.shape)))
        side = json.loads(Path(path[:-7] + ".json").read_text())
        assert side["acquisition"]["tag"] == "AcquisitionNumber" and side["files"] == [str(dicom)]
    assert corner_errors[("Siemens MOSAIC, 2 acquisitions (per volume)", "tfvision")] < 1e-3
    for nii in dcm2niix(tmp_path / "in", tmp_path / "dcm2niix"):  # dcm2niix: one 4D file, 128x128x48x2
        img = nib.load(nii)
        record("Siemens MOSAIC, 2 acquisitions (per volume)", f"dcm2niix (4D {img.shape[3]})",
               corner_error(mosaic_oracle(paths[0])[0], affine_corners(img.affine, img.shape[:3])))


def write_echoes(src: Path, dst: Path, echoes: tuple[int, int] | None) -> list:
    """A real CT saved twice into one series: the copy gets new SOPInstanceUIDs and, unless `echoes` is None,
    EchoNumbers 1 and 2 (the copy's pixels + 100 HU, to tell the echoes apart)."""
    dst.mkdir(parents=True)
    datasets = read_series(src)
    for k, ds in enumerate(datasets):
        if echoes:
            ds.EchoNumbers = echoes[0]
        ds.save_as(dst / f"a{k}.dcm")
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        if echoes:
            ds.EchoNumbers = echoes[1]
            ds.PixelData = (ds.pixel_array + 100).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(dst / f"b{k}.dcm")
    return datasets


def test_echoes_sharing_positions_split_by_echo_number(tmp_path):
    datasets = write_echoes(series_dir("98892001/CT5N"), tmp_path / "in", (1, 2))
    result = convert_series(sorted((tmp_path / "in").iterdir()), tmp_path / "out")
    assert result["status"] == "ok" and result["split_by"] == ["EchoNumbers"], result
    first, second = (nib.load(p) for p in result["outputs"])
    assert result["outputs"][1].endswith("_echo2.nii.gz")
    expected = tag_corners(datasets)
    errors = [corner_error(expected, affine_corners(img.affine, img.shape)) for img in (first, second)]
    assert record("CT, 2 echoes at the same positions (per echo)", "tfvision", max(errors)) < 1e-3
    np.testing.assert_array_equal(np.asarray(second.dataobj) - np.asarray(first.dataobj), 100)
    # GDCM stacks both echoes into one 10-slice volume (recorded for the table, not asserted).
    sitk_dicom_error("CT, 2 echoes at the same positions (per echo)", tmp_path / "in", expected)
    for nii in dcm2niix(tmp_path / "in", tmp_path / "dcm2niix"):
        img = nib.load(nii)
        record("CT, 2 echoes at the same positions (per echo)", f"dcm2niix {nii.stem.split('_', 1)[-1]}".strip(),
               corner_error(expected, affine_corners(img.affine, img.shape[:3])))


def test_repeated_positions_nothing_tells_apart_are_refused(tmp_path):
    write_echoes(series_dir("98892001/CT5N"), tmp_path / "in", None)
    result = convert_series(sorted((tmp_path / "in").iterdir()), tmp_path / "out")
    assert result["status"] == "failed" and "duplicate slice positions" in result["error"], result
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------- tilt resample option


def test_tilt_resample_matches_dcm2niix_tilt_file(tmp_path):
    datasets = write_tilted(series_dir("98892001/CT5N"), tmp_path / "tilt", 20.0)
    for path in (tmp_path / "tilt").iterdir():  # dcm2niix's sign for this drift is -20: make the tag agree
        ds = pydicom.dcmread(path)
        ds.GantryDetectorTilt = -20.0
        ds.save_as(path)
    result = convert_series(sorted((tmp_path / "tilt").iterdir()), tmp_path / "out", tilt="resample")
    assert result["status"] == "ok", result
    img = nib.load(result["output"])
    affine, vol = img.affine, np.asarray(img.dataobj, np.float64)
    header = img.header
    assert header["qform_code"] == 1 and header["sform_code"] == 1  # orthogonal again: both transforms exact
    np.testing.assert_allclose(affine[:3, :3] @ affine[:3, :3].T, np.diag(np.diag(affine[:3, :3] @ affine[:3, :3].T)),
                               atol=1e-6)
    # Every slice lies in a plane of the new grid (error in mm off that plane), whole (the grid grew to hold
    # its drift); in-plane, slices after the first fall between voxel centres: that is the interpolation.
    plane_errors = []
    for ds in datasets:
        ijk = (np.c_[tag_corners([ds]), np.ones(8)] @ np.linalg.inv(affine).T)[:, :3]
        plane_errors.append(np.abs(ijk[:, 2] - np.round(ijk[0, 2])).max() * img.header.get_zooms()[2])
        assert np.all(ijk > -1e-3) and np.all(ijk < np.array(img.shape) - 1 + 1e-3)
    assert record("CT gantry tilt 20 deg, --tilt resample", "tfvision", max(plane_errors)) < 1e-3
    # The slice the grid passes through keeps its values exactly.
    first = min(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    i, j, _ = np.round(np.linalg.inv(affine) @ [*tag_corners([first])[0], 1.0])[:3].astype(int)
    np.testing.assert_allclose(vol[i:i + 16, j:j + 16, 0],
                               (first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)).T)
    expected = affine_corners(affine, img.shape)
    sitk_nifti_error("CT gantry tilt 20 deg, --tilt resample", Path(result["output"]), expected)
    assert corner_errors[("CT gantry tilt 20 deg, --tilt resample", "SimpleITK (tfvision NIfTI)")] < 1e-3
    for nii in (p for p in dcm2niix(tmp_path / "tilt", tmp_path / "dcm2niix") if "_Tilt" in p.name):
        # dcm2niix's _Tilt grid has our shape (16x24x5) but sits one whole drift (4 x 0.91 mm) off in y, and
        # its first slice is interpolated half a pixel off the tag position: recorded, not asserted.
        ref = nib.load(nii)
        assert ref.shape == img.shape
        record("CT gantry tilt 20 deg, --tilt resample", "dcm2niix _Tilt_1",
               corner_error(affine_corners(affine, img.shape), affine_corners(ref.affine, ref.shape)))


# ---------------------------------------------- CLI and labels on uneven series


def write_missing_slice(folder: Path) -> list:
    """A real CT with its middle file removed (gaps 2.5, 5.0, 2.5 mm); the datasets kept."""
    full = sorted(read_series(series_dir("98892001/CT5N")), key=lambda d: float(d.ImagePositionPatient[2]))
    folder.mkdir(parents=True)
    for k, ds in enumerate(full):
        if k != 2:
            ds.save_as(folder / f"{ds.InstanceNumber}.dcm")
    return full


@pytest.mark.parametrize("mode, shapes", [("split", [2, 2]), ("resample", [5])])
def test_dicom_to_nifti_cli_uneven(tmp_path, mode, shapes):
    from tfvision.medical.dicom_to_nifti import main as convert_main

    full = write_missing_slice(tmp_path / "in")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = convert_main([str(tmp_path / "in"), str(tmp_path / "out"), "--uneven", mode, "--workers", "1",
                             "--no-progress"])
    assert code == 0 and "converted 1 series" in out.getvalue() and "uneven slice spacing" in out.getvalue()
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    (series,) = report["converted"]
    assert series["gaps"] == [{"after_slice": 1, "gap_mm": pytest.approx(5.0, abs=1e-4)}]
    images = [nib.load(p) for p in series["outputs"]]
    assert [img.shape[2] for img in images] == shapes
    assert all(("_run" in Path(p).name) == (mode == "split") for p in series["outputs"])
    if mode == "resample":
        assert corner_error(tag_corners(full), affine_corners(images[0].affine, images[0].shape)) < 1e-3
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(f"{d.InstanceNumber}.dcm"
                                                                         for k, d in enumerate(full) if k != 2)


def test_rtstruct_labels_refuse_an_uneven_series(tmp_path):
    write_rtstruct_case(tmp_path / "in")
    (tmp_path / "in" / "ct" / "2.dcm").unlink()  # z = -190 gone: gaps 10, 20, 10 mm
    (tmp_path / "names.json").write_text('{"Body": ["patient"]}')
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = labels_main(["--rtstruct", str(tmp_path / "in" / "rs" / "rtstruct.dcm"), "--series",
                            str(tmp_path / "in" / "ct"), "--map", str(tmp_path / "names.json"),
                            "--output", str(tmp_path / "l.nii.gz")])
    assert code != 0 and "uneven slice spacing" in buf.getvalue(), buf.getvalue()
    assert not (tmp_path / "l.nii.gz").exists()


# --------------------------------------- every real multi-slice source that ships offline
# pydicom 3 bundles no Enhanced CT/MR file (enhanced_CT.dcm, emri_small*.dcm live in the pydicom-data
# package, a 34 MB wheel, left out of the test extra); nibabel's Philips Enhanced MR stands in below.


def sitk_affine(image) -> np.ndarray:
    """RAS voxel-to-world affine of a SimpleITK image (ITK works in LPS)."""
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([*LPS_TO_RAS, 1.0]) @ lps


def match_slices(datasets, volumes) -> list[tuple[float, int, int]]:
    """Each DICOM slice's own slice among the (affine, shape) volumes: ``(error mm, volume, slice)`` per dataset.

    One to one (no two files may claim the same output slice), the assignment with the least total
    corner error; a file left over when the tool wrote fewer slices gets its nearest slice.
    """
    from scipy.optimize import linear_sum_assignment

    slots = [(v, k) for v, (_, shape) in enumerate(volumes) for k in range(shape[2])]
    cost = np.array([[corner_error(tag_corners([ds]),
                                   affine_corners(volumes[v][0] @ [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, k], [0, 0, 0, 1]],
                                                  (*volumes[v][1][:2], 1))) for v, k in slots] for ds in datasets])
    best = dict(zip(*linear_sum_assignment(cost), strict=True))
    return [(float(cost[i, best.get(i, np.argmin(cost[i]))]), *slots[best.get(i, int(np.argmin(cost[i])))])
            for i in range(len(datasets))]


def slice_error(case: str, tool: str, datasets, volumes) -> float:
    """Record the largest distance of a DICOM slice's corners from its own slice in the tool's volumes.

    Corners of whole volumes only see the end slices; where a series is split or mis-stacked, every
    slice must be checked (a mean-step stack keeps its ends right and moves the slices between them).
    """
    return record(case, tool, max(error for error, _, _ in match_slices(datasets, volumes)))


DICOMDIR_SERIES = [
    # case, pydicom folder, SeriesInstanceUID suffix, tfvision's outputs, does dcm2niix place every slice?
    ("dicomdirtests CT2, gaps 202.5/1.25/1.25 mm", "77654033/CT2", ".28319.0.2", ["run0", "run1"], False),
    ("dicomdirtests CT2N, 2 non-parallel planes", "98892001/CT2N", ".16302.0.2", ["orient0", "orient1"], False),
    ("dicomdirtests MR2, 3-plane localizer a", "98892003/MR2", ".18148.0.136", ["orient0", "orient1", "orient2"],
     True),
    ("dicomdirtests MR2, 3-plane localizer b", "98892003/MR2", ".18148.0.17", ["orient0", "orient1", "orient2"],
     True),
]


@pytest.mark.parametrize("case, folder, uid, parts, dcm2niix_right", DICOMDIR_SERIES,
                         ids=["CT2", "CT2N", "MR2-localizer-a", "MR2-localizer-b"])
def test_dicomdir_series_every_slice_where_its_tags_say(tmp_path, case, folder, uid, parts, dcm2niix_right):
    # pydicom's real multi-slice series beyond CT5N and MR700: CT2 is the uneven CT of the issue
    # (z = -99.5, 103.0, 104.3, 105.5), CT2N and MR2 are localizers whose planes share a SeriesInstanceUID.
    (tmp_path / "in").mkdir()
    datasets = []
    for path in sorted(series_dir(folder).iterdir()):
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID.endswith(uid):
            shutil.copy(path, tmp_path / "in" / path.name)
            datasets.append(ds)
    result = convert_series(sorted((tmp_path / "in").iterdir()), tmp_path / "out")
    assert result["status"] == "ok", result
    assert [Path(p).name[:-7].rsplit("_", 1)[-1] for p in result["outputs"]] == parts
    images = [nib.load(p) for p in result["outputs"]]
    assert sum(img.shape[2] for img in images) == len(datasets)  # every slice once, none invented
    volumes = [(img.affine, img.shape) for img in images]
    assert slice_error(case, "tfvision", datasets, volumes) < 1e-3
    for ds, (_, v, k) in zip(datasets, match_slices(datasets, volumes), strict=True):  # holding its own pixels
        hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        np.testing.assert_allclose(np.asarray(images[v].dataobj)[:, :, k], hu.T)
    try:
        import SimpleITK as sitk
    except ImportError:
        sitk = None
    if sitk is not None:
        ours = [sitk.ReadImage(p) for p in result["outputs"]]
        assert slice_error(case, "SimpleITK (tfvision NIfTI)", datasets,
                           [(sitk_affine(im), im.GetSize()) for im in ours]) < 1e-3
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "in")))
        image = reader.Execute()
        slice_error(case, "SimpleITK (DICOM)", datasets, [(sitk_affine(image), image.GetSize())])
    written = dcm2niix(tmp_path / "in", tmp_path / "dcm2niix")
    # dcm2niix splits the MR2 localizers (one file per plane, right) but stacks CT2N's two planes into one
    # volume, and writes CT2 with its first gap (202.5 mm) as the step (its last slice lands 402.5 mm off)
    # beside an equalized _Eq_1 copy on a 29.3 mm grid that cannot hold slices 1.25 mm apart: recorded,
    # asserted where right. GDCM stacks every file with the mean step.
    for label, files in (("dcm2niix", [p for p in written if "_Eq" not in p.name]),
                         ("dcm2niix _Eq_1", [p for p in written if "_Eq" in p.name])):
        if files:
            tool = f"{label} ({len(files)} files)" if len(files) > 1 else label
            error = slice_error(case, tool, datasets, [(nib.load(p).affine, nib.load(p).shape) for p in files])
            if dcm2niix_right:
                assert error < 1e-2


def philips_frames(ds) -> list:
    """One pseudo-dataset per frame of an Enhanced MR file, from its per-frame functional groups (tag geometry)."""
    from types import SimpleNamespace

    shared = ds.SharedFunctionalGroupsSequence[0]

    def group(frame, name):
        return (frame.get(name) or shared.get(name))[0]

    return [SimpleNamespace(ImagePositionPatient=group(f, "PlanePositionSequence").ImagePositionPatient,
                            ImageOrientationPatient=group(f, "PlaneOrientationSequence").ImageOrientationPatient,
                            PixelSpacing=group(f, "PixelMeasuresSequence").PixelSpacing,
                            Rows=ds.Rows, Columns=ds.Columns)
            for f in ds.PerFrameFunctionalGroupsSequence]


def philips_mprage(folder: Path, edit=None):
    """nibabel's real Philips Achieva Enhanced MR (176 oblique sagittal frames of 256x256, one file) in `folder`.

    nibabel ships it with zeroed pixels; a pattern (frame * 23 + row + column, 12 bits) shows which frame
    lands where. `edit(ds)` may rewrite tags before it is saved. Returns (path, dataset, stored [frame, row, col]).
    """
    import gzip

    src = NIBABEL_DATA / "philips_mprage.dcm.gz"
    if not src.is_file():
        pytest.skip(f"nibabel test file {src.name} not installed")
    folder.mkdir(parents=True)
    path = folder / "mprage.dcm"
    path.write_bytes(gzip.decompress(src.read_bytes()))
    ds = pydicom.dcmread(path)
    n, rows, cols = int(ds.NumberOfFrames), ds.Rows, ds.Columns
    stored = ((np.arange(n)[:, None, None] * 23 + np.arange(rows)[:, None] + np.arange(cols)) % 4096).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    if edit is not None:
        edit(ds)
    ds.save_as(path)
    return path, ds, stored


def frame_order(frames) -> np.ndarray:
    """Frame indices sorted along the slice normal: the order of a converted volume's slices."""
    normal = np.cross(*np.reshape(np.asarray(frames[0].ImageOrientationPatient, float), (2, 3)))
    return np.argsort([normal @ np.asarray(f.ImagePositionPatient, float) for f in frames], kind="stable")


def test_philips_enhanced_mr_multiframe(tmp_path):
    path, ds, stored = philips_mprage(tmp_path / "in")
    n, rows, cols = stored.shape
    frames = philips_frames(ds)
    expected = tag_corners(frames)
    case = "Philips Enhanced MR (176 frames)"
    error, out = tfvision_error(case, [path], tmp_path / "out", expected)
    assert error < 1e-3
    # Values: the public modality LUT (PixelValueTransformationSequence RescaleSlope/Intercept, PS3.3 C.7.6.16.2.9).
    transform = ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    slope, intercept = float(transform.RescaleSlope), float(transform.RescaleIntercept)
    img = nib.load(out)
    vol = np.asarray(img.dataobj)
    assert vol.shape == (cols, rows, n)
    np.testing.assert_allclose(vol, stored[frame_order(frames)].transpose(2, 1, 0) * slope + intercept, rtol=1e-6)
    assert (sitk_nifti_error(case, out, expected) or 0.0) < 1e-3  # None when SimpleITK is not installed
    try:
        import SimpleITK as sitk
    except ImportError:
        sitk = None
    if sitk is not None:  # GDCM reads the Enhanced MR geometry right
        assert record(case, "SimpleITK (DICOM)", corner_error(expected, sitk_corners(sitk.ReadImage(str(path))))) < 1e-2
    ours = nib.as_closest_canonical(img).get_fdata()
    # dcm2niix's default -p y writes Philips' private "floating point" scaling, stored / (2005,100E) scale
    # slope, not the public RescaleSlope: compared against the public slope's values, and -p n agrees with ours.
    private = float(ds.PerFrameFunctionalGroupsSequence[0][0x2005, 0x140F][0][0x2005, 0x100E].value)
    for flags, want in ((("-p", "y"), ours / slope / private), (("-p", "n"), ours)):
        for nii in dcm2niix(tmp_path / "in", tmp_path / f"dcm2niix{flags[1]}", *flags):
            theirs = nib.load(nii)
            tool = f"dcm2niix {' '.join(flags)}"
            assert record(case, tool, corner_error(expected, affine_corners(theirs.affine, theirs.shape))) < 1e-2
            np.testing.assert_allclose(nib.as_closest_canonical(theirs).get_fdata(), want, rtol=1e-5)


def test_philips_enhanced_mr_per_frame_rescale(tmp_path):
    # The same real file with its per-frame PixelValueTransformationSequence rewritten so odd frames carry
    # twice the slope and an intercept: a functional group may differ per frame, and each frame's own
    # transform must be applied (tfvision applied the first frame's to all of them).
    def edit(ds):
        for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            transform = item.PixelValueTransformationSequence[0]
            transform.RescaleSlope = f"{float(transform.RescaleSlope) * (1 + k % 2):.6f}"
            transform.RescaleIntercept = str(-5 * (k % 2))

    path, ds, stored = philips_mprage(tmp_path / "in", edit)
    pairs = np.array([(float(f.PixelValueTransformationSequence[0].RescaleSlope),
                       float(f.PixelValueTransformationSequence[0].RescaleIntercept))
                      for f in ds.PerFrameFunctionalGroupsSequence])
    result = convert_series([path], tmp_path / "out")
    assert result["status"] == "ok", result
    order = frame_order(philips_frames(ds))
    want = stored[order] * pairs[order, 0, None, None] + pairs[order, 1, None, None]
    np.testing.assert_allclose(np.asarray(nib.load(result["output"]).dataobj), want.transpose(2, 1, 0), rtol=1e-6)
    side = json.loads(Path(result["output"][:-7] + ".json").read_text())
    assert sorted(map(tuple, side["rescale"])) == sorted(set(map(tuple, pairs.tolist())))
