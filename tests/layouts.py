"""Tiny datasets in the real on-disk layouts of the shipped configs, built from real images
that ship inside installed packages (nothing downloaded, nothing committed).

Each builder writes under the folder it is given and returns a `Layout`: the folder to pass
as ``data.root`` and the input a user would hand to ``predict`` (an image folder, or a volume).
Classes get different source photos, so there is something to learn, but these sets exist to
exercise each layout's path through tfvision, not to reach an accuracy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tests.conftest import jpeg_bytes


@dataclasses.dataclass(frozen=True)
class Layout:
    root: Path  # data.root
    predict_input: Path  # an image folder for predict --input-dir, or a volume for --volume


def _sklearn(name):
    from sklearn.datasets import load_sample_image

    return lambda: load_sample_image(name)


def _skimage(name):
    def load():
        from skimage import data

        return getattr(data, name)()

    return load


# Colour photos (3 channels) and grey ones (2-D), all bundled with scikit-learn / scikit-image.
COLOUR = {"china": _sklearn("china.jpg"), "flower": _sklearn("flower.jpg"), "astronaut": _skimage("astronaut"),
          "coffee": _skimage("coffee"), "chelsea": _skimage("chelsea"), "rocket": _skimage("rocket")}
GREY = {"camera": _skimage("camera"), "moon": _skimage("moon"), "coins": _skimage("coins"),
        "brick": _skimage("brick"), "cell": _skimage("cell")}


def crop(source: np.ndarray, seed: int, size: int | tuple[int, int] = 64) -> np.ndarray:
    """A random crop of about half the photo's shorter side, resized to `size` (W, H)."""
    rng = np.random.default_rng(seed)
    side = min(source.shape[:2]) // 2
    y = rng.integers(0, source.shape[0] - side)
    x = rng.integers(0, source.shape[1] - side)
    size = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(source[y : y + side, x : x + side]).resize(size, Image.BILINEAR))


# --------------------------------------------------------------------------- classification


def sklearn_digits(base: Path) -> Layout:
    """The demo's own dataset: `data.prepare` builds it into this (fresh) folder during training."""
    root = base / "sklearn_digits"
    return Layout(root, root / "images")


