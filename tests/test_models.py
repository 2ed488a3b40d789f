"""Backbones, heads, staged unfreezing, differential learning rates, schedules, serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from tfvision.config import HeadConfig, OptimizerConfig
from tfvision.errors import ConfigError
from tfvision.losses import class_weights
from tfvision.models.backbones import BACKBONES, build_backbone, get_spec, set_trainable
from tfvision.models.heads import build_image_model, input_norm
from tfvision.optimizers import build_optimizer
from tfvision.schedules import OneCycle, WarmupCosine

FAST = {"small_cnn", "efficientnetv2_b0", "convnext_tiny", "resnet50"}


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in BACKBONES.names()]
)
def test_every_registered_backbone_builds_and_runs(name):
    model = build_image_model(name, 3, 5, None, HeadConfig(type="mlp", hidden=[16]),
                              input_norm(name, "imagenet", 3))
    out = model(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32"))
    assert out.shape == (2, 5) and keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.isfinite(np.asarray(out)).all()
    assert model.get_layer("backbone").name == "backbone"


def test_config_knows_every_registered_backbone():
    from tfvision.config import BACKBONE_NAMES

    assert sorted(BACKBONE_NAMES) == BACKBONES.names()


def test_unknown_backbone_suggests():
    with pytest.raises(ConfigError, match="did you mean 'convnext_tiny'"):
        get_spec("convnext_tinny")


def test_mixed_precision_keeps_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_image_model("small_cnn", 3, 4, None, HeadConfig(), input_norm("small_cnn", "none", 3))
        out = model(np.zeros((1, 32, 32, 3), "float32"))
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        assert model.get_layer("backbone").compute_dtype == "float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_offline_imagenet_weights_give_a_placement_hint(monkeypatch):
    from keras.src.utils import file_utils

    def no_network(fname, origin=None, **kw):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", no_network)
    with pytest.raises(ConfigError) as e:
        build_backbone("efficientnetv2_b0", (32, 32, 3), "imagenet")
    msg = str(e.value)
    assert "efficientnetv2-b0_notop.h5" in msg and ".keras/models" in msg and "model.weights" in msg


def test_extra_channels_start_from_the_mean_rgb_kernel(tmp_path):
    rgb = build_backbone("small_cnn", (32, 32, 3), None)
    path = tmp_path / "rgb.weights.h5"
    rgb.save_weights(path)
    from tfvision.models import backbones

    four = backbones._adapt_channels(_FileWeights(get_spec("small_cnn")), (32, 32, 4), str(path))
    k_rgb = rgb.get_layer("block1_conv1").get_weights()[0]
    k4 = four.get_layer("block1_conv1").get_weights()[0]
    np.testing.assert_allclose(k4[:, :, :3], k_rgb)
    np.testing.assert_allclose(k4[:, :, 3], k_rgb.mean(axis=2), rtol=1e-6)
    np.testing.assert_allclose(four.get_layer("block2_conv1").get_weights()[0],
                               rgb.get_layer("block2_conv1").get_weights()[0])


class _FileWeights:
    """Wraps a spec so `build(shape, path)` loads a local weights file (small_cnn has no ImageNet set)."""

    def __init__(self, spec):
        self.spec = spec

    def build(self, input_shape, weights):
        model = self.spec.build(input_shape, None)
        if weights:
            model.load_weights(weights)
        return model


def _model():
    return build_image_model("efficientnetv2_b0", 3, 3, None, HeadConfig(), input_norm("efficientnetv2_b0", "none", 3))


def test_staged_unfreezing_changes_trainable_weights():
    model = _model()
    backbone = model.get_layer("backbone")
    pattern = get_spec("efficientnetv2_b0").stage_pattern
    set_trainable(backbone, pattern, "head")
    assert [w.path for w in model.trainable_weights] == ["logits/kernel", "logits/bias"]
    set_trainable(backbone, pattern, "last_n_blocks", n_blocks=1)
    names = {w.path.split("/")[0] for w in backbone.trainable_weights}
    assert names and all(n.startswith(("block6", "top_")) for n in names)
    n_last1 = len(backbone.trainable_weights)
    set_trainable(backbone, pattern, "last_n_blocks", n_blocks=2)
    assert len(backbone.trainable_weights) > n_last1
    assert any(w.path.startswith("block5") for w in backbone.trainable_weights)
    set_trainable(backbone, pattern, "all")
    assert len(model.trainable_weights) == len(model.weights) - len(model.non_trainable_weights)
    assert len(backbone.trainable_weights) > 100


def test_backbone_learns_at_a_fraction_of_the_head_rate():
    model = build_image_model("small_cnn", 3, 2, None, HeadConfig(dropout=0.0), input_norm("small_cnn", "none", 3))
    backbone = model.get_layer("backbone")
    opt = build_optimizer(OptimizerConfig(name="sgd", lr=0.1, momentum=0.0), 0.1, backbone.trainable_variables, 0.25)
    model.compile(optimizer=opt, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[[0, 1, 0, 1]]
    kernel_b = backbone.get_layer("block1_conv1").kernel
    kernel_h = model.get_layer("logits").kernel
    before_b, before_h = keras.ops.convert_to_numpy(kernel_b), keras.ops.convert_to_numpy(kernel_h)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    g_b, g_h = tape.gradient(loss, [kernel_b.value, kernel_h.value])
    # Reset BN statistics drift aside, one SGD step moves w by -lr * mult * grad.
    model.optimizer.apply([g_b, g_h], [kernel_b, kernel_h])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel_b) - before_b, -0.1 * 0.25 * g_b.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel_h) - before_h, -0.1 * g_h.numpy(), rtol=1e-4, atol=1e-7)


def test_onecycle_shape():
    s = OneCycle(max_lr=1.0, total_steps=100, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    lr = np.array([float(s(i)) for i in range(100)])
    peak = int(lr.argmax())
    assert lr[0] == pytest.approx(1 / 25)
    assert peak in (28, 29, 30) and lr[peak] == pytest.approx(1.0, rel=1e-3)
    assert (np.diff(lr[: peak + 1]) >= -1e-7).all() and (np.diff(lr[peak:]) <= 1e-7).all()
    assert lr[-1] == pytest.approx(1 / 25 / 1e4, rel=1e-2)


def test_warmup_cosine_shape():
    s = WarmupCosine(lr=1.0, total_steps=50, warmup_steps=10, min_lr=0.1)
    lr = np.array([float(s(i)) for i in range(51)])
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert (np.diff(lr[:10]) > 0).all() and (np.diff(lr[10:]) <= 1e-7).all()
    assert lr[50] == pytest.approx(0.1)


def test_warmup_cosine_is_keras_cosine_decay_one_step_early():
    # Why WarmupCosine is not replaced by CosineDecay: equal decay, warmup shifted one step.
    s = WarmupCosine(lr=1.0, total_steps=50, warmup_steps=10, min_lr=0.1)
    keras_cd = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=40, alpha=0.1, warmup_target=1.0, warmup_steps=10)
    ours = np.array([float(s(i)) for i in range(60)])
    theirs = np.array([float(keras_cd(i)) for i in range(61)])
    np.testing.assert_allclose(ours[10:], theirs[10:60], rtol=1e-6)
    np.testing.assert_allclose(ours[:10], theirs[1:11], rtol=1e-6)
    assert not np.allclose(ours[:10], theirs[:10])
    # Saved .keras checkpoints name the schedule in their compile config: it must load safely.
    back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s),
                                                 safe_mode=True)
    assert type(back) is WarmupCosine and back.get_config() == s.get_config()


def test_class_weights_match_sklearn_balanced():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    counts = np.bincount(labels)
    np.testing.assert_allclose(class_weights(counts, "inverse"),
                               compute_class_weight("balanced", classes=np.arange(3), y=labels), rtol=1e-6)
    sq = class_weights(counts, "sqrt_inverse")
    assert (sq[labels].mean()) == pytest.approx(1.0) and sq[2] / sq[0] == pytest.approx(np.sqrt(90), rel=1e-5)
    norm = class_weights(counts, "normalized")
    assert norm.mean() == pytest.approx(1.0) and norm[2] / norm[0] == pytest.approx(90, rel=1e-5)
    assert class_weights(counts, "none") is None


def test_model_round_trips_through_keras_file_in_safe_mode(tmp_path):
    model = build_image_model("small_cnn", 3, 3, None, HeadConfig(type="mlp", hidden=[8]),
                              input_norm("resnet50", "imagenet", 3))
    opt = build_optimizer(OptimizerConfig(), OneCycle(1e-3, 10), model.get_layer("backbone").trainable_variables, 0.1)
    model.compile(optimizer=opt, loss="categorical_crossentropy")
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path)  # safe_mode=True (the default)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), atol=1e-5)
    norm = again.get_layer("normalize")
    assert norm.bgr and norm.mean == [103.939, 116.779, 123.68]
