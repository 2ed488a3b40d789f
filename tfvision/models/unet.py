"""U-Net segmentation models: the classic U-Net and a U-Net decoder on a registered encoder.

    image (0..255, any size) -> ImageNormalization -> PadToMultiple -> encoder
        -> decoder (skips, optional attention gates) -> CropTo -> float32 "logits" [B, H, W, K]

As with image models, normalisation is inside the model so every export carries
it, and logits are float32 under mixed precision (losses work from logits).

Any image size works: the input is zero-padded (after normalisation, so with
the mean intensity) at the bottom/right to a multiple of the total stride, and
the logits are cropped back to the input size.

Deep supervision (``deep_supervision=True``) adds aux heads on the coarser
decoder levels. The model then has the outputs ``["logits", "aux_1", ...]``
(``aux_k`` from the level at stride 2**k), each up-sampled to full size, so all
compare with the same mask: compile with `tfvision.seg_losses.deep_supervision_losses`
and feed ``deep_supervision_targets(mask, model.output_names)``. For inference
and export, `main_output_model` keeps only ``logits``. Without deep supervision
the model has the single output ``logits``.

>>> model = build_unet(1, 3, InputNorm((0.0,), (1.0,)), base_filters=8, depth=3)
>>> model(np.zeros((2, 40, 56, 1))).shape
TensorShape([2, 40, 56, 3])
"""

from __future__ import annotations

import math

import keras

from tfvision.errors import ConfigError
from tfvision.models.backbones import InputNorm, build_backbone
from tfvision.models.layers import ImageNormalization
from tfvision.models.unet_blocks import (
    NORM_LAYERS,
    UPSAMPLING,
    PadToMultiple,
    conv_block,
    decoder_block,
    logits_head,
)

ARCHS = ("unet",)
CLASSIC = "unet"  # model.backbone value that selects the classic (encoder-less) U-Net
_CLASSIC_ONLY = ("base_filters", "depth")
_ENCODER_ONLY = ("decoder_filters",)
_PROBE = 256  # probe size for skip selection: divisible by every stride up to 2**8


def _check(upsampling: str, norm_layer: str) -> None:
    if upsampling not in UPSAMPLING:
        raise ConfigError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
    if norm_layer not in NORM_LAYERS:
        raise ConfigError(f"norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")


def _stem(channels: int, norm: InputNorm, multiple: int):
    image = keras.Input((None, None, channels), name="image")
    x = ImageNormalization(norm.mean, norm.std, norm.bgr and channels >= 3, name="normalize")(image)
    return image, PadToMultiple(multiple, name="pad")(x)


def _heads(image, levels, num_classes: int, deep_supervision: bool):
    """``levels``: decoder outputs as (tensor, stride), coarsest first, finest last."""
    x, stride = levels[-1]
    if stride > 1:  # a decoder that stops short of full resolution
        x = keras.layers.UpSampling2D(stride, interpolation="bilinear", name="final_upsample")(x)
    outputs = [logits_head(x, image, num_classes)]
    if deep_supervision:
        for feat, s in reversed(levels[:-1]):
            outputs.append(logits_head(feat, image, num_classes, s, name=f"aux_{int(math.log2(s))}"))
    return outputs if deep_supervision else outputs[0]


