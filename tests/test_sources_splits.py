"""Sources read each layout into one table; splits are seeded and never leak a group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests import layouts
from tests.conftest import jpeg_bytes, photo
from tfvision.config import DataConfig, SplitConfig
from tfvision.data.sources import load_samples
from tfvision.data.splits import assign_splits, holdout_mask, leaked_groups
from tfvision.errors import DataError


def test_csv_source_with_template_resolves_paths(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "images" / f"image_{i}_product_{100 + i}.jpg").write_bytes(jpeg_bytes(photo(i, 16)))
        rows.append({"imageid": i, "productid": 100 + i, "prdtypecode": 10 * (i % 2)})
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    data = DataConfig(source="csv", root=str(tmp_path), csv="train.csv", label_column="prdtypecode",
                      group_column="productid",
                      path_template="images/image_{imageid}_product_{productid}.jpg")
    table = load_samples(data)
    assert table.frame["path"].tolist() == [
        str(tmp_path / "images" / f"image_{i}_product_{100 + i}.jpg") for i in range(6)]
    assert table.frame["label"].tolist() == ["0", "10"] * 3
    assert table.frame["group"].tolist() == [str(100 + i) for i in range(6)]


def test_csv_source_errors_name_the_problem(tmp_path):
    pd.DataFrame({"file": ["a.jpg"], "label": ["x"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['path'\]"):
        load_samples(DataConfig(source="csv", root=str(tmp_path), csv="t.csv"))
    with pytest.raises(DataError, match="uses column"):
        load_samples(DataConfig(source="csv", root=str(tmp_path), csv="t.csv", path_template="{nope}.jpg"))
    with pytest.raises(DataError, match="no image named by template"):
        load_samples(DataConfig(source="csv", root=str(tmp_path), csv="t.csv", path_template="{file}"))


def test_csv_source_lists_missing_files_and_reads_val_csv(tmp_path):
    for n in ("a", "b", "c"):
        (tmp_path / f"{n}.jpg").write_bytes(jpeg_bytes(photo(1, 16)))
    pd.DataFrame({"path": ["a.jpg", "gone.jpg", "b.jpg"], "label": ["x", "y", "y"]}).to_csv(
        tmp_path / "train.csv", index=False)
    pd.DataFrame({"path": ["c.jpg"], "label": ["x"]}).to_csv(tmp_path / "val.csv", index=False)
    table = load_samples(DataConfig(source="csv", root=str(tmp_path), csv="train.csv", val_csv="val.csv"))
    assert table.missing == [{"path": str(tmp_path / "gone.jpg"), "reason": "file not found"}]
    assert table.frame["split"].tolist() == ["train", "train", "val"]


def test_ham10000_layout_over_two_folders(tmp_path):
    root = layouts.ham10000(tmp_path, per_class=4).root
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    missing = {"lesion_id": "HAM_9", "image_id": "ISIC_9999999", "dx": "nv"}
    pd.concat([meta, pd.DataFrame([missing])]).to_csv(root / "HAM10000_metadata.csv", index=False)
    dirs = ["HAM10000_images_part_1", "HAM10000_images_part_2"]
    table = load_samples(DataConfig(source="ham10000", root=str(root), image_dirs=dirs))
    assert len(table.frame) == len(meta) == 12
    assert {Path(p).parent.name for p in table.frame["path"]} == set(dirs)
    assert set(table.frame["group"]) == set(meta["lesion_id"])
    assert table.missing[0]["path"].endswith("ISIC_9999999.jpg")


def test_folders_layout_with_val(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                (d / f"{i}.jpg").write_bytes(jpeg_bytes(photo(i, 16)))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    frame = load_samples(DataConfig(source="folders", root=str(tmp_path))).frame
    assert len(frame) == 8
    assert (frame.groupby("split")["label"].value_counts() == 2).all()


def _frame(n=400, n_groups=80, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n).astype(str)
    # Labels depend on the group, like lesions with one diagnosis.
    labels = np.array([str(int(g) % n_classes) for g in groups])
    return pd.DataFrame({"path": [f"p{i}" for i in range(n)], "label": labels, "group": groups, "split": ""})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_grouped_split_never_leaks_a_group(seed):
    out = assign_splits(_frame(seed=seed), SplitConfig(method="grouped", val_fraction=0.2, test_fraction=0.1),
                        seed=seed)
    assert leaked_groups(out) == set()
    assert set(out["split"]) == {"train", "val", "test"}
    assert 0.1 < (out["split"] == "val").mean() < 0.3


def test_stratified_split_keeps_class_proportions_and_is_reproducible():
    frame = _frame()
    a = assign_splits(frame, SplitConfig(method="stratified", val_fraction=0.25), seed=7)
    b = assign_splits(frame, SplitConfig(method="stratified", val_fraction=0.25), seed=7)
    c = assign_splits(frame, SplitConfig(method="stratified", val_fraction=0.25), seed=8)
    assert a["split"].tolist() == b["split"].tolist() != c["split"].tolist()
    overall = frame["label"].value_counts(normalize=True).sort_index()
    val = a[a["split"] == "val"]["label"].value_counts(normalize=True).sort_index()
    assert np.abs(overall - val).max() < 0.03


def test_kfold_folds_partition_the_data():
    frame = _frame()
    labels, groups = frame["label"].to_numpy(), frame["group"].to_numpy()
    masks = [holdout_mask(labels, groups, "grouped", n_folds=5, fold=k, seed=3) for k in range(5)]
    assert (np.sum(masks, axis=0) == 1).all()  # every row in exactly one fold
    for m in masks:
        assert not set(groups[m]) & set(groups[~m])


def test_preassigned_splits_are_kept():
    frame = _frame()
    frame.loc[:49, "split"] = "val"
    out = assign_splits(frame, SplitConfig(), seed=0)
    assert (out.loc[:49, "split"] == "val").all() and (out.loc[50:, "split"] == "train").all()


def test_image_files_is_the_one_listing(tmp_path):
    # Every command lists images through this: by suffix in any case (DICOM too), sorted,
    # hidden files and folders left out, recursion optional.
    from tfvision.data.sources import IMAGE_SUFFIXES, image_files

    assert ".dcm" in IMAGE_SUFFIXES
    for rel in ["b.JPG", "a.png", "x.dcm", "notes.txt", ".hidden.jpg", "sub/c.jpeg", ".git/d.png", "sub/._e.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()  # a folder named like an image is not one
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == [
        "a.png", "b.JPG", "sub/c.jpeg", "x.dcm"]
    assert [p.name for p in image_files(tmp_path, recursive=False)] == ["a.png", "b.JPG", "x.dcm"]


def test_builtin_datasets_use_the_registry_type(monkeypatch):
    from tfvision.data import builtin
    from tfvision.registry import Registry

    assert isinstance(builtin.PREPARERS, Registry) and "sklearn_digits" in builtin.PREPARERS
    with pytest.raises(KeyError, match="did you mean 'sklearn_digits'"):
        builtin.PREPARERS.get("sklearn_digit")
    monkeypatch.setitem(builtin.PREPARERS, "probe", print)  # how tests stand in a preparer
    assert builtin.PREPARERS.get("probe") is print
    monkeypatch.undo()
    assert "probe" not in builtin.PREPARERS
