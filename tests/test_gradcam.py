"""Grad-CAM: mass lands where the decision is made; every backbone; layer override; overlays."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image

from tfvision.errors import UserError
from tfvision.models.backbones import BACKBONES

# Detector weights of a 1x1 conv: channel 0 fires on red, channel 1 on green.
DETECTORS = np.array([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]], np.float32)


def red_only_model() -> keras.Model:
    """A tfvision-shaped model (image -> normalize -> nested "backbone" -> pool -> logits)
    whose class 0 depends only on red evidence: the green channel has zero head weight."""
    inner = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(2, 1, activation="relu", name="detect")
    backbone = keras.Model(inner, keras.layers.Activation("linear", name="features")(conv(inner)), name="backbone")
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="normalize")(image)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(x))
    model = keras.Model(image, keras.layers.Dense(2, name="logits")(x))
    conv.set_weights([DETECTORS.reshape(1, 1, 3, 2), np.zeros(2, np.float32)])
    model.get_layer("logits").set_weights([np.array([[10.0, 0.0], [0.0, 0.0]], np.float32), np.zeros(2, np.float32)])
    return model


def scene(n: int = 3) -> np.ndarray:
    """Red evidence in the top-left quadrant; larger green distractors everywhere else."""
    rng = np.random.default_rng(0)
    x = np.zeros((n, 64, 64, 3), np.float32)
    for i in range(n):
        y0, x0 = rng.integers(2, 22, 2)
        x[i, y0 : y0 + 8, x0 : x0 + 8, 0] = 255
        x[i, 40:60, 36:60, 1] = 255
        x[i, 4:24, 40:60, 1] = 255
        x[i, 40:58, 4:24, 1] = 255
    return x


def test_heat_map_mass_is_in_the_region_that_decides():
    from tfvision.gradcam import GradCAM

    images = scene()
    cam = GradCAM(red_only_model())
    assert cam.layer_name == "features"  # last 4-D output of the nested backbone, found by itself
    heat, logits = cam(images, classes=0)
    assert heat.shape == (3, 64, 64) and np.allclose(heat.max(axis=(1, 2)), 1.0)
    top_left = heat[:, :32, :32].sum(axis=(1, 2)) / heat.sum(axis=(1, 2))
    assert (top_left > 0.95).all(), top_left
    # Not a property of the input alone: the feature activations are mostly green, elsewhere.
    energy = np.maximum(images @ DETECTORS, 0).sum(-1)
    assert (energy[:, :32, :32].sum(axis=(1, 2)) / energy.sum(axis=(1, 2)) < 0.2).all()
    np.testing.assert_allclose(logits, np.asarray(red_only_model()(images)), atol=1e-4)


def test_layer_override_and_clear_errors():
    from tfvision.gradcam import GradCAM

    model = red_only_model()
    assert GradCAM(model, layer="detect").layer_name == "detect"
    with pytest.raises(UserError, match="no layer 'nope'"):
        GradCAM(model, layer="nope")
    flat = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(UserError, match="backbone"):
        GradCAM(flat)


FAST = {"small_cnn", "efficientnetv2_b0"}


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in BACKBONES.names()])
def test_every_backbone_gets_a_heat_map(name):
    from tfvision.config import HeadConfig
    from tfvision.gradcam import GradCAM
    from tfvision.models.heads import build_image_model, input_norm

    model = build_image_model(name, 3, 4, None, HeadConfig(type="mlp", hidden=[8]), input_norm(name, "imagenet", 3))
    images = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    heat, logits = GradCAM(model)(images)
    assert heat.ndim == 3 and heat.shape[0] == 2 and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1.0 + 1e-6
    if name in FAST:
        # The split model (preprocessing | backbone | head) computes the model's own logits. Not
        # checked for the deep variants: untrained, their logits reach 1e6 and are chaotic.
        np.testing.assert_allclose(logits, np.asarray(model(images)), rtol=1e-4, atol=1e-4)


def test_overlay_png_has_the_image_size(tmp_path):
    from tfvision.gradcam import save_overlay

    gray = np.random.default_rng(2).uniform(0, 255, (40, 30, 1)).astype("float32")
    heat = np.zeros((4, 3), np.float32)
    heat[0, 0] = 1.0
    path = save_overlay(tmp_path / "o.png", gray, heat)
    img = np.asarray(Image.open(path))
    assert img.shape == (40, 30, 3) and img.dtype == np.uint8
    # jet: hot = red at the heat peak, cold = blue far from it
    assert img[0, 0, 0] > img[0, 0, 2] and img[-1, -1, 2] > img[-1, -1, 0]
