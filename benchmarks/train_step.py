"""End-to-end training speed: `tfvision.train` against a bare `model.fit` on in-memory tensors.

For each case, in one run on the same cores:

1. tfvision trains the case's config for `--epochs` epochs in this process (`training.train`),
   with a timing callback added to its own callbacks. Every batch's time is split into
   *step* (on_train_batch_begin -> end: the compiled train step, which also pulls its batch:
   Keras calls next() on the iterator inside the train function), *wait* (end of one batch ->
   begin of the next: per-batch callbacks), *validation* (on_test_begin -> end) and *epoch
   end* (the rest: checkpoint, backup, CSV, TensorBoard). Afterwards the same training
   dataset is timed on its own (*input alone*): the step's share that is input.
2. The run's own checkpoint (`best.keras`), recompiled with the same optimizer type and loss,
   fits random in-memory tensors of the same shape and batch for the same number of steps
   (the bare fit: no input pipeline, no callbacks, no validation).

Printed per case: ms/step and img/s for both, the ratio (bare time / tfvision time, 1.0 =
no overhead), the split of tfvision's epoch time, and the epoch-to-epoch spread (max/min - 1).
The first epoch (tracing) is left out of every figure.

    python benchmarks/train_step.py                      # all cases, ~15 min on 2 cores
    python benchmarks/train_step.py --cases demo --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmarks.common import jpeg_folder, machine_info, markdown_table  # noqa: E402


def _classification_csv(root: Path, n: int, size: int) -> Path:
    """A CSV over `n` cached JPEGs (real photo crops) with 4 classes."""
    import pandas as pd

    paths = jpeg_folder(Path(tempfile.gettempdir()) / "tfvision-bench" / f"jpeg{size}", n=n, size=size)
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": paths, "label": [f"c{i % 4}" for i in range(len(paths))]}).to_csv(root / "data.csv",
                                                                                            index=False)
    return root


def _segmentation_csv(root: Path, n: int, size: int) -> Path:
    """The same JPEGs with 3-class label PNGs (bands of the image's brightness)."""
    import pandas as pd
    from PIL import Image

    paths = jpeg_folder(Path(tempfile.gettempdir()) / "tfvision-bench" / f"jpeg{size}", n=n, size=size)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    masks = []
    for p in paths:
        m = root / "masks" / (Path(p).stem + ".png")
        if not m.is_file():
            grey = np.asarray(Image.open(p).convert("L"))
            Image.fromarray(np.digitize(grey, [85, 170]).astype(np.uint8)).save(m)
        masks.append(str(m))
    pd.DataFrame({"path": paths, "mask": masks}).to_csv(root / "data.csv", index=False)
    return root


def cases(work: Path) -> dict[str, dict]:
    """name -> raw config; data is built on first use."""
    common = {"augment": {}, "train": {"tensorboard": True, "schedule": {"name": "cosine"}}}

    def image(backbone, size, batch, n=640):
        return {**common, "task": "classification",
                "data": {"source": "csv", "root": str(_classification_csv(work / "cls", n, 256)), "csv": "data.csv",
                         "image_size": size, "split": {"val_fraction": 0.2}},
                "model": {"backbone": backbone, "weights": None},
                "train": {**common["train"], "batch_size": batch}}

    return {
        "demo": lambda: {"task": "classification",
                         **json.loads((Path(__file__).parent.parent / "configs" / "demo.json").read_text())},
        "effnet_b0_128": lambda: image("efficientnetv2_b0", 128, 32),
        "effnet_b0_224": lambda: image("efficientnetv2_b0", 224, 32),
        "unet_128": lambda: {**common, "task": "segmentation",
                             "data": {"source": "csv", "root": str(_segmentation_csv(work / "seg", 320, 256)),
                                      "csv": "data.csv", "mask_column": "mask", "image_size": 128,
                                      "class_names": ["low", "mid", "high"]},
                             "model": {"backbone": "efficientnetv2_b0", "weights": None},
                             "train": {**common["train"], "batch_size": 16, "loss": {"name": "ce_dice"}}},
    }


class Timing:
    """A Keras callback recording when each batch, validation and epoch starts and ends."""

    def __new__(cls):
        import keras

        class _Timing(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.epochs = []

            def on_epoch_begin(self, epoch, logs=None):
                self.cur = {"begin": time.perf_counter(), "steps": [], "waits": [], "val": 0.0}
                self.last_end = self.cur["begin"]

            def on_train_batch_begin(self, batch, logs=None):
                now = time.perf_counter()
                self.cur["waits"].append(now - self.last_end)
                self.batch_begin = now

            def on_train_batch_end(self, batch, logs=None):
                self.last_end = time.perf_counter()
                self.cur["steps"].append(self.last_end - self.batch_begin)

            def on_test_begin(self, logs=None):
                self.val_begin = time.perf_counter()

            def on_test_end(self, logs=None):
                self.cur["val"] += time.perf_counter() - self.val_begin

            def on_epoch_end(self, epoch, logs=None):
                self.cur["end_mark"] = time.perf_counter()
                self.epochs.append(self.cur)

        return _Timing()


def run_tfvision(raw: dict, epochs: int, work: Path):
    """Train `raw` for `epochs` epochs with the timing callback; returns (epochs, run folder, cfg)."""
    from tfvision import training
    from tfvision.config_loader import config_from_dict

    raw = json.loads(json.dumps(raw))
    raw["train"].pop("phases", None)
    raw["train"]["epochs"] = epochs
    raw["train"].setdefault("early_stopping", {})["patience"] = 0
    cfg = config_from_dict(raw, "bench")
    cfg.name = "bench"
    from tfvision.data.inputs import FileInputs

    timing, captured = Timing(), {}
    original, original_dataset = training._callbacks, FileInputs.dataset

    def dataset(self, split, spec, **kw):  # keep the training dataset to time it alone afterwards
        ds = original_dataset(self, split, spec, **kw)
        if split == "train":
            captured["train"] = ds
        return ds

    training._callbacks = lambda *a, **k: [*original(*a, **k), timing]
    FileInputs.dataset = dataset
    run_dir = Path(tempfile.mkdtemp(dir=work))
    try:
        from tfvision.train import train

        train(cfg, run_dir, verbose=0)
    finally:
        training._callbacks, FileInputs.dataset = original, original_dataset
    return timing.epochs, run_dir, cfg, captured["train"]


def input_alone(dataset, steps: int) -> float:
    """ms per batch of the training input pipeline on its own (after a warm-up of `steps`)."""
    it = iter(dataset)
    for _ in range(steps):
        next(it)
    t = time.perf_counter()
    for _ in range(2 * steps):
        next(it)
    return 1000 * (time.perf_counter() - t) / (2 * steps)


def run_bare(run_dir: Path, cfg, steps: int, epochs: int) -> list[float]:
    """Per-epoch seconds of `model.fit` on random in-memory tensors, same model, batch and shapes."""
    import keras

    from tfvision.tasks import get_task

    model = keras.saving.load_model(run_dir / "checkpoints" / "best.keras", compile=False)
    task = get_task(cfg.task, cfg)
    info = json.loads((run_dir / "run.json").read_text())
    k = len(info["class_names"])
    b = cfg.train.batch_size
    h, w = cfg.data.size
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (steps * b, h, w, cfg.data.channels)).astype(np.float32)
    if task.dense:
        y = rng.integers(0, k, (steps * b, h, w)).astype(np.int32)
    else:
        y = np.eye(k, dtype=np.float32)[rng.integers(0, k, steps * b)]

    class Inputs:  # what the task's loss needs to know about the data
        class_names = info["class_names"]
        counts = np.ones(k)
        known_counts = np.full(k, steps * b)
        frames = {"train": None}
        pixel_counts = np.ones(k, np.int64)

    task.output_names = list(model.output_names)
    args = task.compile_args(cfg, Inputs, model)
    if len(model.output_names) > 1:
        y = {n: y for n in model.output_names}
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), jit_compile=False, **args)
    times = []

    class EpochTime(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(x, y, batch_size=b, epochs=epochs, shuffle=False, verbose=0, callbacks=[EpochTime()])
    return times


def summarize(name: str, epochs: list[dict], bare: list[float], batch: int) -> dict:
    ep = epochs[1:]  # the first epoch traces and compiles
    wall = np.array([e["end_mark"] - e["begin"] for e in ep])
    steps = np.array([sum(e["steps"]) for e in ep])
    waits = np.array([sum(e["waits"]) for e in ep])
    val = np.array([e["val"] for e in ep])
    n_steps = len(ep[0]["steps"])
    train_part = wall - val  # training time of an epoch, validation excluded
    ms_tfv = 1000 * float(np.median(train_part)) / n_steps
    ms_bare = 1000 * float(np.median(bare[1:])) / n_steps
    return {"case": name, "steps_per_epoch": n_steps, "batch": batch,
            "tfvision_ms_per_step": ms_tfv, "bare_ms_per_step": ms_bare, "ratio": ms_bare / ms_tfv,
            "tfvision_img_s": 1000 * batch / ms_tfv, "bare_img_s": 1000 * batch / ms_bare,
            "split_ms_per_step": {"train_step": 1000 * float(np.median(steps)) / n_steps,
                                  "input_wait": 1000 * float(np.median(waits)) / n_steps,
                                  "epoch_end": 1000 * float(np.median(train_part - steps - waits)) / n_steps},
            "validation_s": float(np.median(val)),
            "epoch_s": [round(float(x), 2) for x in wall],
            "spread": float(wall.max() / wall.min() - 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="demo,effnet_b0_128,effnet_b0_224,unet_128")
    p.add_argument("--epochs", type=int, default=4, help="epochs per contender (the first is left out)")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tfvision-train-step-"))
    table = cases(work)
    rows, results = [], []
    for name in args.cases.split(","):
        epochs, run_dir, cfg, train_ds = run_tfvision(table[name](), args.epochs, work)
        n_steps = len(epochs[-1]["steps"])
        bare = run_bare(run_dir, cfg, n_steps, args.epochs)
        r = summarize(name, epochs, bare, cfg.train.batch_size)
        r["input_alone_ms_per_batch"] = input_alone(train_ds, n_steps)
        results.append(r)
        s = r["split_ms_per_step"]
        rows.append([name, r["batch"], f"{r['tfvision_ms_per_step']:.0f}", f"{r['bare_ms_per_step']:.0f}",
                     f"{r['ratio']:.2f}", f"{r['tfvision_img_s']:.0f}", f"{r['bare_img_s']:.0f}",
                     f"{s['train_step']:.0f} / {s['input_wait']:.0f} / {s['epoch_end']:.0f}",
                     f"{r['input_alone_ms_per_batch']:.0f}",
                     f"{r['validation_s']:.1f}", f"{100 * r['spread']:.0f}%"])
        print(json.dumps(r), flush=True)
    print(markdown_table(rows, ["case", "batch", "tfvision ms/step", "bare ms/step", "ratio", "tfvision img/s",
                                "bare img/s", "step / wait / epoch end (ms per step)", "input alone ms/batch",
                                "val s/epoch",
                                "epoch spread"]))
    info = machine_info()
    print(json.dumps(info))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
