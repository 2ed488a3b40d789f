"""Export: SavedModel / ONNX / TFLite round trips with parity against Keras, metadata, failure paths.

Models are random-initialised (weights=None) with a rescaled head, so that
probabilities are far from uniform and a parity check at 1e-4 means something.
Every backbone family at every format runs under ``-m slow``; the default
suite covers the serving graph on small_cnn, a real trained run, U-Net, and
the ConvNeXt converter failures on a tiny model with the same ops.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import jpeg_bytes, photo
from tfvision.config import HeadConfig
from tfvision.data.decode import decode_resized
from tfvision.export import main
from tfvision.models.heads import build_image_model, input_norm

CLASSES = ["akiec", "bcc", "mel", "nv"]
SIZES = (40, 56, 72)  # verification images at three sizes: uint8 input at any size


def save_images(folder: Path, n: int, channels: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = photo(i, SIZES[i % len(SIZES)])
        arr = arr[..., 0] if channels == 1 else arr
        p = folder / f"img{i}.{'jpg' if i % 2 else 'png'}"
        if i % 2:
            p.write_bytes(jpeg_bytes(arr))
        else:
            Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def fake_run(root: Path, model: keras.Model, *, size: int, activation: str = "softmax", classes=CLASSES,
             channels: int = 3, n_images: int = 8, **extra) -> Path:
    """A minimal finished run folder: checkpoints/best.keras, run.json, splits/val.csv."""
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    model.save(root / "checkpoints" / "best.keras")
    (root / "run.json").write_text(json.dumps({
        "task": "classification" if activation == "softmax" else "multilabel", "activation": activation,
        "class_names": list(classes), "image_size": [size, size], "channels": channels, **extra}))
    (root / "splits").mkdir(exist_ok=True)
    paths = save_images(root / "images", n_images, channels)
    (root / "splits" / "val.csv").write_text("path,label,group\n" + "".join(
        f"{p},{classes[i % len(classes)]},g{i}\n" for i, p in enumerate(paths)))
    return root


def image_model(backbone: str, num_classes: int = len(CLASSES), spread: float = 3.0) -> keras.Model:
    """Random-init model whose logits vary by image with std `spread`: peaked probabilities and
    argmaxes that differ between images, so top-1 agreement and a 1e-4 bound mean something."""
    keras.utils.set_random_seed(0)
    model = build_image_model(backbone, 3, num_classes, None, HeadConfig(dropout=0.0),
                              input_norm(backbone, "imagenet", 3))
    head = model.get_layer("logits")
    x = np.stack([photo(i, 48) for i in range(16)]).astype(np.float32)
    z = np.asarray(model(x)) - head.bias.numpy()
    scale = spread / (z.std(0).mean() + 1e-12)
    head.kernel.assign(head.kernel * scale)
    head.bias.assign(-z.mean(0) * scale)
    return model


def report(out: Path) -> dict:
    return json.loads((out / "export_report.json").read_text())


def check_report(rep: dict, expected: set[tuple]) -> None:
    got = {(e["format"], e["precision"], e.get("signature")) for e in rep["exports"]}
    assert got == expected
    assert rep["passed"] and rep["verified"]
    for e in rep["exports"]:
        assert {"format", "path", "max_abs_diff", "top1_agreement", "n_images"} <= set(e)
        assert Path(e["path"]).exists(), e["path"]
        assert e["max_abs_diff"] <= e["threshold"], e
        if e["precision"] == "float32":
            assert e["threshold"] == 1e-4 and e["top1_agreement"] == 1.0, e


ALL_FORMATS = {("savedmodel", "float32", "serving_default"), ("savedmodel", "float32", "serve_bytes"),
               ("onnx", "float32", None), ("tflite", "float32", None)}
REDUCED = {("onnx", "float16", None), ("tflite", "float16", None), ("tflite", "dynamic", None)}


# --------------------------------------------------------------------------- small_cnn, every format


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One small_cnn run exported to every format (with float16 and dynamic-range variants)."""
    root = tmp_path_factory.mktemp("run")
    run = fake_run(root / "run", image_model("small_cnn"), size=32)
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.7}))
    out = root / "export"
    assert main(["--run", str(run), "--output", str(out), "--format", "all", "--verify",
                 "--float16", "--quantize", "dynamic"]) == 0
    return run, out


