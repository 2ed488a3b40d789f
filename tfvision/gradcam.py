"""Grad-CAM for every tfvision model: where in the image the evidence for a class lies.

A tfvision model is ``image -> preprocessing -> backbone (a nested Model named
"backbone") -> pool -> head -> logits``. Grad-CAM needs one 4-D feature map A
inside the backbone and the gradient of a class logit with respect to it::

    weights_k = mean_ij d logit_c / d A_ijk        cam = relu(sum_k weights_k A_k)

The model is split into three Keras models built from its own tensors (no
weights copied): preprocessing, the backbone with A as an extra output, and the
head. By default A is the last 4-D output in the backbone (its final conv stage,
whatever the architecture); ``layer=`` picks another one by name.

>>> cam = GradCAM(model)
>>> heat, logits = cam(images)          # heat [B, h, w] in [0, 1]
>>> save_overlay("x_gradcam.png", image, heat[0])
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfvision.errors import UserError
from tfvision.fileio import owned_output


def _node(layer):
    # Keras 3.15: a nested Functional's .input/.output are its *inner* graph's tensors;
    # the tensors of its call in the outer graph live only on its last inbound node.
    return layer._inbound_nodes[-1]


def _rank4_output(layer) -> bool:
    if isinstance(layer, keras.layers.InputLayer):
        return False
    out = _node(layer).output_tensors
    return len(out) == 1 and len(out[0].shape) == 4


def find_layer(model: keras.Model, name: str | None = None) -> tuple[keras.Model, keras.layers.Layer]:
    """(backbone, feature layer): the named layer, else the backbone's last 4-D output.

    Raises:
        UserError: no nested "backbone", unknown layer name, or no 4-D feature map.
    """
    try:
        backbone = model.get_layer("backbone")
    except ValueError:
        raise UserError("Grad-CAM: the model has no nested model named 'backbone'") from None
    if name:
        try:
            layer = backbone.get_layer(name)
        except ValueError:
            raise UserError(f"Grad-CAM: no layer {name!r} in the backbone") from None
        if not _rank4_output(layer):
            raise UserError(f"Grad-CAM: layer {name!r} does not output a 4-D feature map")
        return backbone, layer
    for layer in reversed(backbone.layers):
        if _rank4_output(layer):
            return backbone, layer
    raise UserError("Grad-CAM: the backbone has no 4-D feature map")


class GradCAM:
    """Grad-CAM heat maps of a tfvision model (see the module docstring).

    Args:
        model: a tfvision image model (nested "backbone").
        layer: name of the backbone layer whose output is the feature map; default
            the last 4-D one.
    """

    def __init__(self, model: keras.Model, layer: str | None = None):
        backbone, target = find_layer(model, layer)
        self.layer_name = target.name
        node = _node(backbone)
        outer_in, outer_out = node.input_tensors[0], node.output_tensors[0]
        # Preprocessing (normalisation, CLAHE) before the backbone; None when there is none.
        self._pre = None if outer_in is model.inputs[0] else keras.Model(model.inputs[0], outer_in)
        self._features = keras.Model(backbone.inputs[0], [_node(target).output_tensors[0], backbone.outputs[0]])
        self._head = keras.Model(outer_out, model.outputs[0])
        self._run = tf.function(self._cam, reduce_retracing=True)

    def _cam(self, images, classes):
        with tf.GradientTape() as tape:
            x = self._pre(images, training=False) if self._pre is not None else images
            tape.watch(x)  # records the whole path, frozen (non-trainable) weights included
            feats, out = self._features(x, training=False)
            logits = tf.cast(self._head(out, training=False), tf.float32)
            cls = tf.where(classes < 0, tf.argmax(logits, axis=-1, output_type=tf.int32), classes)
            score = tf.gather(logits, cls, axis=1, batch_dims=1)
        grads = tf.cast(tape.gradient(score, feats), tf.float32)
        feats = tf.cast(feats, tf.float32)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * feats, axis=-1))
        cam = cam / (tf.reduce_max(cam, axis=[1, 2], keepdims=True) + 1e-12)
        return cam, logits

    def __call__(self, images, classes=None) -> tuple[np.ndarray, np.ndarray]:
        """Heat maps [B, h, w] in [0, 1] (feature-map resolution) and the logits [B, K].

        Args:
            images: float [B, H, W, C] on the 0..255 scale, like the model's input.
            classes: class index per image; default (or -1) the top-scoring class.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        b = int(images.shape[0])
        cls = np.full(b, -1, np.int32) if classes is None else np.broadcast_to(np.asarray(classes, np.int32), (b,))
        cam, logits = self._run(images, tf.constant(cls))
        return cam.numpy(), logits.numpy()


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [h, w] heat map to ``size`` (H, W)."""
    return tf.image.resize(np.asarray(heat, np.float32)[..., None], size).numpy()[..., 0]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB of ``image`` (any channels, 0..255) with the jet-coloured heat map blended in."""
    from matplotlib import colormaps

    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    img = np.repeat(img[..., :1], 3, axis=-1) if img.shape[-1] < 3 else img[..., :3]
    heat = np.clip(upsample(heat, img.shape[:2]), 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    return np.clip((1 - alpha) * img + alpha * colour, 0, 255).astype(np.uint8)


def save_overlay(path, image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> str:
    """Write the overlay PNG atomically; returns the path."""
    from PIL import Image

    with owned_output(path, "--gradcam", suffix=".png") as tmp:
        Image.fromarray(overlay(image, heat, alpha)).save(tmp, format="PNG")
    return str(path)
