"""Data sources: turn a dataset layout into one sample table.

Every source returns a `SampleTable`: a DataFrame with the columns

- ``path``  absolute image path (str)
- ``label`` the raw class name (str) for classification
- ``group`` patient / lesion id (str), or the path when the layout has none
- ``split`` ``train`` / ``val`` / ``test`` where the layout fixes it, else ``""``
- ``y:<class>`` (multi-label sources only) the raw entry per class: ``1``, ``0``,
  ``-1`` (uncertain) or ``""`` (blank); ``label`` is then the rarest positive
  class of the row (or ``none``), which is what splits stratify on

plus the rows that could not be used (``missing``), so that the check pass
reports them instead of silently dropping them. No TensorFlow here for local
folders: the TFRecord converter and the config check reuse these readers. A
``gs://`` root (``csv`` and ``folders``) is listed and read through
`tfvision.remote`, which loads TensorFlow's filesystem layer for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import string
from pathlib import Path

import pandas as pd

from tfvision import remote
from tfvision.config import DataConfig
from tfvision.errors import DataError
from tfvision.registry import Registry

SOURCES = Registry("data source")
# What `decode.decode_resized` reads (DICOM through pydicom); every command lists images with these.
IMAGE_SUFFIXES = (".bmp", ".dcm", ".gif", ".jpeg", ".jpg", ".png")
SPLIT_NAMES = ("train", "val", "test")


def image_files(folder, recursive: bool = True) -> list[Path] | list[str]:
    """Image files in `folder` by suffix (any case), sorted; hidden files and folders skipped.

    >>> image_files("data/train/cat")  # doctest: +SKIP
    [PosixPath('data/train/cat/001.jpg'), PosixPath('data/train/cat/sub/002.png')]

    Args:
        folder: the folder to list.
        recursive: also list subfolders, at any depth.

    Returns:
        The paths, sorted; empty when the folder holds no image. For a URL folder
        (``gs://``), the URLs as strings.
    """
    if remote.is_url(folder):
        names = remote.files_under(folder) if recursive else [
            n for n in remote.listdir(folder) if not remote.isdir(remote.join(folder, n))]
        return [remote.join(folder, n) for n in names if _is_image(n)]
    root = Path(folder)
    found = root.rglob("*") if recursive else root.iterdir()
    # Hidden entries are editor, OS or sync debris (macOS ._x.jpg resource forks are not images).
    return sorted(p for p in found if p.is_file() and _is_image(p.relative_to(root).as_posix()))


def _is_image(relative: str) -> bool:
    # Hidden entries are editor, OS or sync debris (macOS ._x.jpg resource forks are not images).
    return (relative.lower().endswith(IMAGE_SUFFIXES)
            and not any(part.startswith(".") for part in relative.split("/")))


@dataclasses.dataclass
class SampleTable:
    frame: pd.DataFrame
    missing: list[dict] = dataclasses.field(default_factory=list)  # [{"path", "reason"}]

    def __post_init__(self):
        if self.frame.empty:
            raise DataError("the data source produced no samples")
        for col in ("path", "label", "group", "split"):
            if col not in self.frame:
                raise AssertionError(f"source forgot column {col!r}")  # a bug, not user input


def load_samples(data: DataConfig) -> SampleTable:
    """Read the configured source into a `SampleTable`."""
    return SOURCES.get(data.source)(data)


def _read_csv(path, required: list[str]) -> pd.DataFrame:
    try:  # the bytes through tfvision.remote: pandas would need gcsfs for gs:// (and knows no ram://)
        frame = pd.read_csv(io.BytesIO(remote.read_bytes(path)), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse CSV: {e}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {list(frame.columns)}")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame


def _split_rows(frame: pd.DataFrame, data: DataConfig, csv_path: Path) -> pd.Series:
    if not data.split_column:
        return pd.Series([""] * len(frame), index=frame.index)
    values = frame[data.split_column].str.strip().str.lower().replace({"valid": "val", "validation": "val"})
    bad = sorted(set(values) - set(SPLIT_NAMES))
    if bad:
        raise DataError(f"{csv_path}: column {data.split_column!r} has values {bad}; expected {list(SPLIT_NAMES)}")
    return values


def _split_missing(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    exists = frame["path"].map(remote.isfile)  # on gs://, one request per file
    if "mask" in frame:
        exists &= frame["mask"].map(remote.isfile)
    missing = [{"path": p, "reason": "file not found"} for p in frame.loc[~exists, "path"]]
    return frame.loc[exists].reset_index(drop=True), missing


def _template_paths(frame: pd.DataFrame, template: str, root: str, csv_path: str) -> pd.Series:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    absent = [f for f in fields if f not in frame.columns]
    if absent:
        raise DataError(f"data.path_template: {template!r} uses column(s) {absent} not in {csv_path}")
    return frame.apply(lambda row: remote.join(root, template.format(**row.to_dict())), axis=1)


Y = "y:"  # prefix of the raw multi-label columns


def _raw_entry(v: str) -> str:
    """Normalise a CheXpert-style cell: '1.0' -> '1', '-1.0' -> '-1', 'nan'/'' -> ''."""
    v = str(v).strip()
    if v.lower() in ("", "nan", "none"):
        return ""
    try:
        return str(int(float(v)))
    except ValueError:
        raise DataError(f"multi-label value {v!r} is not 1, 0, -1 or blank") from None


def add_multilabel_columns(out: pd.DataFrame, frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Copy raw per-class entries as ``y:<class>`` and set ``label`` to the rarest positive class."""
    for c in columns:
        out[Y + c] = frame[c].map(_raw_entry).to_numpy()
    positives = out[[Y + c for c in columns]] == "1"
    rarity = positives.sum().rank(method="first").to_dict()  # rarest class has rank 1
    order = sorted(columns, key=lambda c: rarity[Y + c])
    label = pd.Series("none", index=out.index)
    for c in reversed(order):  # rarest last, so it wins
        label = label.mask(positives[Y + c], c)
    out["label"] = label
    return out


def _csv_frame(data: DataConfig, csv_rel: str, split: str | None) -> pd.DataFrame:
    root = data.root
    csv_path = remote.join(root, csv_rel)
    multilabel = bool(data.label_columns)
    required = list(data.label_columns) if multilabel else [] if data.mask_column else [data.label_column]
    if not data.path_template:
        required.append(data.path_column)
    if data.group_column:
        required.append(data.group_column)
    if data.split_column and split is None:
        required.append(data.split_column)
    if data.mask_column:
        required.append(data.mask_column)
    frame = _read_csv(csv_path, required)
    if data.path_template:
        paths = _template_paths(frame, data.path_template, root, csv_path)
    else:
        paths = frame[data.path_column].map(lambda p: remote.join(root, p))
    out = pd.DataFrame(
        {
            "path": paths,
            "label": "" if multilabel or data.mask_column else frame[data.label_column].astype(str),
            "group": frame[data.group_column].astype(str) if data.group_column else paths,
            "split": split if split is not None else _split_rows(frame, data, csv_path),
        }
    )
    if multilabel:
        return add_multilabel_columns(out, frame, data.label_columns)
    if data.mask_column:  # segmentation: the label image travels with the image
        out["mask"] = frame[data.mask_column].map(lambda p: remote.join(root, p)).to_numpy()
        out["label"] = "image"
        return out
    empty = out["label"].str.strip() == ""
    if empty.any():
        raise DataError(f"{csv_path}: {int(empty.sum())} row(s) have an empty {data.label_column!r}")
    return out


@SOURCES.register("csv")
def csv_source(data: DataConfig) -> SampleTable:
    """Generic CSV: path (or a template over columns), label, optional group and split."""
    frame = _csv_frame(data, data.csv, "train" if data.val_csv else None)
    if data.val_csv:
        frame = pd.concat([frame, _csv_frame(data, data.val_csv, "val")], ignore_index=True)
    frame, missing = _split_missing(frame)
    if frame.empty:
        where = f"template {data.path_template!r}" if data.path_template else f"column {data.path_column!r}"
        raise DataError(f"data.root: no image named by {where} exists under {data.root}")
    return SampleTable(frame, missing)


@SOURCES.register("ham10000")
def ham10000_source(data: DataConfig) -> SampleTable:
    """HAM10000: HAM10000_metadata.csv + ISIC_*.jpg spread over one or more folders.

    Groups are `lesion_id`, so several photos of one lesion never straddle splits.
    """
    root = Path(data.root)
    csv_path = root / (data.csv or "HAM10000_metadata.csv")
    if not csv_path.is_file():
        raise DataError(f"data.root: {csv_path} not found (the HAM10000 metadata CSV)")
    frame = _read_csv(csv_path, ["lesion_id", "image_id", "dx"])
    dirs = [root / d for d in data.image_dirs] or [root]
    index: dict[str, str] = {}
    for d in dirs:
        for p in image_files(d):
            if p.name.startswith("ISIC_"):
                index.setdefault(p.stem, str(p))
    paths = frame["image_id"].map(lambda i: index.get(i, str(dirs[0] / f"{i}.jpg")))
    out = pd.DataFrame(
        {"path": paths, "label": frame["dx"], "group": frame["lesion_id"], "split": _split_rows(frame, data, csv_path)}
    )
    out, missing = _split_missing(out)
    if out.empty:
        raise DataError(f"data.root: none of the {len(frame)} ISIC_*.jpg images was found under {dirs}")
    return SampleTable(out, missing)


@SOURCES.register("folders")
def folders_source(data: DataConfig) -> SampleTable:
    """Class-per-folder: root/train/<class>/*.jpg (+ val/, test/), or root/<class>/*.jpg."""
    root = data.root
    split_dirs = [(s, remote.join(root, s)) for s in SPLIT_NAMES if remote.isdir(remote.join(root, s))]
    if not split_dirs:
        split_dirs = [("", root)]
    rows = []
    for split, base in split_dirs:
        for name in remote.listdir(base):
            if remote.isdir(class_dir := remote.join(base, name)):
                rows += [(str(p), name, str(p), split) for p in image_files(class_dir)]
    if not rows:
        raise DataError(f"data.root: no images in class folders under {root}")
    return SampleTable(pd.DataFrame(rows, columns=["path", "label", "group", "split"]))


CHEXPERT_CLASSES = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
_PATIENT = r"(patient\d+)"


@SOURCES.register("chexpert")
def chexpert_source(data: DataConfig) -> SampleTable:
    """CheXpert (Kaggle downsampled layout): root holds ``CheXpert-v1.0-small/``.

    ``train.csv`` and ``valid.csv`` carry ``Path``, ``Frontal/Lateral``, ``AP/PA`` and the 14
    findings (1, 0, -1 uncertain, blank). The patient id is parsed from the path, so every
    split is patient-wise. ``valid.csv`` becomes the val split unless ``data.val_csv`` names another.
    """
    root = Path(data.root)
    classes = data.label_columns or CHEXPERT_CLASSES
    csvs = [(data.csv or "CheXpert-v1.0-small/train.csv", None)]
    val = data.val_csv or "CheXpert-v1.0-small/valid.csv"
    if (root / val).is_file():
        csvs = [(csvs[0][0], "train"), (val, "val")]
    parts = []
    for rel, split in csvs:
        path = root / rel
        if not path.is_file():
            raise DataError(f"data.root: {path} not found (expected the CheXpert-v1.0-small layout)")
        frame = _read_csv(path, ["Path", "Frontal/Lateral", "AP/PA", *classes])
        if data.views == "frontal":
            frame = frame[frame["Frontal/Lateral"] == "Frontal"]
        elif data.views == "ap_pa":
            frame = frame[frame["AP/PA"].isin(["AP", "PA"])]
        patients = frame["Path"].str.extract(_PATIENT, expand=False)
        if patients.isna().any():
            bad = frame["Path"][patients.isna()].iloc[0]
            raise DataError(f"{path}: cannot find a patient id (patientNNNNN) in path {bad!r}")
        out = pd.DataFrame({"path": frame["Path"].map(lambda p: str(root / p)), "label": "",
                            "group": patients, "split": split or ""})
        parts.append(add_multilabel_columns(out, frame, classes))
    out = pd.concat(parts, ignore_index=True)
    out, missing = _split_missing(out)
    if out.empty:
        raise DataError(f"data.root: none of the CheXpert images listed was found under {root}")
    return SampleTable(out, missing)


@SOURCES.register("volumes")
def volumes_source(data: DataConfig) -> SampleTable:
    """Image volumes (NIfTI or DICOM series folders) + label volumes, listed in a CSV
    (``path_column``, ``mask_column``, ``group_column`` = patient), cut into 2D slices once
    and cached under ``data.derived_dir/slices/``. A volume that fails is reported and skipped."""
    from tfvision.medical.slices import slice_cache, volume_to_slices

    root = Path(data.root)
    csv_path = root / data.csv
    required = [data.path_column, data.mask_column] + ([data.group_column] if data.group_column else [])
    frame = _read_csv(csv_path, required)
    key = {"csv": str(csv_path.resolve()), "csv_sha": _sha(csv_path), "windows": data.windows,
           "axis": data.slice_axis, "empty": data.empty_slices, "ratio": data.empty_ratio, "format": 1}

    def build(out: Path):
        rows, failed = [], []
        for i, r in frame.iterrows():
            patient = str(r[data.group_column]) if data.group_column else f"volume{i:04d}"
            try:
                rows += volume_to_slices(root / r[data.path_column], root / r[data.mask_column], out, patient,
                                         data.windows, axis=data.slice_axis, empty=data.empty_slices,
                                         empty_ratio=data.empty_ratio, seed=i)
            except (DataError, OSError, ValueError) as e:
                failed.append({"path": str(root / r[data.path_column]), "reason": str(e)})
        pd.DataFrame(rows, columns=["path", "mask", "group", "slice", "label"]).to_csv(out / "slices.csv", index=False)
        (out / "failed.json").write_text(json.dumps(failed))

    cache = slice_cache(data.derived_dir, key, build)
    slices = pd.read_csv(cache / "slices.csv", dtype=str, keep_default_na=False)
    failed = json.loads((cache / "failed.json").read_text())
    if slices.empty:
        raise DataError(f"data.csv: no slices could be made from {csv_path}: {failed[:3]}")
    out = pd.DataFrame({"path": slices["path"].map(lambda p: str(cache / p)), "label": slices["label"],
                        "group": slices["group"], "split": "",
                        "mask": slices["mask"].map(lambda p: str(cache / p))})
    return SampleTable(out, failed)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