def test_every_format_round_trips_and_matches_keras(exported):
    run, out = exported
    rep = report(out)
    check_report(rep, ALL_FORMATS | REDUCED)
    assert rep["exports"][0]["n_images"] == 8 and len(rep["images"]) == 8
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp folder left behind
    sizes = {p: (out / p).stat().st_size for p in ("model.onnx", "model_float16.onnx", "model.tflite",
                                                 "model_float16.tflite", "model_dynamic.tflite")}
    assert sizes["model_float16.onnx"] < 0.6 * sizes["model.onnx"]
    assert sizes["model_float16.tflite"] < 0.6 * sizes["model.tflite"]
    assert sizes["model_dynamic.tflite"] < 0.4 * sizes["model.tflite"]


def _keras_probs(run: Path, images: np.ndarray, temperature: float) -> np.ndarray:
    model = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    logits = np.asarray(model(tf.image.resize(tf.cast(images, tf.float32), (32, 32))), np.float64)
    z = logits / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 50, 70, 3), (1, 200, 120, 3)])
def test_uint8_images_of_any_size_give_keras_probabilities_everywhere(exported, shape):
    import onnxruntime as ort

    from tfvision.serving import tflite_interpreter

    run, out = exported
    rng = np.random.default_rng(shape[1])
    base = photo(shape[1], max(shape[1], shape[2]))[: shape[1], : shape[2]]
    images = np.clip(base[None].astype(np.int16) + rng.integers(-40, 40, shape), 0, 255).astype(np.uint8)
    want = _keras_probs(run, images, temperature=1.7)  # calibration.json's temperature is inside

    sm = tf.saved_model.load(str(out / "savedmodel")).signatures["serving_default"]
    got = {"savedmodel": sm(image=tf.constant(images))}
    got["savedmodel"] = {k: v.numpy() for k, v in got["savedmodel"].items()}
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert [(i.name, i.type) for i in session.get_inputs()] == [("image", "tensor(uint8)")]
    got["onnx"] = dict(zip(["probabilities", "labels"], session.run(["probabilities", "labels"], {"image": images}),
                           strict=True))
    _, run_tflite = tflite_interpreter(out / "model.tflite")
    got["tflite"] = run_tflite(image=images)
    for name, outputs in got.items():
        np.testing.assert_allclose(outputs["probabilities"], want, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(outputs["labels"], want.argmax(1), err_msg=name)
    assert want.max() > 0.5  # not flat probabilities (uniform is 0.25)


def test_jpeg_and_png_bytes_signature_decodes_like_the_pipeline(exported):
    run, out = exported
    sig = tf.saved_model.load(str(out / "savedmodel")).signatures["serve_bytes"]
    raw = [jpeg_bytes(photo(7, 90)), jpeg_bytes(photo(8, 40))]
    png = Path(run / "images" / "img0.png").read_bytes()
    raw.append(png)
    got = sig(image_bytes=tf.constant(raw))
    images = np.stack([decode_resized(tf.constant(b), 3, (32, 32)).numpy() for b in raw])
    model = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    z = np.asarray(model(images), np.float64) / 1.7
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-5)
    np.testing.assert_array_equal(got["labels"].numpy(), want.argmax(1))


def test_class_names_travel_as_onnx_metadata_and_savedmodel_asset(exported):
    import onnx

    from tfvision.serving import tflite_interpreter

    _, out = exported
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert props["activation"] == "softmax" and json.loads(props["temperature"]) == 1.7
    assert json.loads(props["image_size"]) == [32, 32]
    half = {p.key: p.value for p in onnx.load(str(out / "model_float16.onnx")).metadata_props}
    assert json.loads(half["class_names"]) == CLASSES
    loaded = tf.saved_model.load(str(out / "savedmodel"))
    asset = Path(loaded.class_names_file.asset_path.numpy().decode())
    assert asset.parent.name == "assets" and asset.read_text().split() == CLASSES
    assert (out / "class_names.txt").read_text().split() == CLASSES
    assert json.loads((out / "export.json").read_text())["class_names"] == CLASSES
    interpreter, runner = tflite_interpreter(out / "model.tflite")
    assert list(interpreter.get_signature_list()["serving_default"]["outputs"]) == ["labels", "probabilities"]


# --------------------------------------------------------------------------- a real run, failures


