"""U-Nets (classic and on registered encoders), segmentation losses and metrics."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score, jaccard_score

from tests.eval_helpers import dice_per_class, iou_per_class
from tfvision.errors import ConfigError
from tfvision.models.backbones import (
    TORCH_STYLE,
    InputNorm,
    build_backbone,
    get_spec,
    set_trainable,
)
from tfvision.models.unet import (
    build_encoder_unet,
    build_segmentation_model,
    build_unet,
    encoder_features,
    main_output_model,
)
from tfvision.seg_losses import (
    CEPlusDice,
    SegmentationFocalLoss,
    SoftDice,
    WeightedCrossEntropy,
    deep_supervision_losses,
    deep_supervision_targets,
    load_or_compute_class_weights,
    pixel_class_counts,
    segmentation_class_weights,
)
from tfvision.seg_metrics import DiceScore, IoUScore, macro

GREY = InputNorm((127.5,), (127.5,))
RNG = np.random.default_rng(0)


def images(n, h, w, c=1):
    return RNG.uniform(0, 255, (n, h, w, c)).astype("float32")


def dtype_of(t):
    return keras.backend.standardize_dtype(t.dtype)


def outputs_of(model, x):
    out = model(x)
    return out if isinstance(out, list) else [out]


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("kwargs", [
    {"upsampling": "transpose"},
    {"upsampling": "bilinear"},
    {"attention": True},
    {"deep_supervision": True, "upsampling": "bilinear"},
    {"norm_layer": "group", "groups": 8, "dropout": 0.2},
    {"depth": 5, "base_filters": 4, "attention": True, "deep_supervision": True, "norm_layer": "group"},
])
def test_classic_unet_returns_full_size_float32_logits(kwargs):
    kwargs = {"base_filters": 8, "depth": 3, **kwargs}
    model = build_unet(1, 3, GREY, **kwargs)
    outs = outputs_of(model, images(2, 40, 56))  # 40x56: not a multiple of 2**(depth-1)
    n_aux = kwargs["depth"] - 2 if kwargs.get("deep_supervision") else 0
    assert model.output_names == ["logits"] + [f"aux_{k}" for k in range(1, n_aux + 1)]
    for out in outs:
        assert out.shape == (2, 40, 56, 3) and dtype_of(out) == "float32"
        assert np.isfinite(np.asarray(out)).all()
    if kwargs.get("attention"):
        assert model.get_layer("dec0_gate_psi").output.shape[-1] == 1


def test_classic_unet_default_is_the_paper_layout():
    model = build_unet(1, 2, GREY)
    assert [model.get_layer(f"enc{i}_conv2").filters for i in range(4)] == [64, 128, 256, 512]
    assert model.get_layer("bottleneck_conv2").filters == 1024
    assert model.get_layer("pad").multiple == 16
    assert 31.0e6 < model.count_params() < 31.1e6  # the 31.0M of the reference implementations


@pytest.mark.parametrize("name, skips", [
    ("efficientnetv2_b0", {2, 4, 8, 16}),
    ("convnext_tiny", {4, 8, 16}),  # stride-4 stem: no stride-2 feature
    ("resnet50", {2, 4, 8, 16}),
])
def test_encoder_unet_builds_on_registered_backbones(name, skips):
    found, out_stride = encoder_features(build_backbone(name, (None, None, 3), None), 3)
    assert set(found) == skips and out_stride == 32
    model = build_encoder_unet(name, 3, 4, TORCH_STYLE, None, attention=name == "resnet50",
                               deep_supervision=name == "convnext_tiny")
    encoder = model.get_layer("backbone")
    assert len(encoder.outputs) == len(skips) + 1
    for h, w in ((64, 64), (40, 56)):
        for out in outputs_of(model, images(1, h, w, 3)):
            assert out.shape == (1, h, w, 4) and dtype_of(out) == "float32"


def test_convnext_skips_include_the_residual_sum():
    """ConvNeXt adds residuals with a bare ``x + y`` op; the skip must be that sum, not the branch."""
    found, _ = encoder_features(build_backbone("convnext_tiny", (None, None, 3), None), 3)
    for tensor in found.values():
        assert "identity" not in tensor._keras_history.operation.name


def test_short_decoder_ends_with_an_upsampling_and_too_long_one_is_refused():
    model = build_encoder_unet("small_cnn", 1, 2, GREY, decoder_filters=(16,))
    assert model(images(1, 36, 20)).shape == (1, 36, 20, 2)
    assert model.get_layer("final_upsample").size == (4, 4)
    with pytest.raises(ConfigError, match="down-samples 3 times"):
        build_encoder_unet("small_cnn", 1, 2, GREY, decoder_filters=(16, 8, 8, 8))


def test_mixed_precision_keeps_float32_logits_and_aux_outputs():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        classic = build_unet(1, 3, GREY, base_filters=8, depth=3, attention=True,
                             deep_supervision=True, norm_layer="group")
        encoder = build_encoder_unet("efficientnetv2_b0", 1, 3, GREY, decoder_filters=(32, 16, 8, 8, 8))
        for model in (classic, encoder):
            for out in outputs_of(model, images(2, 40, 56)):
                assert out.shape == (2, 40, 56, 3) and dtype_of(out) == "float32"
                assert np.isfinite(np.asarray(out)).all()
        assert classic.get_layer("dec0_conv1").compute_dtype == "float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("builder", ["classic", "encoder"])
def test_unet_round_trips_through_keras_file_in_safe_mode(tmp_path, builder):
    if builder == "classic":
        model = build_unet(1, 3, GREY, base_filters=8, depth=3, upsampling="bilinear", attention=True,
                           deep_supervision=True, norm_layer="group")
    else:
        model = build_encoder_unet("efficientnetv2_b0", 3, 3, TORCH_STYLE, attention=True,
                                   decoder_filters=(32, 16, 8, 8, 8))
    x = images(2, 40, 56, model.input.shape[-1])
    path = tmp_path / "unet.keras"
    model.save(path)
    again = keras.saving.load_model(path)  # safe_mode=True
    for a, b in zip(outputs_of(model, x), outputs_of(again, x), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert again.output_names == model.output_names


def test_set_trainable_on_the_nested_encoder():
    spec = get_spec("efficientnetv2_b0")
    model = build_encoder_unet("efficientnetv2_b0", 3, 2, TORCH_STYLE, decoder_filters=(16, 8, 8, 8, 8))
    backbone = model.get_layer("backbone")
    n_all, n_backbone = len(model.trainable_weights), len(backbone.trainable_weights)
    set_trainable(backbone, spec.stage_pattern, "head")
    n_head = len(model.trainable_weights)
    assert n_head == n_all - n_backbone and n_head > 0
    set_trainable(backbone, spec.stage_pattern, "last_n_blocks", 1)
    n_last = len(model.trainable_weights)
    assert n_head < n_last < n_all
    assert not backbone.get_layer("block1a_project_conv").trainable
    assert backbone.get_layer("top_conv").trainable


def test_dispatcher_routes_and_refuses_imagenet_for_the_classic_unet():
    classic = build_segmentation_model("unet", "unet", 1, 2, GREY, None, base_filters=8, depth=3,
                                       decoder_filters=(8,))  # ignored by the classic U-Net
    assert classic.get_layer("pad").multiple == 4
    enc = build_segmentation_model("unet", "small_cnn", 1, 2, GREY, None, base_filters=8, depth=3,
                                   decoder_filters=(16, 8, 8))
    assert enc.get_layer("backbone").name == "backbone"
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_segmentation_model("unet", "unet", 1, 2, GREY, "imagenet")
    with pytest.raises(ConfigError, match="unknown segmentation architecture"):
        build_segmentation_model("fpn", "unet", 1, 2, GREY)
    with pytest.raises(ConfigError, match="norm_layer"):
        build_unet(1, 2, GREY, norm_layer="instance")


def test_deep_supervision_trains_every_output_on_the_same_mask():
    model = build_unet(1, 2, GREY, base_filters=4, depth=4, deep_supervision=True)
    losses, weights = deep_supervision_losses(CEPlusDice(2), model.output_names)
    assert weights == pytest.approx({"logits": 4 / 7, "aux_1": 2 / 7, "aux_2": 1 / 7})
    model.compile(keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights,
                  metrics={"logits": [DiceScore(2)]}, jit_compile=False)  # XLA compiles slowly on CPU
    x, y = images(4, 24, 24), RNG.integers(0, 2, (4, 24, 24, 1))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    ds = ds.map(lambda a, b: (a, deep_supervision_targets(b, model.output_names)))
    hist = model.fit(ds, epochs=1, shuffle=False, verbose=0).history
    assert {"logits_loss", "aux_1_loss", "aux_2_loss", "logits_dice"} <= set(hist)
    single = main_output_model(model)
    assert single.output_names == ["logits"] and single(x).shape == (4, 24, 24, 2)


# ---------------------------------------------------------------- losses


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_soft_dice_equals_a_hand_computed_value():
    # One 1x2 image, 2 classes. Pixel 0 is class 0 with p = (0.75, 0.25); pixel 1 is class 1 with p = (0.5, 0.5).
    logits = np.array([[[[np.log(3.0), 0.0], [0.0, 0.0]]]], "float32")
    mask = np.array([[[[0], [1]]]])
    # class 0: 2*0.75 / (0.75 + 0.5 + 1) = 2/3; class 1: 2*0.5 / (0.25 + 0.5 + 1) = 4/7
    assert float(SoftDice(2, smooth=0.0)(mask, logits)) == pytest.approx(1 - (2 / 3 + 4 / 7) / 2, abs=1e-6)
    assert float(SoftDice(2, smooth=0.0, include_background=False)(mask, logits)) == pytest.approx(3 / 7, abs=1e-6)
    # smooth = 1: (2I + 1) / (|P| + |T| + 1)
    assert float(SoftDice(2)(mask, logits)) == pytest.approx(1 - (2.5 / 3.25 + 2 / 2.75) / 2, abs=1e-6)
    # ignoring class 1's pixel leaves class 0 at 1.5/1.75 and class 1 at 0/0.25
    assert float(SoftDice(2, smooth=0.0, ignore_index=1)(mask, logits)) == pytest.approx(1 - (1.5 / 1.75) / 2, abs=1e-6)
    onehot = np.eye(2)[mask[..., 0]]
    assert float(SoftDice(2)(onehot, logits)) == pytest.approx(float(SoftDice(2)(mask, logits)), abs=1e-6)


def test_soft_dice_is_batch_level():
    logits, mask = RNG.normal(size=(3, 8, 8, 3)).astype("float32"), RNG.integers(0, 3, (3, 8, 8, 1))
    p, t = softmax(logits), np.eye(3)[mask[..., 0]]
    dice = (2 * (p * t).sum((0, 1, 2)) + 1) / (p.sum((0, 1, 2)) + t.sum((0, 1, 2)) + 1)
    assert float(SoftDice(3)(mask, logits)) == pytest.approx(1 - dice.mean(), abs=1e-5)


def test_weighted_cross_entropy_equals_a_manual_computation():
    logits, mask = RNG.normal(size=(2, 6, 5, 3)).astype("float32"), RNG.integers(0, 3, (2, 6, 5, 1))
    w = np.array([0.2, 1.0, 3.0])
    logp = np.log(softmax(logits.astype(np.float64)))
    y = mask[..., 0]
    ce = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    expected = (w[y] * ce).mean()
    assert float(WeightedCrossEntropy(3, w)(mask, logits)) == pytest.approx(expected, rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(mask, logits)
    assert float(WeightedCrossEntropy(3)(mask, logits)) == pytest.approx(float(plain), rel=1e-5)
    # ignored pixels drop out of each image's mean
    ignore = mask.copy()
    ignore[0, :3] = 255
    keep = ignore[..., 0] != 255
    per_image = [(w[y[i]] * ce[i])[keep[i]].mean() for i in range(2)]
    got = float(WeightedCrossEntropy(3, w, ignore_index=255)(ignore, logits))
    assert got == pytest.approx(np.mean(per_image), rel=1e-5)
    both = float(CEPlusDice(3, w, ce_weight=0.5, dice_weight=2.0)(mask, logits))
    assert both == pytest.approx(0.5 * expected + 2.0 * float(SoftDice(3)(mask, logits)), rel=1e-5)


def test_focal_loss_wraps_keras_categorical_focal_per_pixel():
    logits, mask = RNG.normal(size=(2, 4, 4, 3)).astype("float32"), RNG.integers(0, 3, (2, 4, 4, 1))
    onehot = np.eye(3)[mask[..., 0]].reshape(-1, 3)
    ref = keras.losses.CategoricalFocalCrossentropy(alpha=0.25, gamma=2.0, from_logits=True)
    expected = float(ref(onehot, logits.reshape(-1, 3)))
    assert float(SegmentationFocalLoss(3)(mask, logits)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", [SoftDice(3, 0.5, False, 255), WeightedCrossEntropy(3, [1, 2, 3]),
                                  CEPlusDice(3, [1, 2, 3], 0.3, 0.7), SegmentationFocalLoss(3, 1.5, [0.2, 0.3, 0.5])])
def test_losses_are_keras_serializable(loss):
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    logits, mask = RNG.normal(size=(2, 4, 4, 3)).astype("float32"), RNG.integers(0, 3, (2, 4, 4, 1))
    assert type(again) is type(loss) and float(again(mask, logits)) == pytest.approx(float(loss(mask, logits)))


def test_class_weights_are_computed_once_and_cached(tmp_path):
    masks = [RNG.choice(3, size=(8, 8), p=[0.8, 0.15, 0.05]) for _ in range(5)]
    calls = []

    def count():
        calls.append(1)
        return pixel_class_counts(masks, 3)

    counts = pixel_class_counts(masks, 3)
    assert counts.sum() == 5 * 64
    path = tmp_path / "class_weights.json"
    first = load_or_compute_class_weights(path, count, "sqrt_inverse", key="split-a")
    np.testing.assert_allclose(first, segmentation_class_weights(counts, "sqrt_inverse"))
    np.testing.assert_allclose((first * counts).sum() / counts.sum(), 1.0, rtol=1e-6)
    seed_style = np.sqrt(counts.sum() / counts)  # the radiomics notes' formula, up to scale
    np.testing.assert_allclose(first / first[0], seed_style / seed_style[0], rtol=1e-6)
    again = load_or_compute_class_weights(path, count, "sqrt_inverse", key="split-a")
    inverse = load_or_compute_class_weights(path, count, "inverse", key="split-a")
    assert len(calls) == 1  # cache hit, and a mode change needs no recount
    np.testing.assert_allclose(again, first)
    np.testing.assert_allclose(inverse, counts.sum() / (3 * counts), rtol=1e-6)
    load_or_compute_class_weights(path, count, "inverse", key="split-b")
    assert len(calls) == 2  # another split: recount
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left nothing behind


# ---------------------------------------------------------------- metrics


def test_dice_and_iou_metrics_match_numpy_and_sklearn():
    k = 4
    metrics = [DiceScore(k), IoUScore(k)] + [m(k, c) for m in (DiceScore, IoUScore) for c in range(k)]
    truth, preds = [], []
    for _ in range(3):  # accumulated over batches, not averaged per batch
        mask = RNG.choice(3, size=(2, 9, 7, 1))  # class 3 never occurs in the truth
        logits = RNG.normal(size=(2, 9, 7, k)).astype("float32")
        logits[..., 3] -= 10.0  # and is never predicted
        for m in metrics:
            m.update_state(mask, logits)
        truth.append(mask.ravel())
        preds.append(logits.argmax(-1).ravel())
    t, p = np.concatenate(truth), np.concatenate(preds)
    dice, iou = dice_per_class(t, p, k), iou_per_class(t, p, k)
    assert dice[3] is None and iou[3] is None  # absent from truth and prediction
    np.testing.assert_allclose(dice[:3], f1_score(t, p, labels=[0, 1, 2], average=None), rtol=1e-6)
    np.testing.assert_allclose(iou[:3], jaccard_score(t, p, labels=[0, 1, 2], average=None), rtol=1e-6)
    assert float(metrics[0].result()) == pytest.approx(macro(dice), rel=1e-5)
    assert float(metrics[1].result()) == pytest.approx(macro(iou), rel=1e-5)
    for c in range(3):
        assert float(metrics[2 + c].result()) == pytest.approx(dice[c], rel=1e-5)
        assert float(metrics[2 + k + c].result()) == pytest.approx(iou[c], rel=1e-5)
    assert math.isnan(float(metrics[2 + 3].result()))
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metrics[3]))
    assert again.class_index == 1 and again.num_classes == k
    metrics[0].reset_state()
    assert math.isnan(float(metrics[0].result()))


def test_numpy_metrics_on_a_tiny_example():
    assert dice_per_class([0, 0, 1, 1], [0, 1, 1, 1], 3) == pytest.approx([2 / 3, 0.8, None])
    assert iou_per_class([0, 0, 1, 1], [0, 1, 1, 1], 3) == pytest.approx([0.5, 2 / 3, None])
    assert iou_per_class([0, 9, 1], [0, 1, 1], 2, ignore_index=9) == [1.0, 1.0]
    assert macro([None, 0.5, 1.0]) == 0.75 and macro([None]) is None
    assert macro([0.9, 0.5, 0.0], include_background=False) == 0.25


def test_keras_metrics_skip_background_and_ignored_pixels_on_request():
    mask = np.array([[[[0], [1], [2], [9]]]])  # label 9: ignored
    logits = np.eye(3, dtype="float32")[[0, 1, 0, 2]][None, None] * 5.0
    fg = DiceScore(3, include_background=False, ignore_index=9)
    fg.update_state(mask, logits)
    assert float(fg.result()) == pytest.approx((1.0 + 0.0) / 2)  # class 1 exact, class 2 missed
    every = IoUScore(3, ignore_index=9)
    every.update_state(mask, logits)
    assert float(every.result()) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


# ---------------------------------------------------------------- learning


def real_slices(size=32):
    """Four grey 32x32 images from scikit-image's bundled photos, Otsu-thresholded into masks."""
    from skimage import data, filters, transform

    sources = [data.camera(), data.coins(), data.moon(), data.page()]
    x = np.stack([transform.resize(s, (size, size), anti_aliasing=True) for s in sources])
    y = np.stack([(im > filters.threshold_otsu(im)).astype("int32") for im in x])
    return (x[..., None] * 255).astype("float32"), y[..., None]


