"""Training input pipeline throughput: tfvision vs the PyTorch reference stack.

Images per second on a folder of 500x500 JPEGs, all contenders in the same run,
on the same files and the same cores:

- tfvision: `build_dataset(..., training=True)` with the "medium" augmentation tier.
- torch: `DataLoader(num_workers=2, batch_size=64)` over a Dataset that reads with
  `cv2.imread` + `cv2.cvtColor` and applies an albumentations `A.Compose` with the
  same augmentation list (RandomResizedCrop, HorizontalFlip, ShiftScaleRotate as
  `A.Affine`, RandomBrightnessContrast, HueSaturationValue, GaussNoise; the medium
  tier of the Rakuten preprocessing document, section 7.3) + Normalize + ToTensorV2.
- decode only: `cv2.imread` of every file in one process, and `tf.io.decode_jpeg`
  in a parallel `tf.data` map, as the floor a pipeline has to pay per image.

Each round builds every contender fresh, pulls some warm-up batches (not
timed), times `--epochs` epochs' worth of batches, and tears it down; the best
round per contender is reported (the least disturbed by other jobs), with the
CPU time the contender used (its process plus DataLoader workers), which is
steadier than wall time on a shared machine.

    python benchmarks/pipeline.py                     # everything
    python benchmarks/pipeline.py --skip-torch        # tfvision + decode only
    python benchmarks/pipeline.py --profile           # + where tfvision's time goes

The PyTorch side needs the optional extra: pip install ".[bench]"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402

from tfvision.config import AugmentParams, TierConfig  # noqa: E402  (no TensorFlow import)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
N_CLASSES = 10
INSTALL_HINT = 'the PyTorch reference stack is not installed: pip install ".[bench]" (torch, opencv-python-headless)'


def medium_tier() -> AugmentParams:
    return TierConfig().medium


# --------------------------------------------------------------------------- PyTorch reference


def albumentations_medium(size: tuple[int, int], p: AugmentParams):
    """The document's medium tier (section 7.3) behind a RandomResizedCrop to `size`,
    with the magnitudes of tfvision's medium tier where both define them."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    return A.Compose([
        A.RandomResizedCrop(size=size, scale=tuple(p.crop_scale), ratio=tuple(p.crop_ratio)),
        A.HorizontalFlip(p=p.hflip),
        # ShiftScaleRotate(shift_limit=0.1, scale_limit=0.1, rotate_limit=15, p=0.5); albumentations 2
        # implements it as Affine and warns, so the Affine is written out.
        A.Affine(translate_percent=(-p.shift, p.shift), scale=(1 - p.scale, 1 + p.scale),
                 rotate=(-p.rotate, p.rotate), border_mode=cv2.BORDER_REFLECT_101, p=p.affine_p),
        A.RandomBrightnessContrast(brightness_limit=p.brightness, contrast_limit=p.contrast, p=p.color_p),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=20, p=0.3),
        # GaussNoise(var_limit=(10, 30)) in albumentations 1.x: std sqrt(10..30) on 0..255.
        A.GaussNoise(std_range=(math.sqrt(10) / 255, math.sqrt(30) / 255), p=p.noise_p),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ToTensorV2(),
    ])


