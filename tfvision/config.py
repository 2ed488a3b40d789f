"""JSON config -> typed, validated `Config`.

The schema is plain dataclasses; constraints ride in field metadata so the
validator and the JSON Schema export read one source. Nothing here imports
TensorFlow: a typo in a config must cost a second, not a minute.

The loader (`tfvision.config_loader.load_config`) sits above the tasks, which
add their own sections and rules; this module sits below everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tfvision.errors import ConfigError, did_you_mean

# The backbone registry's names, listed here so a typo is caught before TensorFlow loads
# (tests check the two agree).
BACKBONE_NAMES = (
    *(f"efficientnetv2_{v}" for v in ("b0", "b1", "b2", "b3", "s", "m", "l")),
    *(f"convnext_{v}" for v in ("tiny", "small", "base", "large", "xlarge")),
    "resnet50", "small_cnn",
)


def opt(default=dataclasses.MISSING, *, help="", factory=None, **constraints):
    """A dataclass field with a help text and constraints (min, max, exists)."""
    meta = {"help": help, **constraints}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- schema


@dataclass(kw_only=True)
class SplitConfig:
    method: Literal["stratified", "grouped", "random"] = opt(
        "stratified", help="stratified by label; grouped keeps each group (patient, lesion) in one split"
    )
    val_fraction: float = opt(0.2, min=0.0, max=0.9, help="held-out fraction when no fold is set")
    test_fraction: float = opt(0.0, min=0.0, max=0.9, help="fraction carved out first as test")
    n_folds: int = opt(5, min=2, help="number of folds for K-fold")
    fold: int | None = opt(None, min=0, help="if set, validate on this fold of a stratified (group) K-fold")


POLICIES = ("ignore", "ones", "zeros", "smooth")


@dataclass(kw_only=True)
class LabelPolicy:
    """How one kind of multi-label entry (uncertain -1, or blank) becomes a target."""

    default: Literal["ignore", "ones", "zeros", "smooth"] = opt(
        "ignore", help="ignore: masked out; ones/zeros: that value; smooth: smooth_value"
    )
    per_class: dict = opt(factory=dict, help='overrides, e.g. {"Atelectasis": "ones"}')
    smooth_value: float = opt(0.7, min=0.0, max=1.0, help="target for the smooth policy (0.55-0.85 typical)")

    def for_class(self, name: str) -> str:
        return self.per_class.get(name, self.default)


@dataclass(kw_only=True)
class OversampleConfig:
    """Rare-positive oversampling (multi-label): sampling weights, no file duplication."""

    enabled: bool = opt(False)
    rare_below: float = opt(0.1, min=0.0, max=1.0, help="classes whose positive rate is below this are rare")
    target_rate: float = opt(0.2, min=0.0, max=0.95, help="raise each rare class's positive rate towards this")
    max_factor: float = opt(20.0, min=1.0, help="cap on a positive's sampling weight")
    factors: dict = opt(factory=dict, help='explicit per-class weights, e.g. {"Fracture": 5}')


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["ham10000", "csv", "folders", "tfrecord", "chexpert", "volumes", "coco", "sartorius",
                    "airbus"] = opt(help="where samples come from")
    root: str | None = opt(None, help="dataset folder; image paths in CSVs resolve against it. Read only: "
                           "tfvision never writes here (see cache_dir). May be left out with prepare "
                           "(the dataset is then built in the cache)", exists="dir")
    cache_dir: str | None = opt(None, help="derived data: volume slices, pixel class weights, datasets built by "
                                "prepare without a root. Default: a folder per dataset under $TFVISION_CACHE, "
                                "$XDG_CACHE_HOME/tfvision or ~/.cache/tfvision; never root unless set so")
    csv: str | None = opt(None, help="CSV file, relative to root", exists="file")
    val_csv: str | None = opt(None, help="second CSV whose rows are the validation set", exists="file")
    annotations: str | None = opt(None, help="coco: the instances JSON, relative to root (images resolve "
                                  "against root by their file_name)", exists="file")
    val_annotations: str | None = opt(None, help="coco: a second instances JSON whose images are the "
                                      "validation set", exists="file")
    rle_order: Literal["C", "F"] | None = opt(
        None, help="sartorius/airbus: pixel order of the RLE, C row-major, F column-major; default the "
        "layout's own (sartorius C, airbus F)")
    rle_base: int = opt(1, min=0, max=1, help="sartorius/airbus: index of the first pixel in the RLE")
    split_column: str | None = opt(None, help="column with train/val/test per row")
    path_column: str = opt("path", help="CSV column with the image path")
    path_template: str | None = opt(
        None, help="Python format string over row columns, e.g. image_{imageid}_product_{productid}.jpg"
    )
    label_column: str = opt("label", help="CSV column with the class")
    label_columns: list[str] = opt(factory=list, help="multilabel: CSV columns with 1/0/-1/blank per class")
    mask_column: str | None = opt(None, help="segmentation: CSV column with the label image (or label volume)")
    windows: list[str | list[float]] = opt(
        factory=lambda: ["minmax"], help="volumes: one channel per window: lung, mediastinum, bone, brain, "
        "minmax, zscore, or [low, high]")
    slice_axis: int = opt(2, min=0, max=2, help="volumes: array axis to slice along (2 = axial in RAS NIfTI)")
    empty_slices: Literal["keep", "drop", "ratio"] = opt("keep", help="volumes: slices with no foreground")
    empty_ratio: float = opt(0.2, min=0.0, help="volumes: empty slices kept per foreground slice, with 'ratio'")
    views: Literal["all", "frontal", "ap_pa"] = opt("all", help="chexpert: keep all, frontal, or AP/PA views")
    uncertain: LabelPolicy = opt(factory=LabelPolicy, help="multilabel: what -1 (uncertain) becomes")
    blank: LabelPolicy = opt(factory=lambda: LabelPolicy(default="zeros"), help="multilabel: what blank becomes")
    oversample: OversampleConfig = opt(factory=OversampleConfig)
    clahe: float | None = opt(None, min=0.0, help="CLAHE clip limit (e.g. 2.0) applied inside the model; null off")
    group_column: str | None = opt(None, help="CSV column with the patient/lesion id for grouped splits")
    image_dirs: list[str] = opt(factory=list, help="folders (relative to root) searched for images")
    image_size: int | list[int] = opt(224, min=8, help="training size, N or [H, W]")
    channels: int = opt(3, min=1, max=16, help="input channels; 1 grayscale, 3 RGB, 4+ multispectral")
    normalization: Literal["imagenet", "dataset", "none"] = opt(
        "imagenet", help="imagenet: what the pretrained backbone expects; dataset: mean/std of training images"
    )
    class_names: list[str] | None = opt(None, help="fixes class order; default is sorted labels")
    max_bad_fraction: float = opt(0.01, min=0.0, max=1.0, help="stop when more files than this are unreadable")
    check_files: bool = opt(True, help="decode every file once before training and skip corrupt ones")
    shuffle_buffer: int = opt(2048, min=1)
    deterministic: bool = opt(False, help="reproducible order at some speed cost")
    cache: bool = opt(False, help="cache decoded, resized images in memory (small datasets)")
    prepare: Literal["sklearn_digits"] | None = opt(
        None, help="build a bundled dataset into root first (demo)"
    )
    split: SplitConfig = opt(factory=SplitConfig)

    @property
    def derived_dir(self) -> Path:
        """The folder derived data goes to: `cache_dir`, else one per dataset in the user cache
        (named by a hash of source, root and CSV, so two datasets never share a cache)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        from tfvision import remote
        from tfvision.fileio import user_cache_dir

        root = self.root if remote.is_url(self.root) else str(Path(self.root).resolve())
        ident = {"source": self.source, "root": root, "csv": self.csv}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return user_cache_dir() / f"{remote.name(self.root) or 'data'}-{digest}"

    @property
    def size(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])