def test_real_trained_run_exports_with_verify_on_its_validation_images(small_digits, tmp_path):
    from tests.test_training import config
    from tfvision.train import main as train

    run = tmp_path / "run"
    cfg = config(small_digits, tmp_path, epochs=1, steps_per_epoch=2)
    assert train(["--config", str(cfg), "--output-dir", str(run), "--quiet"]) == 0
    assert main(["--run", str(run), "--format", "all", "--verify", "--n-images", "24"]) == 0
    rep = report(run / "export")
    check_report(rep, ALL_FORMATS)
    assert rep["exports"][0]["n_images"] == 24
    assert all(p.startswith(str(small_digits)) for p in rep["images"])  # the run's own val images


def test_failed_verification_exits_1_and_keeps_the_previous_export(tmp_path, monkeypatch, capsys):
    import tfvision.export as ex

    run = fake_run(tmp_path / "run", image_model("small_cnn"), size=32, n_images=4)
    out = tmp_path / "export"
    assert main(["--run", str(run), "--output", str(out), "--format", "onnx", "--verify"]) == 0
    before = (out / "model.onnx").read_bytes()
    real = ex.reference

    def off_by_1e3(*a, **k):  # a converter bug that shifts probabilities by 1e-3
        u, b = real(*a, **k)
        return [p + 1e-3 for p in u], b

    monkeypatch.setattr(ex, "reference", off_by_1e3)
    assert main(["--run", str(run), "--output", str(out), "--format", "onnx", "--verify"]) == 1
    assert "verification failed for onnx/float32" in capsys.readouterr().err
    assert (out / "model.onnx").read_bytes() == before and report(out)["passed"]
    failed = report(tmp_path / "export.failed")
    assert not failed["passed"] and failed["exports"][0]["max_abs_diff"] > 1e-4

    def wrong_shape(*a, **k):  # a converter that drops a class: reported as a failure, not a crash
        u, b = real(*a, **k)
        return [p[1:] for p in u], b

    monkeypatch.setattr(ex, "reference", wrong_shape)
    assert main(["--run", str(run), "--output", str(out), "--format", "onnx", "--verify"]) == 1
    failed = report(tmp_path / "export.failed")
    assert "output shape (4,), Keras gives (3,)" in failed["exports"][0]["error"]


def test_bad_run_folder_and_arguments_exit_2(tmp_path, capsys):
    assert main(["--run", str(tmp_path), "--format", "onnx"]) == 2
    assert "not a finished run folder" in capsys.readouterr().err
    run = fake_run(tmp_path / "run", image_model("small_cnn"), size=32, n_images=1)
    assert main(["--run", str(run), "--format", "savedmodel", "--float16"]) == 2
    (run / "splits" / "val.csv").write_text("path,label,group\n/nowhere.png,a,g\n")
    assert main(["--run", str(run), "--format", "onnx", "--verify"]) == 2
    assert "--images" in capsys.readouterr().err


def test_mixed_precision_run_exports_in_float32(tmp_path):
    import onnx

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = image_model("small_cnn")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("backbone").layers[1].compute_dtype == "float16"
    run = fake_run(tmp_path / "run", model, size=32, n_images=4, mixed_precision="mixed_float16")
    out = tmp_path / "export"
    assert main(["--run", str(run), "--output", str(out), "--format", "onnx", "--verify"]) == 0
    graph = onnx.load(str(out / "model.onnx")).graph
    assert all(i.data_type != onnx.TensorProto.FLOAT16 for i in graph.initializer)
    assert not [n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16]


def test_sigmoid_run_exports_thresholded_multi_hot_labels(tmp_path):
    import onnxruntime as ort

    run = fake_run(tmp_path / "run", image_model("small_cnn", 3, spread=2.0), size=32, activation="sigmoid",
                   classes=["a", "b", "c"], n_images=4)
    (run / "thresholds.json").write_text(json.dumps({"kind": "multilabel", "thresholds": [0.2, 0.5, 0.8]}))
    out = tmp_path / "export"
    assert main(["--run", str(run), "--output", str(out), "--format", "onnx", "--verify"]) == 0
    session = ort.InferenceSession(str(out / "model.onnx"))
    images = np.stack([photo(i, 48) for i in range(4)])
    probs, labels = session.run(["probabilities", "labels"], {"image": images})
    np.testing.assert_array_equal(labels, (probs >= np.array([0.2, 0.5, 0.8])).astype(np.int64))


