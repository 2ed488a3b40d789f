"""tfvision.medical: DICOM reading, series stacking, NIfTI conversion, RTSTRUCT, windowing.

Real data only: pydicom's bundled test files (never downloaded) and synthetic
series written from CT_small.dcm into tmp_path.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from tfvision.errors import DataError  # noqa: E402
from tfvision.medical import dicom_to_nifti  # noqa: E402
from tfvision.medical.dicom import DicomError, read_dicom  # noqa: E402
from tfvision.medical.rtstruct import (  # noqa: E402
    RTStruct,
    Structure,
    match_structures,
    normalize_name,
    polygon_mask,
    rasterize_rtstruct,
    read_rtstruct,
    rtstruct_to_labels,
)
from tfvision.medical.series import load_series, scan_dicom, slice_affine  # noqa: E402
from tfvision.medical.windowing import crop_uniform_borders, window, zscore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def data(name: str) -> str:
    path = get_testdata_file(name, download=False)  # never the network
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return path


def write_ct_series(folder: Path, positions, *, orientation=(1, 0, 0, 0, 1, 0), shuffle=True, uid=None,
                    instance_numbers=None, drop_position=False, seed=0, pixel_spacing=None):
    """CT_small copies forming one series; slice k has pixel values raw + 10*k."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    order = np.random.default_rng(seed).permutation(len(positions)) if shuffle else range(len(positions))
    numbers = instance_numbers or [k + 1 for k in range(len(positions))]
    for n, k in enumerate(order):
        ds = pydicom.dcmread(data("CT_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.InstanceNumber = numbers[k]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        if drop_position:
            del ds.ImagePositionPatient
        if pixel_spacing:
            ds.PixelSpacing = list(pixel_spacing)
        ds.PixelData = (ds.pixel_array + 10 * int(k)).astype(np.int16).tobytes()
        ds.save_as(folder / f"file{n:03d}.dcm")  # file names deliberately unrelated to order
    return uid


def z_positions(n, step=2.5, z0=-75.7):
    return [[-158.1, -179.0, z0 + step * k] for k in range(n)]


# --------------------------------------------------------------------- dicom


def test_import_pulls_in_neither_tensorflow_nor_pydicom():
    code = "import sys, tfvision.medical; print('tensorflow' in sys.modules, 'pydicom' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm"])
def test_hu_equal_pydicom_modality_lut(name):
    ds = pydicom.dcmread(data(name))
    hu, meta = read_dicom(data(name))
    expected = apply_modality_lut(ds.pixel_array, ds)
    assert hu.dtype == np.float32 and hu.shape == expected.shape
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert meta["rescale_intercept"] == float(ds.RescaleIntercept) == -1024.0
    assert meta["modality"] == "CT" and meta["patient_id"] == str(ds.PatientID)
    assert meta["series_instance_uid"] == ds.SeriesInstanceUID
    assert meta["instance_number"] == int(ds.InstanceNumber)
    assert meta["image_position_patient"] == [float(v) for v in ds.ImagePositionPatient]
    assert meta["spacing"] == [float(v) for v in ds.PixelSpacing]
    assert meta["rescale_defaulted"] == []


def test_missing_rescale_falls_back_and_warns(tmp_path, caplog):
    ds = pydicom.dcmread(data("CT_small.dcm"))
    raw = ds.pixel_array.astype(np.float32)
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.save_as(tmp_path / "norescale.dcm")
    with caplog.at_level(logging.WARNING, logger="tfvision.medical.dicom"):
        hu, meta = read_dicom(tmp_path / "norescale.dcm")
    np.testing.assert_array_equal(hu, raw)
    assert (meta["rescale_slope"], meta["rescale_intercept"]) == (1.0, 0.0)
    assert meta["rescale_defaulted"] == ["RescaleSlope", "RescaleIntercept"]
    assert any("norescale.dcm" in r.getMessage() and "RescaleSlope" in r.getMessage() for r in caplog.records)


