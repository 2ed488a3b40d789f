"""Shared fixtures: tiny, real datasets built at test time (nothing downloaded or committed)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Derived data (slice caches, class weights, the predict ledger) goes to the user cache; tests,
# and the commands they start, get a private one instead of the developer's ~/.cache.
os.environ["TFVISION_CACHE"] = tempfile.mkdtemp(prefix="tfvision-test-cache-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def photo(seed: int, size: int = 64) -> np.ndarray:
    """A real-photo crop (scikit-learn's china/flower) of `size` px, varied by seed."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    img = load_sample_image("china.jpg" if seed % 2 else "flower.jpg")
    y = rng.integers(0, img.shape[0] - 200)
    x = rng.integers(0, img.shape[1] - 200)
    crop = Image.fromarray(img[y : y + 200, x : x + 200]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop)


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """scikit-learn digits as 32x32 PNGs + digits.csv (the demo dataset)."""
    from tfvision.data.builtin import prepare

    return prepare("sklearn_digits", tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def small_digits(tmp_path, digits_root) -> Path:
    """A 300-image subset of the digits set in its own folder (generic CSV layout)."""
    import pandas as pd

    frame = pd.read_csv(digits_root / "digits.csv").iloc[:300]
    root = tmp_path / "digits_small"
    (root / "images").mkdir(parents=True)
    for p in frame["path"]:
        shutil.copy(digits_root / p, root / p)
    frame.to_csv(root / "digits.csv", index=False)
    return root


@pytest.fixture
def odd_images(tmp_path) -> dict[str, Path]:
    """Real photos in every format the decoder must handle, plus broken files."""
    d = tmp_path / "odd"
    d.mkdir()
    rgb = photo(1)
    files = {}

    def put(name, data):
        (d / name).write_bytes(data)
        files[name] = d / name

    put("rgb.jpg", jpeg_bytes(rgb))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    put("png_named.jpg", buf.getvalue())  # PNG bytes behind a .jpg name
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(buf, format="PNG")
    put("gray.png", buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=95)
    put("cmyk.jpg", buf.getvalue())
    sixteen = (rgb[..., 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    Image.fromarray(sixteen).save(buf, format="PNG")
    put("gray16.png", buf.getvalue())
    good = jpeg_bytes(photo(3))
    put("truncated.jpg", good[: len(good) // 3])
    put("empty.jpg", b"")
    put("text.png", b"this is not an image at all")
    files["_rgb_array"] = rgb
    return files


def run_cli(*args, timeout=900, cwd=None, env=None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO, env=e)


def checksums(tree: Path) -> dict[str, str]:
    """Every path under `tree` (or the file itself) with its SHA-256: equal before and after a
    command means it changed, added and removed nothing there. As root, chmod -w stops no
    write, so this is how a read-only input is proven untouched."""
    if tree.is_file():
        return {tree.name: hashlib.sha256(tree.read_bytes()).hexdigest()}
    return {str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(tree.rglob("*"))}