def ham10000(base: Path, per_class: int = 12) -> Layout:
    """``HAM10000_metadata.csv`` (lesion_id, image_id, dx, ...) + ``ISIC_*.jpg`` spread over the two
    image folders of the Kaggle download; most lesions have two photos, like the real set."""
    root = base / "HAM10000"
    dirs = [root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"]
    for d in dirs:
        d.mkdir(parents=True)
    rows, n = [], 0
    for dx, source in zip(("bkl", "mel", "nv"), ("coffee", "chelsea", "astronaut"), strict=True):
        photo = COLOUR[source]()
        for i in range(per_class):
            image_id = f"ISIC_{24306 + n:07d}"
            # The real images are 600x450; 64x48 keeps the aspect ratio.
            (dirs[n % 2] / f"{image_id}.jpg").write_bytes(jpeg_bytes(crop(photo, n, (64, 48))))
            rows.append({"lesion_id": f"HAM_{dx}_{i // 2:04d}", "image_id": image_id, "dx": dx,
                         "dx_type": "histo", "age": 40.0 + i, "sex": "male", "localization": "back"})
            n += 1
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    return Layout(root, dirs[1])


def rakuten(base: Path, per_class: int = 10) -> Layout:
    """Rakuten: ``train.csv`` with ``imageid``, ``productid``, ``prdtypecode`` and product photos at
    ``images/image_train/image_{imageid}_product_{productid}.jpg`` (the config's path_template);
    ``images/image_test/`` holds unlabelled photos, as in the challenge download."""
    root = base / "rakuten"
    train, test = root / "images" / "image_train", root / "images" / "image_test"
    train.mkdir(parents=True)
    test.mkdir(parents=True)
    rows, n = [], 0
    for code, source in zip((10, 1160, 2280, 2583), ("china", "flower", "rocket", "coffee"), strict=True):
        photo = COLOUR[source]()
        for i in range(per_class + 2):
            imageid, productid = 1263597046 + n, 3804725264 + 7 * n
            name = f"image_{imageid}_product_{productid}.jpg"
            if i < per_class:
                (train / name).write_bytes(jpeg_bytes(crop(photo, n)))
                rows.append({"designation": f"product {n}", "productid": productid, "imageid": imageid,
                             "prdtypecode": code})
            else:
                (test / name).write_bytes(jpeg_bytes(crop(photo, n)))
            n += 1
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return Layout(root, test)


def aptos(base: Path, per_grade: int = 10) -> Layout:
    """APTOS 2019 blindness detection: ``train.csv`` (``id_code``, ``diagnosis`` 0-4) and
    ``train_images/<id_code>.png``; ``test_images/`` holds unlabelled photos, as in the download."""
    root = base / "aptos2019-blindness-detection"
    train, test = root / "train_images", root / "test_images"
    train.mkdir(parents=True)
    test.mkdir(parents=True)
    rows, n = [], 0
    for grade, source in enumerate(("china", "flower", "astronaut", "coffee", "chelsea")):
        photo = COLOUR[source]()
        for i in range(per_grade + 1):
            id_code = f"{0x000C1434D8D7 + 977 * n:012x}"  # 12 hex digits, like the real ids
            Image.fromarray(crop(photo, n)).save((train if i < per_grade else test) / f"{id_code}.png")
            if i < per_grade:
                rows.append({"id_code": id_code, "diagnosis": grade})
            n += 1
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return Layout(root, test)


CHEXPERT_VIEWS = (("frontal", "Frontal", "AP"), ("lateral", "Lateral", ""))


def chexpert(base: Path, classes, n_patients: int = 12, n_valid: int = 2, rates=None, seed: int = 0) -> Layout:
    """The Kaggle "CheXpert-v1.0-small" tree: ``{train,valid}/patientNNNNN/studyK/view1_{frontal,lateral}.jpg``
    with ``train.csv`` and ``valid.csv`` (Path, Sex, Age, Frontal/Lateral, AP/PA, one column per class:
    1.0, 0.0, -1.0 or blank). Grey photos stand in for the X-rays; the last `n_valid` patients are
    ``valid``. `rates` gives each class's positive rate (the rest is split over 0, -1 and blank)."""
    root = base / "chexpert"
    rng = np.random.default_rng(seed)
    greys = [load() for load in GREY.values()]
    rates = rates or {}
    rows = {"train": [], "valid": []}
    for p in range(n_patients):
        split = "valid" if p >= n_patients - n_valid else "train"
        for study in range(2):
            for view, lat, appa in CHEXPERT_VIEWS:
                rel = f"CheXpert-v1.0-small/{split}/patient{p:05d}/study{study + 1}/view1_{view}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(jpeg_bytes(crop(greys[p % len(greys)], p * 4 + study, 32)))
                labels = {}
                for c in classes:
                    pos = rates.get(c, 0.3)
                    rest = (1.0 - pos) / 3
                    labels[c] = rng.choice(["1.0", "0.0", "-1.0", ""], p=[pos, rest, rest, rest])
                rows[split].append({"Path": rel, "Sex": "F", "Age": 50 + p, "Frontal/Lateral": lat, "AP/PA": appa,
                                    **labels})
    for split, r in rows.items():
        pd.DataFrame(r).to_csv(root / "CheXpert-v1.0-small" / f"{split}.csv", index=False)
    return Layout(root, root / "CheXpert-v1.0-small" / "valid")


# --------------------------------------------------------------------------- volumes


def _mni():
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    masks = {name: np.asarray(getattr(datasets, f"load_mni152_{name}_mask")(resolution=2).get_fdata()) > 0.5
             for name in ("brain", "gm", "wm")}
    return np.asarray(tpl.get_fdata(), np.float32), masks, tpl.affine.copy()


def _organs(image: np.ndarray, masks: dict) -> tuple[np.ndarray, np.ndarray]:
    """Six labels in the NSCLC config's order (background, GTV, Lung, Heart, Esophagus, SpinalCord)
    from the template's own anatomy, and a brighter "tumour" ball so label 1 is visible."""
    labels = np.zeros(image.shape, np.uint8)
    labels[image > 0.2] = 5  # scalp and skull
    labels[masks["brain"]] = 4
    labels[masks["gm"]] = 3
    labels[masks["wm"]] = 2
    i, j, k = np.indices(image.shape)
    ball = (i - 50) ** 2 + (j - 60) ** 2 + (k - 36) ** 2 < 7**2  # inside the brain, axial slices 30-42
    labels[ball] = 1
    return np.where(ball, image + 0.3, image), labels


def mni_volumes(base: Path, n_patients: int = 3, z: tuple[int, int] = (20, 60), organs: bool = False) -> Layout:
    """NIfTI CT-like volumes + label volumes listed in ``volumes.csv`` (image, mask, patient), from
    nilearn's bundled MNI152 template: patient 0 is the template, the others flipped and shifted
    copies. Intensities are mapped to a CT-like range (air -1000 HU) so CT windows apply.
    Labels: 0 background, 1 brain; with `organs`, the six classes of the NSCLC config."""
    import nibabel as nib

    root = base / "volumes"
    root.mkdir(parents=True)
    image, masks, affine = _mni()
    if organs:
        image, labels = _organs(image, masks)
    else:
        labels = masks["brain"].astype(np.uint8)
    image, labels = image[:, :, z[0] : z[1]], labels[:, :, z[0] : z[1]]
    rows = []
    for i in range(n_patients):
        img, lab = (image[::-1], labels[::-1]) if i % 2 else (image, labels)
        shift = 6 * (i // 2)
        img, lab = np.roll(img, shift, 1), np.roll(lab, shift, 1)
        nib.save(nib.Nifti1Image(img * 1400.0 - 1000.0, affine), root / f"p{i}_ct.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), root / f"p{i}_seg.nii.gz")
        rows.append({"image": f"p{i}_ct.nii.gz", "mask": f"p{i}_seg.nii.gz", "patient": f"patient{i}"})
    pd.DataFrame(rows).to_csv(root / "volumes.csv", index=False)
    return Layout(root, root / "p0_ct.nii.gz")


# --------------------------------------------------------------------------- instance segmentation

SHAPE_CLASSES = ("disc", "square", "triangle")


def _shape_mask(kind: str, size: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]] + 0.5
    if kind == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    if kind == "square":
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    return (yy <= cy + r * 0.8) & (yy - (cy - r) >= 2 * np.abs(xx - cx))  # apex up


def shapes_image(seed: int, size: tuple[int, int] = (64, 64), count: tuple[int, int] = (2, 5)):
    """A grey photo crop with 2-4 translucent shapes of three classes, some overlapping.

    Translucent, so that where two shapes overlap both stay visible and both masks are
    true there: the overlapping ground truth that per-instance masks allow.

    Returns:
        (image [H, W, 3] uint8, masks [N, H, W] bool, classes [N] int).
    """
    rng = np.random.default_rng(seed)
    image = crop(GREY["camera"](), seed, (size[1], size[0])).astype(np.float32)[..., None].repeat(3, -1) * 0.4
    colours = {"disc": (255, 60, 60), "square": (60, 255, 60), "triangle": (80, 120, 255)}
    masks, classes = [], []
    for _ in range(rng.integers(*count)):
        k = int(rng.integers(len(SHAPE_CLASSES)))
        r = rng.uniform(0.12, 0.22) * min(size)
        cy, cx = rng.uniform(r, size[0] - r), rng.uniform(r, size[1] - r)
        mask = _shape_mask(SHAPE_CLASSES[k], size, cy, cx, r)
        image[mask] = 0.45 * image[mask] + 0.55 * np.array(colours[SHAPE_CLASSES[k]], np.float32)
        masks.append(mask)
        classes.append(k)
    return image.clip(0, 255).astype(np.uint8), np.array(masks), np.array(classes)


def sartorius(base: Path, n_images: int = 24, size: tuple[int, int] = (64, 96)) -> Layout:
    """Sartorius cell instance segmentation: ``train.csv`` (``id, annotation, width, height, cell_type``,
    one row-major RLE per instance, 1-based) and grey ``train/<id>.png``; ``test/`` holds unlabelled
    images, as in the download. The cells are the translucent shapes of `shapes_image`."""
    from tfvision.data import rle

    root = base / "sartorius-cell-instance-segmentation"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for i in range(n_images + 3):
        image, masks, classes = shapes_image(i, size)
        name = f"{0x0030FD0E6378 + 7919 * i:012x}"
        grey = Image.fromarray(image).convert("L")
        if i >= n_images:
            grey.save(root / "test" / f"{name}.png")
            continue
        grey.save(root / "train" / f"{name}.png")
        for mask, k in zip(masks, classes, strict=True):
            rows.append({"id": name, "annotation": rle.encode(mask, order="C"), "width": size[1],
                         "height": size[0], "cell_type": ("astro", "cort", "shsy5y")[k]})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return Layout(root, root / "test")


def coco_instances(base: Path, n_train: int = 20, n_val: int = 6, size: tuple[int, int] = (64, 64)) -> Layout:
    """COCO 2017's layout: ``annotations/instances_{train,val}2017.json`` (compressed RLE segmentations
    with ``area``, ``bbox``, ``iscrowd``; the reader's polygon path is tested in test_instance_data)
    and ``train2017/``, ``val2017/`` images named by id; ``test2017/`` holds unlabelled images."""
    from tfvision.data import rle

    root = base / "coco"
    for d in ("train2017", "val2017", "test2017", "annotations"):
        (root / d).mkdir(parents=True)
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SHAPE_CLASSES)]
    counts, n, annotation_id = {"train2017": n_train, "val2017": n_val, "test2017": 3}, 0, 0
    for split, count in counts.items():
        images, annotations = [], []
        for _ in range(count):
            n += 1
            image, masks, classes = shapes_image(100 + n, size)
            name = f"{n:012d}.jpg"
            (root / split / name).write_bytes(jpeg_bytes(image))
            images.append({"id": n, "file_name": name, "height": size[0], "width": size[1]})
            for mask, k in zip(masks, classes, strict=True):
                annotation_id += 1
                ys, xs = np.nonzero(mask)
                box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
                annotations.append({"id": annotation_id, "image_id": n, "category_id": int(k) + 1,
                                    "segmentation": rle.to_coco(mask), "area": int(mask.sum()), "bbox": box,
                                    "iscrowd": 0})
        if split != "test2017":
            (root / "annotations" / f"instances_{split}.json").write_text(
                json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return Layout(root, root / "test2017")