def test_tiny_unet_overfits_four_real_slices():
    x, y = real_slices()
    assert 0.1 < y.mean() < 0.9
    keras.utils.set_random_seed(0)
    model = build_unet(1, 2, GREY, base_filters=8, depth=3, norm_layer="group", groups=4)
    model.compile(keras.optimizers.Adam(1e-2), loss=CEPlusDice(2), jit_compile=False)
    model.fit(x, y, batch_size=4, epochs=60, verbose=0)  # 60 steps: Dice ~0.99 on both classes
    pred = np.asarray(model(x)).argmax(-1)
    dice = dice_per_class(y, pred, 2)
    assert min(dice) > 0.9, dice


def test_segmentation_score_matches_the_numpy_oracle_over_batches():
    # Task.score's Dice/IoU are the training metrics, accumulated over the whole split.
    from types import SimpleNamespace

    from tfvision.tasks import get_task

    k, names = 4, ["bg", "a", "b", "never"]
    masks = RNG.choice(3, size=(6, 9, 7))  # class 3 is neither in the truth nor predicted
    logits = RNG.normal(size=(6, 9, 7, k)).astype("float32")
    logits[..., 3] -= 10.0
    inp = keras.Input((9, 7, k))
    model = keras.Model(inp, keras.layers.Identity()(inp))
    dataset = tf.data.Dataset.from_tensor_slices((logits, masks)).batch(4)  # 4 + 2: two batches
    got = get_task("segmentation").score(model, dataset, SimpleNamespace(class_names=names), "val")
    t, p = masks.ravel(), logits.argmax(-1).ravel()
    want_dice, want_iou = dice_per_class(t, p, k), iou_per_class(t, p, k)
    assert want_dice[3] is None and got["dice_per_class"]["never"] is None and got["iou_per_class"]["never"] is None
    assert list(got["dice_per_class"].values())[:3] == pytest.approx(want_dice[:3], rel=1e-6)
    assert list(got["iou_per_class"].values())[:3] == pytest.approx(want_iou[:3], rel=1e-6)
    assert got["dice_macro"] == pytest.approx(np.mean(want_dice[:3]), rel=1e-6)
