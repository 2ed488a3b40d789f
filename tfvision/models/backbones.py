"""Backbone registry over `keras.applications` (+ one tiny CNN for demos and tests).

Variants are parameter sets, not copies: each registered name maps to a
constructor, the stage regex used for staged unfreezing, and the input
normalisation its ImageNet weights were trained with. Backbones are always
built *without* their own preprocessing layers; `ImageNormalization` in front
of them does that job, once, in a form every exporter understands (stock
Keras `Normalization` loses its constants in tf2onnx 1.17).

>>> backbone = build_backbone("efficientnetv2_b0", (224, 224, 3), weights=None)
>>> backbone.name
'backbone'
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tfvision.errors import ConfigError
from tfvision.registry import Registry

BACKBONES = Registry("backbone")

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@dataclass(frozen=True)
class InputNorm:
    """x -> (x[..., order] - mean) / std on the 0..255 scale."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    bgr: bool = False


TORCH_STYLE = InputNorm(tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
TF_STYLE = InputNorm((128.0,) * 3, (128.0,) * 3)  # x / 128 - 1, EfficientNetV2 S/M/L
CAFFE_STYLE = InputNorm((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True)  # ResNet50


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: callable
    stage_pattern: str  # regex whose group(1) numbers the stage of a layer name
    norm: InputNorm


def _register(name, ctor, stage_pattern, norm, **ctor_kwargs):
    def build(input_shape, weights):
        return ctor(include_top=False, weights=weights, input_shape=input_shape, **ctor_kwargs)

    spec = BackboneSpec(name, build, stage_pattern, norm)
    BACKBONES.register(name)(lambda: spec)


_apps = keras.applications
for _v in ("b0", "b1", "b2", "b3", "s", "m", "l"):
    _register(f"efficientnetv2_{_v}", getattr(_apps, f"EfficientNetV2{_v.upper()}"), r"^block(\d+)",
              TORCH_STYLE if _v.startswith("b") else TF_STYLE, include_preprocessing=False)
for _v, _cls in (("tiny", "Tiny"), ("small", "Small"), ("base", "Base"), ("large", "Large"), ("xlarge", "XLarge")):
    _register(f"convnext_{_v}", getattr(_apps, f"ConvNeXt{_cls}"),
              r"(?:stage_|downsampling_block_)(\d+)", TORCH_STYLE, include_preprocessing=False)
_register("resnet50", _apps.ResNet50, r"^conv(\d+)_", CAFFE_STYLE)


def _small_cnn(include_top, weights, input_shape, width=32):
    """Four conv stages; trains in seconds on CPU. For demos, tests and tiny images."""
    del include_top
    if weights not in (None,):
        raise ConfigError("model.weights: small_cnn has no pretrained weights; use null")
    inputs = keras.Input(input_shape)
    x = inputs
    for i in range(4):
        f = width * 2**i
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"block{i + 1}_conv1")(x)
        # momentum 0.9 (Keras default 0.99): short runs on small data otherwise leave the
        # moving statistics near their initial values and inference collapses to chance.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{i + 1}_bn1")(x)
        x = keras.layers.Activation("relu", name=f"block{i + 1}_relu1")(x)
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"block{i + 1}_conv2")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{i + 1}_bn2")(x)
        x = keras.layers.Activation("relu", name=f"block{i + 1}_relu2")(x)
        if i < 3:
            x = keras.layers.MaxPooling2D(name=f"block{i + 1}_pool")(x)
    return keras.Model(inputs, x, name="small_cnn")


_register("small_cnn", _small_cnn, r"^block(\d+)", InputNorm((127.5,) * 3, (127.5,) * 3))


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES.get(name)()
    except KeyError as e:
        raise ConfigError(f"model.backbone: {e.args[0]}") from None


