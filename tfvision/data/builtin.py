"""Datasets built from data that ships inside installed packages (no download).

``sklearn_digits``: scikit-learn's 1,797 8x8 handwritten digits, upscaled to
32x32 grey PNGs plus ``digits.csv`` (path,label,group) in the generic-CSV
layout. Written once, atomically: a half-written folder never looks finished.
"""

from __future__ import annotations

import os
from pathlib import Path

from tfvision.fileio import build_dir
from tfvision.registry import Registry

PREPARERS = Registry("built-in dataset")


@PREPARERS.register("sklearn_digits")
def sklearn_digits(root: Path, size: int = 32) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "images").mkdir(parents=True)
    lines = ["path,label,group"]
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
        name = f"images/digit_{i:04d}.png"
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(root / name)
        lines.append(f"{name},{label},{i}")
    (root / "digits.csv").write_text("\n".join(lines) + "\n")


MARKER = ".complete"


def prepare(name: str, root: str | os.PathLike) -> Path:
    """Build dataset `name` into `root` unless it is already there.

    Raises:
        UserError: `root` exists and is not a dataset prepared here (it holds files but no
            marker): it is the user's data, so it is neither replaced nor written into.
    """
    def build(tmp: Path):
        PREPARERS.get(name)(tmp)
        (tmp / MARKER).write_text(name + "\n")

    return build_dir(root, build, MARKER, refusal(name, root))


def refusal(name: str, root) -> str:
    """The one line that says why `data.prepare` will not touch `root`, and what to change."""
    return (f"data.root: {root} already exists and is not the {name} dataset tfvision prepared (no {MARKER}); "
            f"drop data.prepare to train on the files there, or point data.root at a new folder")