def test_missing_intercept_only_keeps_the_slope(tmp_path, caplog):
    ds = pydicom.dcmread(data("CT_small.dcm"))
    raw = ds.pixel_array.astype(np.float32)
    ds.RescaleSlope = 2
    del ds.RescaleIntercept
    ds.save_as(tmp_path / "slope_only.dcm")
    hu, meta = read_dicom(tmp_path / "slope_only.dcm")
    np.testing.assert_array_equal(hu, raw * 2)
    assert meta["rescale_defaulted"] == ["RescaleIntercept"]
    assert "slope_only.dcm" in caplog.text


def test_monochrome1_is_inverted(tmp_path):
    ref, _ = read_dicom(data("MR_small.dcm"))
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    inv, meta = read_dicom(tmp_path / "mono1.dcm")
    assert meta["inverted"] is True
    np.testing.assert_array_equal(inv, ref.max() + ref.min() - ref)
    # The brightest pixel becomes the darkest one.
    assert inv.flat[np.argmax(ref)] == ref.min()


def test_multiframe_reads_frames_first():
    ds = pydicom.dcmread(data("rtdose.dcm"))
    arr, meta = read_dicom(data("rtdose.dcm"))
    assert arr.shape == (15, 10, 10) == ds.pixel_array.shape
    np.testing.assert_allclose(arr, ds.pixel_array * float(ds.DoseGridScaling), rtol=1e-6)  # dose, not raw
    assert meta["number_of_frames"] == 15 and meta["dose_grid_scaling"] == 1e-6
    assert meta["spacing"] == [5.0, 10.0, 10.0]  # GridFrameOffsetVector step, then PixelSpacing


@pytest.mark.parametrize(
    "compressed, reference, syntax, atol",
    [
        ("MR_small_RLE.dcm", "MR_small.dcm", "RLE Lossless", 0),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", "JPEG 2000", 0),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", "JPEG-LS Lossless", 0),
        ("rtdose_rle.dcm", "rtdose.dcm", "RLE Lossless", 0),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", "JPEG Lossless", 0),
        ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", "JPEG 2000", 0),
        ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", "JPEG Baseline", 2),  # lossy
        ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", "JPEG-LS Lossy", 2),  # near-lossless
    ],
)
def test_compressed_syntaxes_match_reference(compressed, reference, syntax, atol):
    got, meta = read_dicom(data(compressed))
    ref, _ = read_dicom(data(reference))
    assert syntax in meta["transfer_syntax"]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= atol


def test_unsupported_syntax_names_syntax_and_remedy(tmp_path):
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    ds.save_as(tmp_path / "video.dcm")
    with pytest.raises(DicomError, match=r"MPEG2.*not supported.*pip install av"):
        read_dicom(tmp_path / "video.dcm")
    assert issubclass(DicomError, DataError)


