"""Shared helpers for the benchmarks in this folder (not part of the package).

- `jpeg_folder`: a cached folder of distinct JPEGs built from the photos that
  ship with scikit-learn, so every benchmark reads the same real-looking files.
- `measure`: time a stream of batches after a warm-up, with wall-clock
  images/s and the CPU seconds that the work cost (process plus workers), which
  is less sensitive than wall time to other jobs sharing the cores.
- `machine_info` / `markdown_table`: what to paste into a README.

Nothing here imports TensorFlow or PyTorch at module level: benchmarks import
the frameworks they measure themselves, in the order they need.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- data


def jpeg_folder(
    root: str | os.PathLike, n: int = 1000, size: int = 500, quality: int = 90, seed: int = 0
) -> list[str]:
    """`n` distinct `size`x`size` JPEGs under `root` (made once, then reused).

    Each file is a random crop of one of scikit-learn's sample photos
    (china.jpg, flower.jpg), resized to `size`, randomly flipped and with its
    brightness, contrast, saturation and hue shifted, so no two files are alike
    and the encoder sees natural image statistics. A stamp file records the
    parameters; a folder made with other parameters is rebuilt.
    """
    root = Path(root)
    stamp = root / "stamp.json"
    want = {"n": n, "size": size, "quality": quality, "seed": seed, "version": 1}
    paths = [str(root / f"img_{i:05d}.jpg") for i in range(n)]
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(map(os.path.isfile, paths)):
        return paths
    from PIL import Image
    from sklearn.datasets import load_sample_image

    root.mkdir(parents=True, exist_ok=True)
    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    rng = np.random.default_rng(seed)
    for i, path in enumerate(paths):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        side = int(rng.uniform(0.55, 1.0) * min(h, w))
        aspect = rng.uniform(0.8, 1.25)
        ch, cw = min(h, int(side / np.sqrt(aspect))), min(w, int(side * np.sqrt(aspect)))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(src[y : y + ch, x : x + cw]).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        hsv = np.asarray(img.convert("HSV")).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-20, 21)) % 256
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.7, 1.3), 0, 255)
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
        img = (img - img.mean()) * rng.uniform(0.8, 1.2) + img.mean() * rng.uniform(0.8, 1.2)
        img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        img.save(path, "JPEG", quality=quality)
    stamp.write_text(json.dumps(want))
    return paths


# --------------------------------------------------------------------------- timing


def _proc_cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (all its threads) from /proc; 0 if unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_seconds(pids: Iterable[int] = ()) -> float:
    """CPU seconds used so far by this process plus `pids` (e.g. DataLoader workers)."""
    return _proc_cpu_seconds("self") + sum(_proc_cpu_seconds(p) for p in pids)


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")


@dataclasses.dataclass
class Result:
    name: str
    images: int
    seconds: float
    cpu_seconds: float
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000.0 * self.cpu_seconds / self.images

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "images_per_s": self.images_per_s,
                "cpu_ms_per_image": self.cpu_ms_per_image}


def measure(
    name: str,
    batches: Iterator,
    *,
    warmup: int,
    timed: int,
    batch_len: Callable[[object], int] = len,
    pids: Callable[[], Iterable[int]] = tuple,
    note: str = "",
) -> Result:
    """Pull `warmup` batches untimed, then time `timed` batches.

    `batch_len(batch)` gives the images in one batch; `pids()` the extra
    processes whose CPU time belongs to this contender (read after the warm-up,
    when workers exist).
    """
    for _ in range(warmup):
        next(batches)
    extra = list(pids())
    cpu0, t0 = cpu_seconds(extra), time.perf_counter()
    images = 0
    for _ in range(timed):
        images += batch_len(next(batches))
    t1 = time.perf_counter()
    cpu1 = cpu_seconds(extra)
    return Result(name, images, t1 - t0, cpu1 - cpu0, note)


# --------------------------------------------------------------------------- reporting


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine_info() -> dict:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        ram = f"{mem_kb / 2**20:.1f} GiB"
    except (OSError, IndexError, ValueError):
        ram = "?"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": cores,
        "ram": ram,
        "python": sys.version.split()[0],
        **{m: _version(m) for m in ("tensorflow", "torch", "opencv-python-headless",
                                    "albumentations", "numpy", "pillow")},
    }


def markdown_table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *map(line, cells[1:])])
