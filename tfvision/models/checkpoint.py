"""Load a tfvision checkpoint for inference in float32, whatever precision it was trained in.

Mixed-precision layers compute in float16/bfloat16. Exports must not (ONNX Runtime and
TFLite would carry float16 casts, and CPUs emulate float16), and neither should frozen-
backbone features, so the model config is rewritten to float32 and the (float32) weights
are copied over.

>>> model = load_float32("runs/x/checkpoints/best.keras")
>>> {layer.compute_dtype for layer in model.layers}
{'float32'}
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("tfvision.models")


def load_float32(path: str | Path):
    """The `.keras` checkpoint at `path` (compile=False, safe_mode on), in float32."""
    import keras

    # Register the custom layers a checkpoint may hold (safe_mode stays on).
    import tfvision.models.layers  # noqa: F401
    import tfvision.models.unet_blocks  # noqa: F401

    model = keras.saving.load_model(Path(path), compile=False)
    if all(_compute_dtype(layer) == "float32" for layer in _all_layers(model)):
        return model
    clone = keras.saving.deserialize_keras_object(_float32_config(keras.saving.serialize_keras_object(model)))
    clone.set_weights(model.get_weights())
    log.info("%s: mixed-precision checkpoint, using a float32 copy", path)
    return clone


def _all_layers(layer):
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from _all_layers(sub)


def _compute_dtype(layer) -> str:
    policy = getattr(layer, "dtype_policy", None)
    return getattr(policy, "compute_dtype", "float32") or "float32"


def _float32_config(obj):
    if isinstance(obj, dict):
        if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(obj.get("config"), dict):
            return {**obj, "config": {**obj["config"], "name": "float32"}}
        return {k: ("float32" if k == "dtype" and v in ("float16", "bfloat16") else _float32_config(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_config(v) for v in obj]
    return obj