def test_missing_decoder_plugin_names_the_package(monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(DicomError, match=r"JPEG 2000.*pip install pylibjpeg-openjpeg"):
        read_dicom(data("MR_small_jp2klossless.dcm"))


def test_no_pixel_data_and_broken_files_raise_dicom_error(tmp_path):
    with pytest.raises(DicomError, match="no pixel data"):
        read_dicom(data("rtstruct.dcm"))
    with pytest.raises(DicomError, match="cannot decode pixel data"):
        read_dicom(data("MR_truncated.dcm"))
    (tmp_path / "junk.dcm").write_bytes(os.urandom(2000))
    with pytest.raises(DicomError, match="junk.dcm"):
        read_dicom(tmp_path / "junk.dcm")


# -------------------------------------------------------------------- series


def test_shuffled_slices_are_ordered_by_position(tmp_path):
    # InstanceNumbers run against the positions, so only the geometry gives the right order.
    write_ct_series(tmp_path, z_positions(6), instance_numbers=[6, 5, 4, 3, 2, 1])
    raw = pydicom.dcmread(data("CT_small.dcm")).pixel_array.astype(np.float32) - 1024
    vol, meta = load_series(tmp_path)
    assert vol.shape == (128, 128, 6)
    for k in range(6):
        np.testing.assert_array_equal(vol[:, :, k], (raw + 10 * k).T)
    assert np.all(np.diff(meta["slice_positions"]) > 0)
    assert meta["warnings"] == []


def test_ordering_uses_the_slice_normal_not_z(tmp_path):
    # Sagittal slices: all z equal, the stack runs along x (normal = row x col).
    orientation = (0, 1, 0, 0, 0, -1)
    positions = [[5.0 * k, -50.0, 40.0] for k in range(4)]
    write_ct_series(tmp_path, positions, orientation=orientation, seed=3)
    vol, meta = load_series(tmp_path)
    normal = np.cross(orientation[:3], orientation[3:])
    assert meta["slice_positions"] == sorted(float(normal @ p) for p in positions)
    first = 0 if normal[0] > 0 else 3  # slice k carries +10*k
    raw = pydicom.dcmread(data("CT_small.dcm")).pixel_array.astype(np.float32) - 1024
    np.testing.assert_array_equal(vol[:, :, 0], (raw + 10 * first).T)


def test_instance_number_fallback_without_positions(tmp_path):
    write_ct_series(tmp_path, z_positions(3), instance_numbers=[3, 1, 2], drop_position=True)
    vol, meta = load_series(tmp_path)
    raw = pydicom.dcmread(data("CT_small.dcm")).pixel_array.astype(np.float32) - 1024
    # InstanceNumber 1 belongs to slice index 1 (+10), 2 to slice 2, 3 to slice 0.
    assert [float(vol[0, 0, k] - raw[0, 0]) for k in range(3)] == [10.0, 20.0, 0.0]
    assert any("InstanceNumber" in w for w in meta["warnings"])


def test_affine_round_trips_through_nibabel(tmp_path):
    angle = np.deg2rad(20)  # oblique: tilted about x, so the normal is not the z axis
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(angle), np.sin(angle)])
    normal = np.cross(row, col)
    ipp0 = np.array([-100.0, -80.0, 30.0])
    positions = [ipp0 + 3.0 * k * normal for k in range(4)]
    dr, dc = 0.5, 0.8  # PixelSpacing = (between rows, between columns): non-square catches swaps
    write_ct_series(tmp_path / "dcm", positions, orientation=(*row, *col), pixel_spacing=(dr, dc))
    vol, meta = load_series(tmp_path / "dcm")
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, meta["affine"]), path)
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, meta["affine"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    i, j, k = 7, 11, 2
    lps = positions[k] + i * dc * row + j * dr * col  # DICOM PS3.3 C.7.6.2.1.1
    world = img.affine @ [i, j, k, 1]
    np.testing.assert_allclose(world[:3], lps * [-1, -1, 1], atol=1e-4)  # RAS = LPS with x, y flipped
    assert nib.aff2axcodes(img.affine)[0] == "L"  # column index runs to patient left
    np.testing.assert_allclose(meta["spacing"], [dc, dr, 3.0], atol=1e-6)


def test_uneven_spacing_is_reported(tmp_path):
    positions = z_positions(5)
    positions[4][2] += 2.5  # a missing slice: gaps 2.5, 2.5, 2.5, 5.0
    write_ct_series(tmp_path, positions)
    vol, meta = load_series(tmp_path)  # default: resampled onto the even 2.5 mm grid, never the mean step
    assert "uneven slice spacing" in meta["warnings"][0] and "2.500..5.000" in meta["warnings"][0]
    assert meta["gaps"] == [{"after_slice": 3, "gap_mm": 5.0}] and vol.shape == (128, 128, 6)
    raw = pydicom.dcmread(data("CT_small.dcm")).pixel_array.astype(np.float32) - 1024
    np.testing.assert_allclose(vol[:, :, 4], (raw + 35).T)  # halfway between slices +30 and +40
    np.testing.assert_allclose(meta["affine"][2, 2], 2.5)
    with pytest.raises(DataError, match="load_series_runs"):
        load_series(tmp_path, uneven="split")


def test_inconsistent_series_are_rejected_or_reported(tmp_path):
    uid = write_ct_series(tmp_path / "a", z_positions(3))
    other = pydicom.dcmread(data("MR_small.dcm"))  # 64x64 in a 128x128 series
    other.SeriesInstanceUID = uid
    other.save_as(tmp_path / "a" / "intruder.dcm")
    with pytest.raises(DataError, match="differ in size"):
        load_series(tmp_path / "a")
    write_ct_series(tmp_path / "dup", [z_positions(1)[0]] * 2)
    with pytest.raises(DataError, match="duplicate slice position"):
        load_series(tmp_path / "dup")
    tilt = write_ct_series(tmp_path / "tilt", z_positions(3), orientation=(1, 0, 0, 0, 0.9998, 0.02))
    _, meta = load_series(tmp_path / "tilt")
    assert any("sheared" in w for w in meta["warnings"])
    write_ct_series(tmp_path / "turned", z_positions(3), shuffle=False)
    ds = pydicom.dcmread(tmp_path / "turned" / "file002.dcm")
    ds.ImageOrientationPatient = [0.9998, 0.02, 0, -0.02, 0.9998, 0]
    ds.save_as(tmp_path / "turned" / "file002.dcm")
    with pytest.raises(DataError, match="ImageOrientationPatient differs"):  # never stacked
        load_series(tmp_path / "turned")
    with pytest.raises(DataError, match="image series"):  # several series: the caller must choose
        load_series(tmp_path)
    vol, meta = load_series(tmp_path, series_uid=tilt)
    assert meta["series_instance_uid"] == tilt and vol.shape == (128, 128, 3)


def test_multiframe_file_loads_as_volume():
    vol, meta = load_series([data("rtdose.dcm")])
    ds = pydicom.dcmread(data("rtdose.dcm"))
    assert vol.shape == (10, 10, 15)
    # DoseGridScaling (1e-6 here) turns the stored integers into dose (PS3.3 C.8.8.3.1).
    np.testing.assert_allclose(vol[:, :, 4], ds.pixel_array[4].T * float(ds.DoseGridScaling), rtol=1e-6)
    assert meta["unit"] == "relative" and not meta["warnings"]  # DoseUnits RELATIVE; no rescale warning
    np.testing.assert_allclose(meta["spacing"], [10.0, 10.0, 5.0])


# ---------------------------------------------------------------- converter


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tfvision.medical.dicom_to_nifti", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_dicom_to_nifti_cli_end_to_end(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_ct_series(src / "LUNG1-001" / "a" / "b", z_positions(4))
    mr = pydicom.dcmread(data("MR_small.dcm"))
    (src / "LUNG1-002").mkdir()
    mr.save_as(src / "LUNG1-002" / "mr.dcm")
    (src / "LUNG1-003").mkdir()
    (src / "LUNG1-003" / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    bad_uid = write_ct_series(src / "LUNG1-004", z_positions(2), shuffle=False)
    small = pydicom.dcmread(data("MR_small.dcm"))
    small.SeriesInstanceUID = bad_uid  # a series whose slices differ in size must fail alone
    small.save_as(src / "LUNG1-004" / "odd.dcm")

    proc = run_cli(src, out, "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "converted 2 series, 1 failed, 1 unreadable" in proc.stdout
    assert f"FAILED series {bad_uid}" in proc.stdout and "differ in size" in proc.stdout
    assert "UNREADABLE" in proc.stdout and "corrupt.dcm" in proc.stdout

    niftis = sorted(out.rglob("*.nii.gz"))
    assert len(niftis) == 2
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left
    ct = next(p for p in niftis if p.parent.name == "1CT1")
    vol, meta = load_series(src / "LUNG1-001")
    img = nib.load(ct)
    np.testing.assert_allclose(img.affine, meta["affine"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    side = json.loads(ct.with_name(ct.name.replace(".nii.gz", ".json")).read_text())
    assert side["patient_id"] == "1CT1" and side["modality"] == "CT" and side["dtype"] == "int16"
    assert np.allclose(side["affine"], meta["affine"])
    report = json.loads((out / "conversion_report.json").read_text())
    assert len(report["converted"]) == 2 and len(report["failed"]) == 1 and len(report["unreadable"]) == 1


def test_dicom_to_nifti_exits_2_when_nothing_converts(tmp_path):
    # Nothing convertible is a data problem the user can fix: exit 2, one line on stderr.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.dcm").write_bytes(os.urandom(500))
    proc = run_cli(tmp_path / "in", tmp_path / "out", "--workers", "1", "--no-progress")
    assert proc.returncode == 2
    assert "converted 0 series" in proc.stdout and "junk.dcm" in proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "no series could be converted" in proc.stderr


def test_a_failed_volume_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.nii.gz"
    written = []

    def broken(image, tmp):
        written.append(Path(tmp))
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken)
    with pytest.raises(OSError):
        dicom_to_nifti._write_volume(np.zeros((2, 2, 2)), {"affine": np.eye(4).tolist(), "sheared": False}, target)
    # Written beside the target under a name nibabel still gzips by, and removed on failure.
    assert written[0].parent == tmp_path and written[0].name.endswith(".nii.gz")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- windowing


def test_window_presets_and_custom_values():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])
    np.testing.assert_allclose(window(hu, preset="lung"), [0, 0, 0.5, 1, 1], atol=1e-7)
    np.testing.assert_allclose(window(np.array([-125.0, 50.0, 225.0]), preset="mediastinum"), [0, 0.5, 1])
    np.testing.assert_allclose(window(np.array([-500.0, 500.0, 1500.0]), preset="bone"), [0, 0.5, 1])
    np.testing.assert_allclose(window(np.array([0.0, 40.0, 60.0, 80.0]), preset="brain"), [0, 0.5, 0.75, 1])
    out = window(np.array([-60.0, -50.0, 0.0, 25.0, 70.0]), center=0, width=100)
    np.testing.assert_allclose(out, [0, 0, 0.5, 0.75, 1])
    assert out.dtype == np.float32
    for kwargs in ({"preset": "liver"}, {"preset": "lung", "center": 0}, {"center": 0}, {"center": 0, "width": 0}):
        with pytest.raises(ValueError):
            window(hu, **kwargs)


def test_zscore_per_volume_and_masked():
    vol = np.array([[0.0, 0.0], [10.0, 20.0]])
    z = zscore(vol)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    mask = np.array([[False, False], [True, True]])
    np.testing.assert_allclose(zscore(vol, mask), [[-3, -3], [-1, 1]], atol=1e-6)
    with pytest.raises(DataError):
        zscore(vol, np.zeros_like(mask))


def test_crop_uniform_borders():
    img = np.zeros((100, 120))
    img[20:80, 30:90] = np.arange(3600).reshape(60, 60)
    assert crop_uniform_borders(img).shape == (60, 60)
    white = np.full((50, 50, 3), 255, np.uint8)  # MONOCHROME1-style white padding, colour
    white[10:40, 5:45] = np.random.default_rng(0).integers(0, 200, (30, 40, 3))
    np.testing.assert_array_equal(crop_uniform_borders(white), white[10:40, 5:45])
    tiny = np.zeros((100, 100))
    tiny[45:55, 45:55] = np.arange(100).reshape(10, 10)
    with pytest.raises(DataError, match="99%"):
        crop_uniform_borders(tiny, max_fraction=0.7)
    assert crop_uniform_borders(tiny, max_fraction=0.995).shape == (10, 10)
    with pytest.raises(DataError):
        crop_uniform_borders(np.zeros((10, 10)))
    noisy = img + np.random.default_rng(1).uniform(0, 3, img.shape)  # JPEG-like padding noise
    assert crop_uniform_borders(noisy, tol=5).shape == (60, 60)


# ----------------------------------------------------------------- rtstruct


def test_structure_names_normalise_and_merge():
    assert normalize_name("GTV-1") == normalize_name("gtv 1") == normalize_name("Gtv_1") == "gtv1"
    assert normalize_name("Poumon Droit") == "poumondroit"
    assert normalize_name("Cœur") == normalize_name("COEUR") == "coeur"
    assert normalize_name("Moelle épinière") == "moelleepiniere"
    names = ["GTV-1", "gtv 2", "GTV_PRIMARY", "Gross Tumor Volume", "RIGHT LUNG", "Poumon D", "Lung", "Heart", "Cord"]
    name_map = {"GTV": ["gtv*", "gross tumor volume"], "Lung_R": ["right lung", "poumon d*", "lung*"],
                "Lung": ["lung*"], "PTV": []}
    m = match_structures(names, name_map)
    assert m["matched"]["GTV"] == ["GTV-1", "gtv 2", "GTV_PRIMARY", "Gross Tumor Volume"]
    assert m["matched"]["Lung_R"] == ["RIGHT LUNG", "Poumon D", "Lung"]  # first label wins ...
    assert m["ambiguous"] == {"Lung": ["Lung_R", "Lung"]}  # ... and the clash is reported
    assert m["unmatched"] == ["Heart", "Cord"]
    assert m["missing"] == ["Lung", "PTV"]


def grid(spacing=1.0, shape=(40, 40, 5)):
    # Axial grid, origin at LPS (0, 0, 0), slices every 2 mm.
    return slice_affine([1, 0, 0, 0, 1, 0], [0, 0, 0], [spacing, spacing], [0, 0, 2.0]), shape


def square(x0, x1, y0, y1, z):
    return ("CLOSED_PLANAR", np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], float))