def test_ordinal_cut_points_are_baked_into_the_labels(tmp_path):
    import onnxruntime as ort

    run = fake_run(tmp_path / "run", image_model("small_cnn", spread=2.0), size=32, n_images=4)
    (run / "thresholds.json").write_text(json.dumps({"kind": "ordinal", "cuts": [0.8, 1.5, 2.2]}))
    out = tmp_path / "export"
    assert main(["--run", str(run), "--output", str(out), "--format", "onnx"]) == 0
    session = ort.InferenceSession(str(out / "model.onnx"))
    images = np.stack([photo(i, 48) for i in range(12)])
    probs, labels = session.run(["probabilities", "labels"], {"image": images})
    np.testing.assert_array_equal(labels, np.digitize(probs @ np.arange(4), [0.8, 1.5, 2.2]))
    assert len(set(labels.tolist())) > 1


# --------------------------------------------------------------------------- converter workarounds


def test_convnext_ops_convert_after_unwrapping_and_erfc_rewrite():
    """ConvNeXt's two failures (tf2onnx 1.17, TF 2.21, Keras 3.15) on a tiny model with its ops:
    a grouped Conv2D that Keras wraps in a jit_compile function, and exact GELU (Erfc)."""
    import onnxruntime as ort

    from tfvision import serving

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 8))
    x = keras.layers.Conv2D(8, 7, padding="same", groups=8, name="depthwise_conv")(inp)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.Dense(16)(x)
    x = keras.layers.Activation("gelu")(x)  # approximate=False: tf.nn.gelu -> Erfc
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))
    fn = tf.function(lambda image: {"y": model(image)}, input_signature=[tf.TensorSpec([None, 16, 16, 8], tf.float32,
                                                                                       name="image")])
    raw_ops = {n.op for n in fn.get_concrete_function().graph.as_graph_def().node}
    assert "StatefulPartitionedCall" in raw_ops  # the wrapped grouped convolution

    frozen = serving.freeze(fn.get_concrete_function())
    ops = {n.op for n in frozen.graph_def.node}
    assert "Erfc" in ops and not any(o.endswith("PartitionedCall") for o in ops)
    onnx_model = serving.to_onnx(frozen)
    onnx_ops = {n.op_type for n in onnx_model.graph.node}
    assert "Erf" in onnx_ops and "Erfc" not in onnx_ops
    conv = next(n for n in onnx_model.graph.node if n.op_type == "Conv")
    assert {a.name: a.i for a in conv.attribute}["group"] == 8

    x = np.random.default_rng(0).normal(0, 2, (3, 16, 16, 8)).astype(np.float32)
    want = model(x).numpy()
    got = ort.InferenceSession(onnx_model.SerializeToString()).run(["y"], {"image": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    interpreter, runner = serving.tflite_interpreter(serving.to_tflite(frozen))
    assert "GELU" in {d["op_name"] for d in interpreter._get_ops_details()}
    np.testing.assert_allclose(runner(image=x)["y"], want, atol=1e-5)


def test_input_normalisation_moves_after_the_layout_transpose_exactly():
    """tf2onnx leaves (x - mean) * (1/std) on the NHWC input, in front of its NCHW Transpose,
    where ONNX Runtime broadcasts slowly; to_onnx moves it after the Transpose, same values."""
    import onnxruntime as ort

    from tfvision import serving
    from tfvision.models.layers import ImageNormalization

    keras.utils.set_random_seed(0)
    inp = keras.Input((20, 20, 3))
    x = ImageNormalization([123.7, 116.3, 103.5], [58.4, 57.1, 57.4], False)(inp)
    model = keras.Model(inp, keras.layers.Conv2D(4, 3, padding="same")(x))
    fn = tf.function(lambda image: {"y": model(image)},
                     input_signature=[tf.TensorSpec([None, 20, 20, 3], tf.float32, name="image")])
    onnx_model = serving.to_onnx(serving.freeze(fn.get_concrete_function()))
    first = onnx_model.graph.node[:3]
    assert [n.op_type for n in first] == ["Transpose", "Sub", "Mul"] and first[0].input[0] == "image"
    shapes = {i.name: list(i.dims) for i in onnx_model.graph.initializer}
    assert shapes[first[1].input[1]] == shapes[first[2].input[1]] == [1, 3, 1, 1]
    assert [3] not in shapes.values()  # the NHWC constants are gone
    x = np.random.default_rng(1).uniform(0, 255, (2, 20, 20, 3)).astype(np.float32)
    got = ort.InferenceSession(onnx_model.SerializeToString()).run(["y"], {"image": x})[0]
    np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)


def test_unet_dense_output_exports_per_pixel_probabilities(tmp_path):
    from tfvision.models.backbones import InputNorm
    from tfvision.models.unet import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(1, 3, InputNorm((100.0,), (50.0,)), base_filters=8, depth=3, deep_supervision=True)
    run = fake_run(tmp_path / "run", model, size=40, channels=1, classes=["bg", "liver", "tumour"], n_images=4)
    out = tmp_path / "export"
    assert main(["--run", str(run), "--output", str(out), "--format", "all", "--verify"]) == 0
    check_report(report(out), ALL_FORMATS)
    # Masks come back at the input's own size, in every runtime, equal to the Keras logits
    # resized back before the softmax (what predict --volume does).
    from tfvision import serving

    x = np.stack([photo(i, 64)[7:40, 3:50, :1] for i in range(2)])  # 33 x 47
    main_output = keras.Model(model.input, model.get_layer("logits").output)
    want = tf.nn.softmax(tf.image.resize(main_output(tf.image.resize(x.astype(np.float32), (40, 40))), (33, 47)))
    sig = tf.saved_model.load(str(out / "savedmodel")).signatures["serving_default"]
    got = sig(image=tf.constant(x))
    assert got["probabilities"].shape == (2, 33, 47, 3) and got["labels"].shape == (2, 33, 47)
    np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)
    np.testing.assert_array_equal(got["labels"], np.argmax(want, -1))
    import onnxruntime as ort

    onnx_probs = ort.InferenceSession(str(out / "model.onnx")).run(["probabilities"], {"image": x})[0]
    np.testing.assert_allclose(onnx_probs, want, atol=1e-5)
    _, tflite = serving.tflite_interpreter(out / "model.tflite")
    np.testing.assert_allclose(tflite(image=x)["probabilities"], want, atol=1e-5)
    bytes_sig = tf.saved_model.load(str(out / "savedmodel")).signatures["serve_bytes"]
    assert bytes_sig(image_bytes=tf.constant([jpeg_bytes(photo(0, 64))]))["probabilities"].shape == (1, 40, 40, 3)


