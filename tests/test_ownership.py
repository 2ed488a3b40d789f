"""What tfvision may write: only folders it made, never its inputs; derived data in the cache.

The fault table (test_faults.py) runs every command against a user's folder; these tests
pin the rules themselves and the cases users reported (the demo config pointed at one's
own data deleted it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO, checksums, run_cli

from tfvision.errors import UserError


def _user_folder(path: Path) -> dict[str, str]:
    (path / "sub").mkdir(parents=True)
    (path / "digits.csv").write_text("path,label\nmine.png,1\n")
    (path / "sub" / "scan.bin").write_bytes(os.urandom(2000))
    return checksums(path)


def test_demo_config_pointed_at_a_users_folder_leaves_it_alone(tmp_path):
    # The reported bug: data.prepare still set, data.root moved to the user's data.
    mine = tmp_path / "MY_DATA"
    before = _user_folder(mine)
    proc = run_cli("-m", "tfvision.train", "--config", str(REPO / "configs" / "demo.json"),
                   "--set", f"data.root={mine}", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "drop data.prepare" in proc.stderr and str(mine) in proc.stderr
    assert checksums(mine) == before and not (tmp_path / "run").exists()


def test_prepare_builds_into_new_or_empty_folders_and_reuses_its_own(tmp_path, monkeypatch):
    from tfvision.data import builtin

    calls = []
    monkeypatch.setitem(builtin.PREPARERS, "probe", lambda root: calls.append(root) or (root / "x.txt").write_text("1"))
    (tmp_path / "empty").mkdir()
    for name in ("new", "empty"):
        root = builtin.prepare("probe", tmp_path / name)
        assert (root / "x.txt").read_text() == "1" and (root / builtin.MARKER).is_file()
    builtin.prepare("probe", tmp_path / "new")  # complete: reused, not rebuilt
    assert len(calls) == 2
    before = _user_folder(tmp_path / "mine")
    with pytest.raises(UserError, match="drop data.prepare"):
        builtin.prepare("probe", tmp_path / "mine")
    assert checksums(tmp_path / "mine") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "new"]  # no temp left behind


def test_prepare_without_root_builds_in_the_cache():
    from tfvision.config_loader import config_from_dict

    cfg = config_from_dict({"data": {"source": "csv", "prepare": "sklearn_digits", "csv": "digits.csv"},
                            "model": {"backbone": "small_cnn"}})
    assert Path(cfg.data.root) == Path(os.environ["TFVISION_CACHE"]) / "datasets" / "sklearn_digits"


def test_derived_dir_is_per_dataset_in_the_user_cache_unless_set(tmp_path):
    from tfvision.config import DataConfig

    a = DataConfig(source="csv", root=str(tmp_path / "a"), csv="x.csv")
    b = DataConfig(source="csv", root=str(tmp_path / "b"), csv="x.csv")
    cache = Path(os.environ["TFVISION_CACHE"])
    assert a.derived_dir.parent == cache == b.derived_dir.parent and a.derived_dir != b.derived_dir
    assert not a.derived_dir.is_relative_to(tmp_path)
    assert DataConfig(source="csv", root=str(tmp_path), cache_dir=str(tmp_path / "c")).derived_dir == tmp_path / "c"


def test_replace_dir_replaces_only_its_own_folders(tmp_path):
    from tfvision.fileio import replace_dir, temp_dir_beside

    final = tmp_path / "out"
    for round_ in range(2):  # new, then an earlier one of ours
        tmp = temp_dir_beside(final)
        (tmp / "report.json").write_text(str(round_))
        replace_dir(tmp, final, "report.json", "refused")
        assert (final / "report.json").read_text() == str(round_)
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    tmp = temp_dir_beside(mine)
    (tmp / "report.json").write_text("x")
    with pytest.raises(UserError, match="refused"):
        replace_dir(tmp, mine, "report.json", "refused")
    assert checksums(mine) == before


def test_owned_output_replaces_what_it_wrote_and_nothing_else(tmp_path):
    from tfvision.fileio import owned_output

    out = tmp_path / "preds.csv"
    for text in ("a\n", "b\n"):  # a rerun replaces its own file
        with owned_output(out, "--output") as tmp:
            tmp.write_text(text)
        assert out.read_text() == text
    out.write_text("edited by hand\n")  # no longer what tfvision wrote: the user's now
    with pytest.raises(UserError, match="--output: .* did not write it"), owned_output(out, "--output") as tmp:
        tmp.write_text("c\n")
    assert out.read_text() == "edited by hand\n"
    theirs = tmp_path / "sample_submission.csv"
    theirs.write_text("id,label\n")
    with pytest.raises(UserError), owned_output(theirs, "--output") as tmp:
        tmp.write_text("c\n")
    assert theirs.read_text() == "id,label\n"


def test_outputs_inside_an_input_folder_are_refused(tmp_path):
    from tfvision.fileio import check_output_outside

    (tmp_path / "data").mkdir()
    for inside in (tmp_path / "data", tmp_path / "data" / "runs" / "x"):
        with pytest.raises(UserError, match="inside the input folder"):
            check_output_outside(inside, [tmp_path / "data"], "--output")
    check_output_outside(tmp_path / "data-out", [tmp_path / "data"], "--output")  # a sibling is fine


def test_volume_slices_go_to_the_cache_with_sanitised_patient_folders(tmp_path):
    """A patient id like ../x or /abs must not write outside the cache; the root stays untouched."""
    pytest.importorskip("nilearn.datasets")
    import pandas as pd

    from tests.layouts import mni_volumes
    from tfvision.config import DataConfig
    from tfvision.data.sources import load_samples

    root = mni_volumes(tmp_path / "in", n_patients=2).root
    frame = pd.read_csv(root / "volumes.csv")
    frame["patient"] = ["../escape", "/abs/olute"]
    frame.to_csv(root / "volumes.csv", index=False)
    before = checksums(root)
    data = DataConfig(source="volumes", root=str(root), csv="volumes.csv", path_column="image",
                      mask_column="mask", group_column="patient", class_names=["background", "brain"],
                      image_size=32, empty_slices="drop", cache_dir=str(tmp_path / "cache" / "ds"))
    table = load_samples(data)
    assert set(table.frame["group"]) == {"../escape", "/abs/olute"}  # grouping keeps the real ids
    cache = (tmp_path / "cache" / "ds").resolve()
    for p in [*table.frame["path"], *table.frame["mask"]]:
        assert Path(p).resolve().is_relative_to(cache), p
    assert checksums(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "in"]  # nothing escaped
    assert not Path("/abs").exists()
    shutil.rmtree(tmp_path / "cache")
    assert len(load_samples(data).frame) == len(table.frame)  # a deleted cache only costs a rebuild


def test_dicom_to_nifti_refuses_an_output_inside_its_input(tmp_path):
    from pydicom.data import get_testdata_file

    src = tmp_path / "dicom"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), src / "ct.dcm")
    before = checksums(src)
    proc = run_cli("-m", "tfvision.medical.dicom_to_nifti", str(src), str(src / "nifti"), "--no-progress")
    assert proc.returncode == 2 and "inside the input folder" in proc.stderr
    assert checksums(src) == before