def test_square_contour_rasterises_to_expected_voxels():
    affine, shape = grid()
    rts = RTStruct("mem", [], "", [Structure(1, "GTV-1", [square(10, 20, 5, 15, 4.0)])])
    vol, report = rasterize_rtstruct(rts, affine, shape, {"GTV": ["gtv*"]})
    assert int((vol == 1).sum()) == 100 == report["voxels"]["GTV"]
    assert vol[10:20, 5:15, 2].all()  # x = column index, y = row index, z = 4 mm / 2 mm
    fine_affine, fine_shape = grid(spacing=0.5, shape=(60, 60, 5))
    fine, _ = rasterize_rtstruct(rts, fine_affine, fine_shape, {"GTV": ["gtv*"]})
    assert int(fine.sum()) == 400  # same 100 mm^2 at 0.25 mm^2 per voxel


def test_merged_labels_holes_and_overlap_priority():
    affine, shape = grid()
    rts = RTStruct("mem", [], "", [
        Structure(1, "GTV-1", [square(0, 4, 0, 4, 0.0)]),
        Structure(2, "GTV 2", [square(30, 33, 30, 33, 2.0)]),
        Structure(3, "Lung", [square(0, 10, 0, 10, 0.0), square(6, 8, 6, 8, 0.0)]),  # inner contour = hole
        Structure(4, "Heart", [square(0, 5, 0, 5, 8.0)]),
    ])
    vol, report = rasterize_rtstruct(rts, affine, shape, {"GTV": ["gtv*"], "Lung": [], "PTV": []})
    assert report["voxels"] == {"GTV": 16 + 9, "Lung": 100 - 4 - 16, "PTV": 0}
    assert vol[1, 1, 0] == 1 and vol[7, 7, 0] == 0 and vol[31, 31, 1] == 1
    assert report["unmatched"] == ["Heart"] and report["missing"] == ["PTV"]