# --------------------------------------------------------------------------- every backbone family (slow)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,size", [("efficientnetv2_b0", 64), ("convnext_tiny", 64), ("resnet50", 64),
                                           ("small_cnn", 48)])
def test_every_backbone_family_round_trips_in_every_format(tmp_path, backbone, size):
    run = fake_run(tmp_path / "run", image_model(backbone, spread=2.0), size=size)
    out = tmp_path / "export"
    assert main(["--run", str(run), "--output", str(out), "--format", "all", "--verify", "--float16",
                 "--quantize", "dynamic"]) == 0
    rep = report(out)
    check_report(rep, ALL_FORMATS | REDUCED)
    print(json.dumps({backbone: {f"{e['format']}/{e['precision']}/{e.get('signature', '')}":
                                 [e["max_abs_diff"], e["top1_agreement"]] for e in rep["exports"]}}))


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["efficientnetv2_b0", "convnext_tiny", "resnet50"])
def test_encoder_unet_exports_masks_at_input_size_in_every_format(tmp_path, encoder):
    from tfvision.models.unet import build_encoder_unet

    keras.utils.set_random_seed(0)
    model = build_encoder_unet(encoder, 3, 3, input_norm(encoder, "imagenet", 3), None,
                               decoder_filters=(32, 16, 8, 8, 8))
    run = fake_run(tmp_path / "run", model, size=64, classes=["bg", "organ", "lesion"], n_images=4)
    out = tmp_path / "export"
    assert main(["--run", str(run), "--output", str(out), "--format", "all", "--verify"]) == 0
    rep = report(out)
    check_report(rep, ALL_FORMATS)
    sig = tf.saved_model.load(str(out / "savedmodel")).signatures["serving_default"]
    assert sig(image=tf.zeros([1, 50, 70, 3], tf.uint8))["labels"].shape == (1, 50, 70)
    print(json.dumps({encoder: {f"{e['format']}/{e.get('signature', '')}": e["max_abs_diff"] for e in rep["exports"]}}))