@dataclass(kw_only=True)
class AugmentParams:
    """One strength level. Probabilities are per image; magnitudes are maxima."""

    crop_scale: list[float] = opt(factory=lambda: [0.5, 1.0], help="random-resized-crop area range; [1,1] off")
    crop_ratio: list[float] = opt(factory=lambda: [0.75, 1.333])
    hflip: float = opt(0.5, min=0.0, max=1.0)
    vflip: float = opt(0.0, min=0.0, max=1.0)
    affine_p: float = opt(0.5, min=0.0, max=1.0)
    shift: float = opt(0.1, min=0.0, max=1.0, help="fraction of size")
    scale: float = opt(0.1, min=0.0, max=1.0)
    rotate: float = opt(15.0, min=0.0, max=180.0, help="degrees")
    color_p: float = opt(0.5, min=0.0, max=1.0)
    brightness: float = opt(0.2, min=0.0, max=1.0)
    contrast: float = opt(0.2, min=0.0, max=1.0)
    saturation: float = opt(0.2, min=0.0, max=1.0)
    hue: float = opt(0.03, min=0.0, max=0.5)
    noise_p: float = opt(0.2, min=0.0, max=1.0)
    noise_std: float = opt(8.0, min=0.0, help="on the 0..255 scale")
    blur_p: float = opt(0.0, min=0.0, max=1.0)
    blur_sigma: float = opt(1.0, min=0.0)
    erase_p: float = opt(0.0, min=0.0, max=1.0)
    erase_size: float = opt(0.15, min=0.0, max=1.0, help="hole side as fraction of size")
    erase_holes: int = opt(1, min=1, max=16)
    elastic_p: float = opt(0.0, min=0.0, max=1.0, help="elastic deformation (segmentation)")
    elastic_alpha: float = opt(4.0, min=0.0, help="max displacement in pixels")