def test_polygon_fill_matches_matplotlib_path():
    from matplotlib.path import Path as MplPath

    rng = np.random.default_rng(7)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 25))
    radii = rng.uniform(5, 14, 25)
    xs, ys = 16.3 + radii * np.cos(angles), 15.7 + radii * np.sin(angles)  # star polygon, off-grid
    ii, jj = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    expected = MplPath(np.c_[xs, ys]).contains_points(np.c_[ii.ravel(), jj.ravel()]).reshape(32, 32)
    np.testing.assert_array_equal(polygon_mask(xs, ys, (32, 32)), expected)


def test_real_rtstruct_file():
    rts = read_rtstruct(data("rtstruct.dcm"))
    assert [s.name for s in rts.structures] == ["patient", "Isocenter 1", "Isocenter 2"]
    assert rts.referenced_series_uids == ["1.2.826.0.1.3680043.8.498.2010020400001.2.1.1"]
    affine = slice_affine([1, 0, 0, 0, 1, 0], [-250, -250, -220], [10, 10], [0, 0, 10])
    vol, report = rasterize_rtstruct(rts, affine, (51, 51, 6), {"Body": ["patient"], "Iso": ["isocenter*"]})
    # 400 x 300 mm outlines on z = -200, -190, -180 mm, 10 mm voxels.
    assert [int(vol[:, :, k].sum()) for k in range(6)] == [0, 0, 1200, 1200, 1200, 0]
    assert report["empty"] == ["Isocenter 1", "Isocenter 2"]  # points at z=0 lie outside the grid
    assert any("not on a slice" in w for w in report["warnings"])