def _download_hint(name: str, err: Exception) -> str:
    url = re.search(r"https?://\S+?\.h5", str(err))
    fname = url.group(0).rsplit("/", 1)[-1] if url else f"<{name} notop weights>.h5"
    cache = Path(keras.config.keras_home() if hasattr(keras.config, "keras_home") else "~/.keras") / "models"
    return (
        f"model.weights: ImageNet weights for {name!r} could not be downloaded ({type(err).__name__}). "
        f"Offline? Copy {fname} {'from ' + url.group(0) + ' ' if url else ''}to {cache / fname}, "
        f"or set model.weights to the local file path, or to null to train from scratch."
    )


def build_backbone(name: str, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """Build a registered backbone (no top) named "backbone".

    Args:
        name: registered name, e.g. ``efficientnetv2_b0``.
        input_shape: (H, W, C); C other than 3 adapts the first convolution.
        weights: ``"imagenet"``, ``None`` or a local weights file.

    Raises:
        ConfigError: unknown name, or weights that cannot be downloaded.
    """
    spec = get_spec(name)
    channels = input_shape[-1]
    try:
        with warnings.catch_warnings():
            # keras.applications warns on anything but 1 or 3 channels; N channels are intended here.
            warnings.filterwarnings("ignore", message="This model usually expects")
            if channels == 3 or weights is None:
                model = spec.build(input_shape, weights)
            else:
                model = _adapt_channels(spec, input_shape, weights)
    except Exception as e:  # keras raises plain Exception subclasses for URL failures
        if weights == "imagenet" and ("URL fetch failure" in str(e) or "urlopen" in str(e).lower()
                                      or isinstance(e, OSError)):
            raise ConfigError(_download_hint(name, e)) from None
        raise
    model.name = "backbone"  # one fixed name: freezing, Grad-CAM and export look it up
    return model


def _adapt_channels(spec: BackboneSpec, input_shape, weights) -> keras.Model:
    """N-channel input from RGB weights: copy every weight; the first conv gets the RGB
    kernels for channels 0..2 and their mean for the extra ones (1 channel: their sum,
    so a grey image gives the activations of the same image in RGB)."""
    rgb = spec.build(input_shape[:2] + (3,), weights)
    model = spec.build(input_shape, None)
    adapted = False
    for src, dst in zip(rgb.layers, model.layers, strict=True):
        src_w, dst_w = src.get_weights(), dst.get_weights()
        if not src_w:
            continue
        if not adapted and isinstance(dst, keras.layers.Conv2D) and src_w[0].shape != dst_w[0].shape:
            k = src_w[0]  # [kh, kw, 3, out]
            c = input_shape[-1]
            if c == 1:
                new = k.sum(axis=2, keepdims=True)
            else:
                extra = np.repeat(k.mean(axis=2, keepdims=True), c - 3, axis=2)
                new = np.concatenate([k, extra], axis=2)
            dst.set_weights([new] + src_w[1:])
            adapted = True
        else:
            dst.set_weights(src_w)
    return model


def stage_of_layers(backbone: keras.Model, pattern: str) -> list[int]:
    """Stage index for each layer, in order. Layers before the first match are stage 0
    (stem); layers after a stage (top conv, final norm) belong to the stage before them."""
    rx = re.compile(pattern)
    stage, out = 0, []
    for layer in backbone.layers:
        m = rx.search(layer.name)
        if m:
            stage = int(m.group(1)) + 1  # +1 keeps the stem at 0 for 0-based patterns
        out.append(stage)
    return out


def set_trainable(backbone: keras.Model, pattern: str, mode: str, n_blocks: int = 1) -> None:
    """Freeze/unfreeze the backbone for a training phase: head | last_n_blocks | all."""
    if mode == "all":
        backbone.trainable = True
        for layer in backbone.layers:
            layer.trainable = True
        return
    if mode == "head":
        backbone.trainable = False
        return
    stages = stage_of_layers(backbone, pattern)
    keep = set(sorted(set(stages))[-n_blocks:])
    backbone.trainable = True
    for layer, s in zip(backbone.layers, stages, strict=True):
        layer.trainable = s in keep