def _tier(**kw) -> AugmentParams:
    return AugmentParams(**kw)


# Strength tiers follow the Rakuten preprocessing document: light for big
# classes, heavy for rare ones.
LIGHT = dict(crop_scale=[0.8, 1.0], hflip=0.3, affine_p=0.2, shift=0.0, scale=0.0, rotate=10.0,
             color_p=0.3, brightness=0.1, contrast=0.1, saturation=0.0, hue=0.0, noise_p=0.0)
MEDIUM = dict(crop_scale=[0.6, 1.0], hflip=0.5, affine_p=0.5, shift=0.1, scale=0.1, rotate=15.0,
              color_p=0.5, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, noise_p=0.2)
HEAVY = dict(crop_scale=[0.4, 1.0], hflip=0.5, vflip=0.1, affine_p=0.7, shift=0.15, scale=0.15,
             rotate=20.0, color_p=0.7, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.06,
             noise_p=0.3, blur_p=0.1, erase_p=0.3, erase_size=0.08, erase_holes=4)


@dataclass(kw_only=True)
class TierConfig:
    enabled: bool = opt(False, help="pick light/medium/heavy per image from its class size")
    thresholds: list[int] = opt(
        factory=lambda: [1500, 3000], help="classes under [0] images get heavy, under [1] medium, else light"
    )
    light: AugmentParams = opt(factory=lambda: _tier(**LIGHT))
    medium: AugmentParams = opt(factory=lambda: _tier(**MEDIUM))
    heavy: AugmentParams = opt(factory=lambda: _tier(**HEAVY))


@dataclass(kw_only=True)
class MixConfig:
    mixup_alpha: float = opt(0.0, min=0.0, help="0 disables MixUp")
    cutmix_alpha: float = opt(0.0, min=0.0, help="0 disables CutMix")
    p: float = opt(0.5, min=0.0, max=1.0, help="probability a batch is mixed")


@dataclass(kw_only=True)
class AugmentConfig:
    enabled: bool = opt(True)
    params: AugmentParams = opt(factory=AugmentParams, help="used for every image unless tiers are on")
    tiers: TierConfig = opt(factory=TierConfig)
    mix: MixConfig = opt(factory=MixConfig)
    albumentations: dict | None = opt(
        None, help="an A.to_dict() pipeline run per image instead of the native ops (slower)"
    )
    placement: Literal["host", "accelerator"] = opt(
        "host", help="where flips, affine, colour, noise, blur, erasing, elastic and MixUp/CutMix run: in "
        "tf.data per image (host), or on whole batches in the train step on the model's device (accelerator; "
        "for few host cores). Crop, decode and resize stay on the host either way")

    def __post_init__(self):
        if self.placement == "accelerator" and self.albumentations is not None:
            # The bridge runs NumPy per image through tf.numpy_function: it cannot run on an
            # accelerator, in a traced train step, nor on a TPU at all.
            raise ConfigError("augment.placement: 'accelerator' runs the native ops in the train step; "
                              "augment.albumentations runs per image in Python on the host, so it needs "
                              "placement 'host'")