def build_unet(
    channels: int, num_classes: int, norm: InputNorm, *, base_filters: int = 64, depth: int = 5,
    upsampling: str = "transpose", attention: bool = False, deep_supervision: bool = False,
    norm_layer: str = "batch", groups: int = 8, dropout: float = 0.0, name: str = "unet",
) -> keras.Model:
    """The classic U-Net (Ronneberger et al. 2015) with 'same' convolutions.

    Filters double per level: base_filters * 2**i for i < depth (64..1024 by
    default, 4 poolings). The input is padded to a multiple of 2**(depth-1).

    Args:
        channels: input channels (1 for CT slices).
        num_classes: K, background included; logits are [B, H, W, K].
        norm: input normalisation constants on the 0..255 scale.
        base_filters: filters at full resolution.
        depth: number of levels including the bottleneck (depth - 1 poolings).
        upsampling: ``transpose`` (2x2 transposed conv) or ``bilinear`` (+1x1 conv).
        attention: attention gates on the skip connections.
        deep_supervision: add ``aux_k`` outputs (see the module docstring).
        norm_layer: ``batch`` or ``group`` (GroupNorm, for small batches).
        groups: GroupNorm groups (reduced to a divisor of each level's filters).
        dropout: Dropout rate after the bottleneck, the paper's "drop-out layers
            at the end of the contracting path"; 0 disables it.
        name: model name.

    Raises:
        ConfigError: an unknown upsampling or norm_layer, or depth < 2.
    """
    _check(upsampling, norm_layer)
    if depth < 2:
        raise ConfigError(f"depth must be at least 2 (one pooling), got {depth}")
    filters = [base_filters * 2**i for i in range(depth)]
    image, x = _stem(channels, norm, 2 ** (depth - 1))
    skips = []
    for i, f in enumerate(filters[:-1]):
        x = conv_block(x, f, norm_layer, groups, f"enc{i}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(name=f"enc{i}_pool")(x)
    x = conv_block(x, filters[-1], norm_layer, groups, "bottleneck")
    if dropout:
        x = keras.layers.Dropout(dropout, name="bottleneck_dropout")(x)
    levels = []
    for i in reversed(range(depth - 1)):
        x = decoder_block(x, skips[i], filters[i], upsampling=upsampling, attention=attention,
                          norm_layer=norm_layer, groups=groups, name=f"dec{i}")
        levels.append((x, 2**i))
    return keras.Model(image, _heads(image, levels, num_classes, deep_supervision), name=name)


def encoder_features(backbone: keras.Model, channels: int) -> tuple[dict, int]:
    """Skip features of a (no-top) encoder: ``{stride: Keras tensor}`` and the output stride.

    For each stride below the output stride, the skip is the output of the
    *last* operation (in graph order) with exactly that resolution: the most
    refined feature before the next down-sampling. Operations, not only layers:
    ConvNeXt's residual sums are bare ``x + y`` ops, and its last *layer* at a
    resolution is the residual branch alone. Strides are read from symbolic
    shapes on a 256 px probe (nothing is computed), so any `keras.applications`
    layout works without per-family layer lists. A stride with no feature
    (ConvNeXt's stride-4 stem leaves none at stride 2) is simply absent.
    """
    nodes = [op.output for op in backbone.operations if not isinstance(op, keras.layers.InputLayer)]
    nodes = [t for t in nodes if isinstance(t, keras.KerasTensor) and len(t.shape) == 4]
    probe_in = keras.KerasTensor((1, _PROBE, _PROBE, channels))
    specs = keras.Model(backbone.inputs, nodes).compute_output_spec(probe_in)
    out_stride = _PROBE // backbone.compute_output_spec(probe_in).shape[1]
    found = {}
    for tensor, spec in zip(nodes, specs, strict=True):
        h, w = spec.shape[1], spec.shape[2]
        if h and h == w and _PROBE % h == 0 and _PROBE // h < out_stride:
            found[_PROBE // h] = tensor
    return found, out_stride


def multi_output_encoder(backbone: keras.Model, channels: int) -> tuple[keras.Model, list[int], int]:
    """The encoder as one nested model named "backbone" returning [skips..., bottleneck].

    It reuses the original layers (and their weights), so `set_trainable` with the
    registry's stage pattern works on it unchanged. Returns the model, the skip
    strides (finest first) and the output stride.
    """
    found, out_stride = encoder_features(backbone, channels)
    strides = sorted(found)
    outputs = [found[s] for s in strides] + list(backbone.outputs)
    return keras.Model(backbone.inputs, outputs, name="backbone"), strides, out_stride


def build_encoder_unet(
    backbone_name: str, channels: int, num_classes: int, norm: InputNorm, weights=None, *,
    decoder_filters=(256, 128, 64, 32, 16), upsampling: str = "transpose", attention: bool = False,
    deep_supervision: bool = False, norm_layer: str = "batch", groups: int = 8, dropout: float = 0.0,
    name: str = "unet",
) -> keras.Model:
    """U-Net decoder on a registered `keras.applications` encoder (EfficientNetV2, ConvNeXt, ResNet50).

    Each decoder block up-samples x2 and joins the encoder skip at its stride
    (`encoder_features`); from a stride-32 encoder the default five blocks end
    at full resolution (the last, and ConvNeXt's stride-2 block, have no skip).
    A shorter ``decoder_filters`` ends with a bilinear up-sampling to full size.
    The input is padded to a multiple of the encoder's output stride.

    Args:
        backbone_name: registered backbone name, e.g. ``efficientnetv2_b0``.
        channels, num_classes, norm: as in `build_unet`.
        weights: ``"imagenet"``, ``None`` or a local weights file for the encoder.
        decoder_filters: filters of the decoder blocks, coarsest first.
        upsampling, attention, deep_supervision, norm_layer, groups, name: as in `build_unet`.
        dropout: Dropout rate on the encoder output; 0 disables it.

    Raises:
        ConfigError: unknown backbone, offline weights, or more decoder blocks than
            the encoder has down-samplings.
    """
    _check(upsampling, norm_layer)
    raw = build_backbone(backbone_name, (None, None, channels), weights)
    encoder, skip_strides, out_stride = multi_output_encoder(raw, channels)
    n_up = int(math.log2(out_stride))
    if len(decoder_filters) > n_up:
        raise ConfigError(f"decoder_filters: {backbone_name} down-samples {n_up} times; "
                          f"got {len(decoder_filters)} decoder blocks")
    image, x = _stem(channels, norm, out_stride)
    *skip_feats, x = encoder(x)
    skips = dict(zip(skip_strides, skip_feats, strict=True))
    if dropout:
        x = keras.layers.Dropout(dropout, name="encoder_dropout")(x)
    levels, stride = [], out_stride
    for i, f in enumerate(decoder_filters):
        stride //= 2
        x = decoder_block(x, skips.get(stride), f, upsampling=upsampling, attention=attention,
                          norm_layer=norm_layer, groups=groups, name=f"dec{i}")
        levels.append((x, stride))
    return keras.Model(image, _heads(image, levels, num_classes, deep_supervision), name=name)


def build_segmentation_model(arch: str, backbone: str, channels: int, num_classes: int, norm: InputNorm,
                             weights=None, **unet_kwargs) -> keras.Model:
    """Segmentation model from config values: the classic U-Net when ``backbone == "unet"``.

    ``base_filters``/``depth`` only apply to the classic U-Net and
    ``decoder_filters`` only to encoder U-Nets; each is ignored by the other, so
    one config section can carry both. The classic U-Net has no ImageNet
    weights; ``weights`` may be a local ``.weights.h5`` of the same architecture.

    Raises:
        ConfigError: unknown arch, ``weights="imagenet"`` with the classic U-Net,
            or any error of the builders.
        TypeError: an unknown keyword argument.
    """
    if arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown segmentation architecture {arch!r}; choose from {ARCHS}")
    if backbone == CLASSIC:
        kwargs = {k: v for k, v in unet_kwargs.items() if k not in _ENCODER_ONLY}
        if weights == "imagenet":
            raise ConfigError('model.weights: the classic U-Net has no ImageNet weights; use null '
                              'or an encoder backbone such as "efficientnetv2_b0"')
        model = build_unet(channels, num_classes, norm, **kwargs)
        if weights is not None:
            model.load_weights(weights)
        return model
    kwargs = {k: v for k, v in unet_kwargs.items() if k not in _CLASSIC_ONLY}
    return build_encoder_unet(backbone, channels, num_classes, norm, weights, **kwargs)


def main_output_model(model: keras.Model) -> keras.Model:
    """The same model (shared weights) with only its ``logits`` output, for inference and export."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.input, model.get_layer("logits").output, name=model.name)