class CV2Dataset:
    """The seed documents' Dataset: cv2.imread + cvtColor + albumentations."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import cv2

        image = cv2.imread(self.paths[i])
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        image = self.transform(image=image)["image"]
        return image, int(self.labels[i])


def torch_available() -> bool:
    try:
        import albumentations  # noqa: F401
        import cv2  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class TorchStack:
    def __init__(self, paths, labels, size, batch_size, workers):
        import torch
        from torch.utils.data import DataLoader

        torch.manual_seed(0)
        dataset = CV2Dataset(paths, labels, albumentations_medium(size, medium_tier()))
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                 drop_last=True, persistent_workers=workers > 0)

    def batches(self):
        while True:
            for images, _ in self.loader:
                yield images

    def pids(self):
        it = getattr(self.loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]

    def close(self):
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None


# --------------------------------------------------------------------------- tfvision


def tfvision_dataset(paths, labels, size, batch_size, **spec_kw):
    from tfvision.data.pipeline import PipelineSpec, Samples, build_dataset

    targets = np.eye(N_CLASSES, dtype=np.float32)[labels]
    spec_kw.setdefault("tiers", [medium_tier()])
    spec_kw.setdefault("checked", True)  # as `train` runs it: every file passed the check pass first
    spec = PipelineSpec(image_size=size, channels=3, batch_size=batch_size, **spec_kw)
    return build_dataset(Samples(np.asarray(paths), targets), spec, training=True, repeat=True)


def tf_batches(ds):
    """Batches of a (images, ...) or images dataset, as eager tensors (what `fit` receives)."""
    for element in ds:
        if isinstance(element, dict):  # placement "accelerator": the unaugmented batch dict
            element = element["image"]
        yield element[0] if isinstance(element, tuple) else element


def tf_len(images) -> int:
    return int(images.shape[0])


# --------------------------------------------------------------------------- decode only


def cv2_decode_batches(paths, batch_size):
    import cv2

    i = 0
    while True:
        batch = []
        for _ in range(batch_size):
            batch.append(cv2.imread(paths[i % len(paths)]))
            i += 1
        yield batch


def tf_decode_dataset(paths, batch_size, parallel=True):
    import tensorflow as tf

    def load(path):
        return tf.io.decode_jpeg(tf.io.read_file(path), channels=3)

    ds = tf.data.Dataset.from_tensor_slices(list(paths)).repeat()
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE if parallel else None, deterministic=False)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- profile (tfvision internals)


def _tf_options(**kw):
    """tf.data.Options from flat names: threadpool=, intra=, opt_off=True, ram_mb=."""
    import tensorflow as tf

    o = tf.data.Options()
    if "threadpool" in kw:
        o.threading.private_threadpool_size = kw["threadpool"]
    if "intra" in kw:
        o.threading.max_intra_op_parallelism = kw["intra"]
    if kw.get("opt_off"):
        o.experimental_optimization.apply_default_optimizations = False
        o.autotune.enabled = False
    if kw.get("map_parallelization") is not None:
        o.experimental_optimization.map_parallelization = kw["map_parallelization"]
    return o


def profile_variants(paths, labels, size, batch_size):
    """(name, factory) pairs: tfvision with ops switched off (probability 0 drops an op from
    the graph), and tf.data options."""
    medium = medium_tier()
    off = {f: 0.0 for f in ("hflip", "vflip", "affine_p", "elastic_p", "color_p", "noise_p", "blur_p", "erase_p")}

    def only(*gates):
        return dataclasses.replace(medium, **{g: v for g, v in off.items() if g not in gates})

    out = [("tfvision augment=False (decode+resize+batch)",
            lambda: tfvision_dataset(paths, labels, size, batch_size, augment=False))]
    for name, gates in [("crop-decode only", ()), ("+ flips", ("hflip", "vflip")),
                        ("+ flips + affine", ("hflip", "vflip", "affine_p")),
                        ("+ flips + affine + color", ("hflip", "vflip", "affine_p", "color_p"))]:
        tier = only(*gates)
        out.append((f"tfvision {name}", lambda t=tier: tfvision_dataset(paths, labels, size, batch_size,
                                                                        tiers=[t])))
    for name, kw in [("threadpool=2", {"threadpool": 2}), ("threadpool=4", {"threadpool": 4}),
                     ("max_intra_op_parallelism=1", {"intra": 1}),
                     ("default optimizations + autotune off", {"opt_off": True})]:
        out.append((f"tfvision + options {name}",
                    lambda kw=kw: tfvision_dataset(paths, labels, size, batch_size).with_options(_tf_options(**kw))))
    return out


def _time_call(f, repeats):
    """(wall ms, CPU ms) per call of f, after one untimed call."""
    f()
    c0, t0 = common.cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        f()
    return 1000 * (time.perf_counter() - t0) / repeats, 1000 * (common.cpu_seconds() - c0) / repeats


def augment_microbench(size, batch_size, repeats=8):
    """(name, wall ms, CPU ms) per batch of `batch_size` single-image calls: each augment op
    alone (probability 1, tf.function, outside tf.data), and the kernels beside OpenCV's."""
    import tensorflow as tf

    import tfvision.data.augment as aug

    table = aug.param_table([medium_tier()])
    image = tf.random.uniform([batch_size, *size, 3], 0, 255)
    rows = []
    for op, _gate in aug.OPS:
        f = tf.function(lambda x, op=op: tf.map_fn(
            lambda im: op({"image": im}, table[0], aug._Rng(tf.constant([1, 2])))["image"], x))
        rows.append((op.__name__, *_time_call(lambda f=f: f(image).numpy(), repeats)))
    m = tf.constant([[0.98, 0.17, 3.0, -0.17, 0.98, 2.0, 0.0, 0.0]])
    warp = tf.function(lambda x: tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=tf.tile(m, [batch_size, 1]), output_shape=size, fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT"))
    rows.append(("kernel: ImageProjectiveTransformV3 bilinear/reflect",
                 *_time_call(lambda: warp(image).numpy(), repeats)))
    try:
        import cv2

        u8 = image.numpy().astype(np.uint8)
        mat = np.array([[0.98, 0.17, 3.0], [-0.17, 0.98, 2.0]], np.float32)

        def cv_warp():
            for im in u8:
                cv2.warpAffine(im, mat, size[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT_101)

        rows.append(("kernel: cv2.warpAffine uint8 (albumentations)", *_time_call(cv_warp, repeats)))
    except ImportError:
        pass
    return rows


# --------------------------------------------------------------------------- main


@dataclasses.dataclass
class Contender:
    name: str
    key: str
    run: object  # (warmup, timed) -> common.Result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "tfvision-bench", "jpeg500"),
                    help="folder for the generated JPEGs (made once, reused)")
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--source-size", type=int, default=500, help="side of the generated JPEGs")
    ap.add_argument("--size", type=int, default=224, help="training image side")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=2.0, help="epochs of images timed per contender")
    ap.add_argument("--warmup", type=int, default=6, help="batches pulled before timing")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all contenders; best is reported")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader num_workers")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--placement", choices=["host", "accelerator", "both"], default="host",
                    help="augment.placement of the tfvision contender; accelerator times the host side only "
                    "(read, crop, decode, resize, uint8 batches)")
    ap.add_argument("--profile", action="store_true", help="also time tfvision variants (where time goes)")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)

    size = (args.size, args.size)
    bs = args.batch_size
    t0 = time.perf_counter()
    paths = common.jpeg_folder(args.data, n=args.n_images, size=args.source_size)
    made = time.perf_counter() - t0
    labels = np.random.default_rng(0).integers(0, N_CLASSES, len(paths))
    timed = max(1, round(args.epochs * len(paths) / bs))
    info = common.machine_info()
    print(f"data: {len(paths)} JPEGs {args.source_size}x{args.source_size} in {args.data}"
          f"{f' (made in {made:.0f} s)' if made > 1 else ''}")
    print(f"timing {timed} batches of {bs} ({timed * bs} images) at {args.size}x{args.size} after "
          f"{args.warmup} warm-up batches, best of {args.rounds} rounds")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))

    have_torch = not args.skip_torch and torch_available()
    if not args.skip_torch and not have_torch:
        print(f"NOTE: {INSTALL_HINT}; timing tfvision and TF decode only.")

    def run_tf(name, make_ds):
        def run(warmup, n):
            ds = make_ds()
            it = tf_batches(ds)
            try:
                return common.measure(name, it, warmup=warmup, timed=n, batch_len=tf_len)
            finally:
                it.close()
                del it, ds
        return run

    def run_torch(warmup, n):
        stack = TorchStack(paths, labels, size, bs, args.workers)
        it = stack.batches()
        try:
            return common.measure("torch", it, warmup=warmup, timed=n, batch_len=len, pids=stack.pids)
        finally:
            it.close()
            stack.close()

    def run_cv2(warmup, n):
        return common.measure("cv2", cv2_decode_batches(paths, bs), warmup=warmup, timed=n)

    contenders = []
    if args.placement in ("host", "both"):
        contenders.append(Contender("tfvision build_dataset, medium tier", "tfvision",
                                    run_tf("tfvision", lambda: tfvision_dataset(paths, labels, size, bs))))
    if args.placement in ("accelerator", "both"):
        contenders.append(Contender(
            "tfvision, medium tier, placement accelerator (host side)", "tfvision_accelerator",
            run_tf("tfvision_accelerator",
                   lambda: tfvision_dataset(paths, labels, size, bs, placement="accelerator"))))
    if have_torch:
        contenders.append(Contender(f"PyTorch DataLoader(num_workers={args.workers}) + cv2 + albumentations",
                                    "torch", run_torch))
    try:
        import cv2  # noqa: F401

        contenders.append(Contender("decode only: cv2.imread, 1 process", "cv2", run_cv2))
    except ImportError:
        pass
    contenders.append(Contender("decode only: tf.io.decode_jpeg, tf.data AUTOTUNE map", "tf_decode",
                                run_tf("tf_decode", lambda: tf_decode_dataset(paths, bs))))
    if args.profile:
        for name, make in profile_variants(paths, labels, size, bs):
            contenders.append(Contender(name, name, run_tf(name, make)))

    results: dict[str, list[common.Result]] = {c.key: [] for c in contenders}
    loads = [common.loadavg()]
    for r in range(args.rounds):
        for c in contenders:
            res = c.run(args.warmup, timed)
            results[c.key].append(res)
            print(f"  round {r + 1}  {c.name:<62} {res.images_per_s:8.1f} img/s  "
                  f"{res.cpu_ms_per_image:6.2f} CPU-ms/img  (load {common.loadavg():.1f})", flush=True)
        loads.append(common.loadavg())

    best = {k: max(v, key=lambda x: x.images_per_s) for k, v in results.items()}
    cpu = {k: min(x.cpu_ms_per_image for x in v) for k, v in results.items()}
    ref = best.get("torch")
    rows = []
    for c in contenders:
        b = best[c.key]
        med = statistics.median(x.images_per_s for x in results[c.key])
        rows.append([c.name, f"{b.images_per_s:.0f}", f"{med:.0f}", f"{cpu[c.key]:.2f}",
                     f"{b.images_per_s / ref.images_per_s:.2f}x" if ref else "-"])
    print()
    print(common.markdown_table(rows, ["pipeline", "img/s (best)", "img/s (median)", "CPU-ms/img",
                                       "vs torch"]))
    print()
    main_key = "tfvision" if "tfvision" in best else "tfvision_accelerator"
    tfv = best[main_key].images_per_s
    ratios = {}
    if "tfvision" in best and "tfvision_accelerator" in best:
        ratios["host CPU per image, accelerator / host placement"] = cpu["tfvision_accelerator"] / cpu["tfvision"]
    if ref:
        ratios["tfvision / torch"] = tfv / ref.images_per_s
        ratios["tfvision / torch, CPU time per image"] = cpu["torch"] / cpu[main_key]
    if "cv2" in best:
        ratios["tfvision / cv2 decode-only"] = tfv / best["cv2"].images_per_s
    ratios["tfvision / tf.data decode-only"] = tfv / best["tf_decode"].images_per_s
    for k, v in ratios.items():
        print(f"{k:<40} {v:5.2f}x")
    if ref:
        verdict = "meets" if ratios["tfvision / torch"] >= 1.5 else "BELOW"
        print(f"target tfvision >= 1.5x torch: {verdict}")
    print(f"load average over the run: {min(loads):.1f} .. {max(loads):.1f} on {info['cores']} cores"
          " (above the core count means other jobs were competing)")

    micro = None
    if args.profile:
        print(f"\nbatch augment ops alone and their kernels, per batch of {bs} at {args.size}x{args.size}"
              " (tf.function, outside tf.data):")
        micro = augment_microbench(size, bs)
        for name, wall, cpu_ms in micro:
            print(f"  {name:<52} wall {wall:7.1f} ms  CPU {cpu_ms:7.1f} ms  ({cpu_ms / bs:5.2f} CPU-ms/img)")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "machine": info, "loadavg": loads, "ratios": ratios,
            "results": {k: [x.to_dict() for x in v] for k, v in results.items()},
            "augment_microbench_ms": micro if args.profile else None,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