@dataclass(kw_only=True)
class HeadConfig:
    type: Literal["linear", "mlp"] = opt("linear")
    hidden: list[int] = opt(factory=lambda: [512])
    dropout: float = opt(0.2, min=0.0, max=0.95)


@dataclass(kw_only=True)
class UNetConfig:
    """Segmentation decoder. base_filters/depth shape the classic U-Net (model.backbone "unet");
    decoder_filters the decoder on a registered encoder."""

    base_filters: int = opt(64, min=1, help="classic U-Net: filters of the first level (64 -> 1024 at depth 5)")
    depth: int = opt(5, min=2, max=8, help="classic U-Net: levels, i.e. depth-1 poolings")
    decoder_filters: list[int] = opt(factory=lambda: [256, 128, 64, 32, 16], help="encoder U-Net decoder")
    upsampling: Literal["transpose", "bilinear"] = opt("transpose")
    attention: bool = opt(False, help="attention gates on the skip connections")
    deep_supervision: bool = opt(False, help="auxiliary losses on coarser decoder levels")
    norm: Literal["batch", "group"] = opt("batch", help="group suits small batches")
    groups: int = opt(8, min=1)
    dropout: float = opt(0.0, min=0.0, max=0.9)


@dataclass(kw_only=True)
class ModelConfig:
    backbone: str = opt(help='registered backbone, e.g. efficientnetv2_b0, convnext_tiny, resnet50; "unet" '
                        "for the classic U-Net (segmentation)")
    weights: str | None = opt("imagenet", help="imagenet, null, or a local weights file")
    head: HeadConfig = opt(factory=HeadConfig)
    unet: UNetConfig = opt(factory=UNetConfig, help="segmentation only")


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd"] = opt("adamw")
    lr: float = opt(1e-3, min=0.0)
    weight_decay: float = opt(1e-4, min=0.0)
    momentum: float = opt(0.9, min=0.0, max=1.0, help="SGD only")
    backbone_lr_mult: float = opt(0.1, min=0.0, help="backbone learning rate = lr * this")
    clipnorm: float | None = opt(None, min=0.0)


@dataclass(kw_only=True)
class ScheduleConfig:
    name: Literal["constant", "onecycle", "cosine", "plateau"] = opt("cosine")
    warmup_epochs: float = opt(0.0, min=0.0)
    pct_start: float = opt(0.3, min=0.0, max=1.0, help="OneCycle share of steps spent rising")
    div_factor: float = opt(25.0, min=1.0, help="OneCycle start lr = max lr / this")
    final_div_factor: float = opt(1e4, min=1.0)
    min_lr: float = opt(0.0, min=0.0)
    plateau_factor: float = opt(0.5, min=0.0, max=1.0)
    plateau_patience: int = opt(2, min=0)


@dataclass(kw_only=True)
class LossConfig:
    name: str | None = opt(
        None, help="the task's loss: crossentropy or focal (classification, multilabel), also dice and ce_dice "
        "(segmentation), mse, huber or smooth_l1 (regression); default: the task's first")
    label_smoothing: float = opt(0.0, min=0.0, max=0.5)
    class_weights: Literal["none", "inverse", "normalized", "sqrt_inverse"] = opt("none")
    class_weights_file: str | None = opt(
        None, help="segmentation: JSON cache of the pixel-count weights (computed once, then read)")
    dice_weight: float = opt(1.0, min=0.0, help="ce_dice: weight of the Dice term")
    focal_gamma: float = opt(2.0, min=0.0)
    alpha: Literal["none", "neg_pos"] | float = opt(
        "none", help="multilabel per-class positive weight: neg/pos from training counts, or one value"
    )


