"""Segment a whole volume slice by slice and write the label volume in its geometry.

The volume is windowed exactly as the training slices were (`run.json`
records the windows and the slicing axis), each slice is resized to the
training size, predicted, and its logits resized back to the slice's own size
before the argmax, so the output has the input's shape and affine.

>>> predict_volume(run_dir, "ct.nii.gz", "mask.nii.gz")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tfvision.fileio import owned_output
from tfvision.medical.slices import window_volume


def segment_volume(model, volume: np.ndarray, info: dict, batch_size: int = 8) -> np.ndarray:
    """Integer label volume with the shape of `volume`."""
    import tensorflow as tf

    from tfvision.serving import logits_at_input_size

    med = info["medical"]
    axis, size, channels = med["slice_axis"], tuple(info["image_size"]), info["channels"]
    slices = np.moveaxis(window_volume(volume, med["windows"]), axis, 0) * 255.0  # the pipeline's 0..255 scale
    if slices.shape[-1] != channels:
        if slices.shape[-1] != 1:
            raise ValueError(f"run expects {channels} channels, windows give {slices.shape[-1]}")
        slices = np.repeat(slices, channels, axis=-1)

    @tf.function(reduce_retracing=True)
    def step(x):
        return tf.argmax(logits_at_input_size(model, x, size), axis=-1, output_type=tf.int32)

    labels = [step(tf.constant(slices[i : i + batch_size])).numpy() for i in range(0, len(slices), batch_size)]
    return np.moveaxis(np.concatenate(labels, axis=0), 0, axis)


def predict_volume(model, info: dict, volume_path, output_path, batch_size: int = 8) -> Path:
    """Read a NIfTI (or DICOM series folder), segment it, write a NIfTI label volume atomically."""
    import nibabel as nib

    from tfvision.medical.slices import load_volume

    volume, affine = load_volume(volume_path)
    labels = segment_volume(model, volume, info, batch_size)
    dtype = np.uint8 if labels.max() < 256 else np.int16
    out = nib.Nifti1Image(labels.astype(dtype), affine)
    out.header.set_xyzt_units("mm")
    output_path = Path(output_path)
    suffix = "".join(output_path.suffixes[-2:]) if output_path.name.endswith(".nii.gz") else output_path.suffix
    with owned_output(output_path, "--output", suffix=suffix) as tmp:
        nib.save(out, str(tmp))
    return output_path