def make_rtstruct(path: Path, series_uid: str, rois: dict[str, list]):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    series, study, frame = Dataset(), Dataset(), Dataset()
    series.SeriesInstanceUID = series_uid
    study.RTReferencedSeriesSequence = [series]
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for number, (name, contours) in enumerate(rois.items(), 1):
        roi, rc = Dataset(), Dataset()
        roi.ROINumber, roi.ROIName = number, name
        rc.ReferencedROINumber = number
        rc.ContourSequence = []
        for kind, pts in contours:
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = kind, len(pts)
            c.ContourData = [float(v) for v in pts.ravel()]
            rc.ContourSequence.append(c)
        ds.StructureSetROISequence.append(roi)
        ds.ROIContourSequence.append(rc)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_rtstruct_to_labels_finds_the_referenced_ct(tmp_path):
    uid = write_ct_series(tmp_path / "ct", z_positions(3, step=2.5, z0=-75.0))
    write_ct_series(tmp_path / "other", z_positions(2))  # a second series to choose from
    ps = float(pydicom.dcmread(data("CT_small.dcm")).PixelSpacing[0])
    x0, y0 = -158.1, -179.0  # IPP of every slice: voxel (i, j) centre = (x0 + i ps, y0 + j ps)
    gtv1 = square(x0 + 9.5 * ps, x0 + 19.5 * ps, y0 + 9.5 * ps, y0 + 19.5 * ps, -72.5)  # voxels 10..19
    gtv2 = square(x0 + 49.5 * ps, x0 + 54.5 * ps, y0 + 49.5 * ps, y0 + 54.5 * ps, -70.0)
    make_rtstruct(tmp_path / "rs.dcm", uid, {"GTV-1": [gtv1], "gtv 2": [gtv2], "Heart": [gtv1]})
    labels, report = rtstruct_to_labels(tmp_path / "rs.dcm", tmp_path, {"GTV": ["gtv*"], "Lung": ["lung*"]})
    assert report["series_instance_uid"] == uid
    assert labels.shape == (128, 128, 3) and labels.dtype == np.uint8
    assert labels[10:20, 10:20, 1].all() and labels[50:55, 50:55, 2].all()
    assert report["voxels"]["GTV"] == 100 + 25 == int(labels.sum())
    assert report["missing"] == ["Lung"] and report["unmatched"] == ["Heart"]
    _, ct_meta = load_series(tmp_path / "ct")
    np.testing.assert_allclose(report["affine"], ct_meta["affine"])
    make_rtstruct(tmp_path / "lost" / "rs.dcm", generate_uid(), {"GTV": [gtv1]})
    with pytest.raises(DataError, match="not found"):
        rtstruct_to_labels(tmp_path / "lost" / "rs.dcm", tmp_path / "ct", {"GTV": []})
    assert len(scan_dicom(tmp_path).non_image) == 2  # the RTSTRUCTs are listed, not stacked