@dataclass(kw_only=True)
class PhaseConfig:
    epochs: int = opt(min=1)
    trainable: Literal["head", "last_n_blocks", "all"] = opt("all")
    n_blocks: int = opt(1, min=1, help="with last_n_blocks")
    lr: float | None = opt(None, min=0.0, help="overrides optimizer.lr for this phase")
    image_size: int | list[int] | None = opt(None, min=8, help="progressive resizing")


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    patience: int = opt(0, min=0, help="0 disables early stopping")
    min_delta: float = opt(0.0, min=0.0)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int | None = opt(None, min=1, help="default 10, or the sum of the phases' epochs")
    batch_size: int = opt(32, min=1, help="per replica (device); the global batch is this x replicas, and "
                          "every learning rate is multiplied by the replica count (linear scaling rule)")
    steps_per_epoch: int | None = opt(None, min=1, help="cap steps per epoch (smoke runs)")
    optimizer: OptimizerConfig = opt(factory=OptimizerConfig)
    schedule: ScheduleConfig = opt(factory=ScheduleConfig)
    loss: LossConfig = opt(factory=LossConfig)
    phases: list[PhaseConfig] = opt(factory=list, help="staged unfreezing; default one phase, all layers")
    monitor: str = opt("val_loss", help="metric for best checkpoint and early stopping")
    early_stopping: EarlyStoppingConfig = opt(factory=EarlyStoppingConfig)
    mixed_precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = opt("float32")
    strategy: Literal["default", "mirrored", "multi_worker", "tpu", "jax"] = opt(
        "default", help="default: one device; mirrored: this machine's GPUs (or CPUs); multi_worker: "
        "the machines in TF_CONFIG; tpu: the local TPU (mixed_bfloat16, no host-side Python in the input); "
        "jax: Keras on the JAX backend, keras.distribution.DataParallel over all devices")
    steps_per_execution: int | None = opt(None, min=1, help="batches per device call; default 32 with "
                                          "strategy tpu, else 1")
    tensorboard: bool = opt(True)


def default_phases(cfg: Config) -> list[PhaseConfig]:
    """The training phases: `train.phases`, or one phase training every layer."""
    return cfg.train.phases or [PhaseConfig(epochs=cfg.train.epochs, trainable="all")]


@dataclass(kw_only=True)
class Config:
    task: str = opt("classification", help="a registered task (tfvision.tasks): classification, multilabel, "
                    "segmentation, regression, ...")
    seed: int = opt(42, min=0)
    data: DataConfig = opt()
    model: ModelConfig = opt()
    augment: AugmentConfig = opt(factory=AugmentConfig)
    train: TrainConfig = opt(factory=TrainConfig)
    name: str | None = opt(None, help="run name; default is the config file name")
    # The task's own section (`Task.options`), written in JSON under the task's name, e.g.
    # {"task": "regression", "regression": {...}}; filled by the loader.
    task_options: Any = opt(None, internal=True)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        options = out.pop("task_options")
        if options is not None:
            out[self.task] = options
        return out


# --------------------------------------------------------------------------- validation


def _hint(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


class _Invalid(Exception):
    pass


def _coerce(value, tp, path: str, meta: dict):
    """Return `value` converted to `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # An object goes straight to the dataclass member so that its own errors
        # (an unknown nested key) surface instead of a vague "wrong type".
        if isinstance(value, dict):
            for arg in args:
                if dataclasses.is_dataclass(arg):
                    return _coerce(value, arg, path, meta)
        for arg in args:
            try:
                return _coerce(value, arg, path, meta)
            except _Invalid:
                continue
        raise _Invalid
    if tp is type(None):
        if value is None:
            return None
        raise _Invalid
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}{did_you_mean(value, choices)}")
        raise _Invalid
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Invalid
        return build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}[{i}]", meta) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            _check_range(value, path, meta)
            return value
        raise _Invalid
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(value, path, meta)
            return float(value)
        raise _Invalid
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise _Invalid
    raise TypeError(f"schema type {tp} not handled")  # a bug in the schema, not the config


def _check_range(value, path, meta):
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{path}: {value} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{path}: {value} is above the maximum {meta['max']}")


def build(cls, raw: dict, prefix: str = ""):
    """The dataclass `cls` from a JSON object; unknown keys, wrong types and ranges raise ConfigError."""
    hints = _hint(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key{did_you_mean(key, fields, known='known keys')}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: required key is missing")
            continue
        try:
            kwargs[name] = _coerce(raw[name], hints[name], where, dict(f.metadata))
        except _Invalid:
            raise ConfigError(
                f"{where}: expected {_type_name(hints[name])}, got {json.dumps(raw[name])}"
            ) from None
    return cls(**kwargs)


def _resolve_root(data: DataConfig) -> None:
    """A bundled dataset with no root is built in the user cache, never in the working folder."""
    if data.root is None:
        if data.prepare is None:
            raise ConfigError("data.root: required key is missing")
        from tfvision.fileio import user_cache_dir

        data.root = str(user_cache_dir() / "datasets" / data.prepare)


# Sources that read a gs:// (or ram://) data.root: they list and open files through
# tfvision.remote. The others hand paths to readers that want a local file (pydicom, nibabel)
# or write derived data beside their listing, so they are refused by name.
URL_SOURCES = ("csv", "folders", "tfrecord")


def check_paths(cfg: Config) -> None:
    """The files and folders the config names exist (local ones; a URL root is checked when
    its source reads it, with TensorFlow's filesystem layer, which is not loaded here)."""
    data = cfg.data
    _resolve_root(data)
    if "://" in data.root:
        if data.source not in URL_SOURCES:
            raise ConfigError(f"data.root: {data.root} is a URL; data.source {data.source!r} reads local "
                              f"files only (URL roots: {', '.join(URL_SOURCES)}); copy the data to a local "
                              f"folder (and convert it there to shards on gs://, which train from anywhere)")
        if data.prepare is not None:
            raise ConfigError(f"data.prepare: builds a dataset into a local folder, but data.root "
                              f"{data.root} is a URL; drop data.root (the cache) or data.prepare")
        _check_model_weights(cfg)
        return
    root = Path(data.root)
    if data.prepare is not None and data.source != "tfrecord":
        from tfvision.data import builtin
        from tfvision.fileio import ours_or_absent

        # Checked here, before TensorFlow loads: the user's own folder is never replaced.
        if not ours_or_absent(root, builtin.MARKER):
            raise ConfigError(builtin.refusal(data.prepare, root))
    if data.prepare is None and data.source != "tfrecord" and not root.is_dir():
        raise ConfigError(f"data.root: folder {str(root)!r} does not exist")
    if data.source == "tfrecord" and not (root / "manifest.json").is_file():
        raise ConfigError(f"data.root: no manifest.json in {str(root)!r}; make shards with python -m tfvision.convert")
    for key in ("csv", "val_csv", "annotations", "val_annotations"):
        value = getattr(data, key)
        if value is not None and data.prepare is None and data.source != "tfrecord":
            p = root / value
            if not p.is_file():
                raise ConfigError(f"data.{key}: file {str(p)!r} does not exist")
    for i, d in enumerate(data.image_dirs):
        if data.prepare is None and data.source != "tfrecord" and not (root / d).is_dir():
            raise ConfigError(f"data.image_dirs[{i}]: folder {str(root / d)!r} does not exist")
    _check_model_weights(cfg)


def _check_model_weights(cfg: Config) -> None:
    w = cfg.model.weights
    if w not in (None, "imagenet") and not Path(w).is_file():
        raise ConfigError(f"model.weights: {w!r} is neither 'imagenet', null, nor an existing file")


def check_semantics(cfg: Config, task_backbones: tuple[str, ...] = ()) -> None:
    """Cross-field rules that a type cannot express and that hold for every task (each task adds
    its own in `Task.check_config`); `task_backbones`: the task's own model.backbone names."""
    names = BACKBONE_NAMES + tuple(task_backbones)
    if cfg.model.backbone not in names:
        hint = did_you_mean(cfg.model.backbone, names, known="known")
        raise ConfigError(f"model.backbone: unknown backbone {cfg.model.backbone!r}{hint}")
    d = cfg.data
    for key in ("uncertain", "blank"):
        for cls, pol in getattr(d, key).per_class.items():
            if pol not in POLICIES:
                raise ConfigError(f"data.{key}.per_class.{cls}: {pol!r} is not one of {list(POLICIES)}"
                                  f"{did_you_mean(pol, POLICIES)}")
    for cls, f in d.oversample.factors.items():
        if not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 0:
            raise ConfigError(f"data.oversample.factors.{cls}: expected a positive number, got {json.dumps(f)}")
    if d.source in ("csv", "sartorius", "airbus") and d.csv is None:
        raise ConfigError(f"data.csv: required when data.source is {d.source!r}")
    if d.source == "coco" and d.annotations is None:
        raise ConfigError("data.annotations: required when data.source is 'coco' (the instances JSON)")
    if isinstance(d.image_size, list) and len(d.image_size) != 2:
        raise ConfigError(f"data.image_size: expected N or [H, W], got {d.image_size}")
    if d.val_csv and d.split_column:
        raise ConfigError("data.val_csv: give either val_csv or split_column, not both")
    # These layouts name their own groups (lesion, patient, the shards' saved split, the image).
    own_groups = ("ham10000", "chexpert", "tfrecord", "coco", "sartorius", "airbus")
    if d.split.method == "grouped" and not d.group_column and d.source not in own_groups:
        raise ConfigError("data.split.method: 'grouped' needs data.group_column")
    if d.split.fold is not None and d.split.fold >= d.split.n_folds:
        raise ConfigError(f"data.split.fold: {d.split.fold} must be below n_folds={d.split.n_folds}")
    if d.split.val_fraction + d.split.test_fraction >= 1.0:
        raise ConfigError("data.split: val_fraction + test_fraction must be below 1")
    for name in ("crop_scale", "crop_ratio"):
        for where, p in _all_params(cfg.augment):
            v = getattr(p, name)
            if len(v) != 2 or v[0] > v[1] or v[0] <= 0:
                raise ConfigError(f"augment.{where}.{name}: expected [low, high] with 0 < low <= high, got {v}")
    t = cfg.augment.tiers
    if len(t.thresholds) != 2 or t.thresholds[0] > t.thresholds[1]:
        raise ConfigError(f"augment.tiers.thresholds: expected [heavy_below, medium_below], got {t.thresholds}")
    tr = cfg.train
    if tr.phases:
        total = sum(p.epochs for p in tr.phases)
        if tr.epochs is not None and tr.epochs != total:
            raise ConfigError(f"train.epochs: {tr.epochs} disagrees with the phases, which add up to {total}")
        tr.epochs = total
        for i, p in enumerate(tr.phases):
            if isinstance(p.image_size, list) and len(p.image_size) != 2:
                raise ConfigError(f"train.phases[{i}].image_size: expected N or [H, W]")
    if not tr.phases:
        tr.epochs = tr.epochs or 10
    if tr.schedule.name == "plateau" and not tr.monitor.startswith("val_"):
        raise ConfigError("train.monitor: ReduceLROnPlateau needs a validation metric (val_...)")


def _all_params(aug: AugmentConfig):
    yield "params", aug.params
    for n in ("light", "medium", "heavy"):
        yield f"tiers.{n}", getattr(aug.tiers, n)


# --------------------------------------------------------------------------- JSON Schema


def _schema_for(tp, meta: dict) -> dict:
    origin = typing.get_origin(tp)
    out: dict[str, Any]
    if origin in (typing.Union, types.UnionType):
        out = {"anyOf": [_schema_for(a, meta) for a in typing.get_args(tp)]}
    elif tp is type(None):
        out = {"type": "null"}
    elif origin is Literal:
        out = {"enum": list(typing.get_args(tp))}
    elif dataclasses.is_dataclass(tp):
        out = json_schema(tp)
    elif origin is list:
        out = {"type": "array", "items": _schema_for(typing.get_args(tp)[0], meta)}
    else:
        out = {"type": {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}[tp]}
        if tp in (int, float):
            if "min" in meta:
                out["minimum"] = meta["min"]
            if "max" in meta:
                out["maximum"] = meta["max"]
    return out


def json_schema(cls=Config) -> dict:
    """The JSON Schema of a config section; the whole config's, with each task's section and rules,
    is `tfvision.config_loader.json_schema`."""
    hints = _hint(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        s = _schema_for(hints[f.name], dict(f.metadata))
        if f.metadata.get("help"):
            s["description"] = f.metadata["help"]
        if f.default is not dataclasses.MISSING:
            s["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            s["default"] = _jsonable(f.default_factory())
        else:
            required.append(f.name)
        props[f.name] = s
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    if cls is Config:
        out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out["title"] = "tfvision config"
    return out


def _jsonable(v):
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
