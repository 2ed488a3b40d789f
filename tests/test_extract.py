"""Feature extraction: parity with the backbone, labels and ids aligned, flat memory, inputs, failures."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from tests.conftest import jpeg_bytes, photo
from tfvision.config import HeadConfig
from tfvision.data.decode import decode_resized
from tfvision.extract import main
from tfvision.models.heads import build_image_model, input_norm


def image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """root/<class>/*.jpg|png: real photos at varied sizes."""
    k = 0
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            arr = photo(k, (40, 64, 90)[k % 3])
            if k % 2:
                (root / cls / f"{k}.jpg").write_bytes(jpeg_bytes(arr))
            else:
                Image.fromarray(arr).save(root / cls / f"{k}.png")
            k += 1
    return root


def pipeline_images(paths, size: int) -> np.ndarray:
    """What the extraction pipeline feeds the model: decode by magic bytes, resize."""
    return np.stack([decode_resized(tf.io.read_file(str(p)), 3, (size, size)).numpy()
                     for p in paths])


def test_mixed_precision_checkpoint_gives_float32_features(tmp_path):
    """A run trained in mixed_float16: extraction computes in float32 (CPUs emulate float16,
    and float16 casts would land in the ONNX graph), and equals the float32 model's features."""
    import tfvision.extract as ex

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(3)
        model = build_image_model("small_cnn", 3, 2, None, HeadConfig(), input_norm("small_cnn", "imagenet", 3))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("backbone").layers[1].compute_dtype == "float16"
    ckpt = tmp_path / "best.keras"
    model.save(ckpt)
    features = ex.feature_model("small_cnn", str(ckpt), 32, 3)
    assert {layer.compute_dtype for layer in features.get_layer("backbone").layers} == {"float32"}
    x = pipeline_images(sorted(image_folder(tmp_path / "images", {"a": 3}).rglob("*.*")), 32)
    reference = build_image_model("small_cnn", 3, 2, None, HeadConfig(), input_norm("small_cnn", "imagenet", 3))
    reference.set_weights(model.get_weights())  # the same weights, float32 layers
    want = reference.get_layer("backbone")(reference.get_layer("normalize")(x)).numpy().mean(axis=(1, 2))
    got = ex.keras_engine(features)(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # float16 compute would miss by ~1e-3


@pytest.mark.parametrize("engine", ["keras", "onnx"])
def test_features_equal_backbone_predict_on_the_same_images(tmp_path, engine):
    keras.utils.set_random_seed(3)
    model = build_image_model("small_cnn", 3, 2, None, HeadConfig(), input_norm("small_cnn", "imagenet", 3))
    ckpt = tmp_path / "best.keras"
    model.save(ckpt)
    images = image_folder(tmp_path / "images", {"cat": 4, "dog": 3})
    out = tmp_path / "features"
    assert main(["--backbone", "small_cnn", "--weights", str(ckpt), "--image-size", "32", "--input", str(images),
                 "--output", str(out), "--batch-size", "3", "--engine", engine]) == 0

    ids = pd.read_csv(out / "ids.csv", dtype=str)
    feats = np.load(out / "features.npy")
    assert feats.shape == (7, 256) and feats.dtype == np.float32
    x = pipeline_images(ids["path"], 32)
    normalized = model.get_layer("normalize")(x)
    want = model.get_layer("backbone").predict(normalized, verbose=0).mean(axis=(1, 2))  # + global average pool
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6 if engine == "keras" else 1e-5)
    assert ids["row"].astype(int).tolist() == list(range(7))
    np.testing.assert_array_equal(np.load(out / "labels.npy"), [0, 0, 0, 0, 1, 1, 1])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["feature_dim"] == 256 and meta["n_images"] == 7 and meta["class_counts"] == {"cat": 4, "dog": 3}
    assert meta["label_encoder"] == {"cat": 0, "dog": 1} and meta["image_size"] == [32, 32]
    for key in ("backbone", "timestamp", "images_per_s", "feature_stats", "class_weights"):
        assert key in meta


def test_onnx_engine_and_float16_give_the_keras_features(tmp_path):
    images = image_folder(tmp_path / "images", {"a": 3, "b": 3})
    # Batches of 2: the ONNX engine runs two at once and must still write rows in input order.
    args = ["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input", str(images),
            "--batch-size", "2"]
    assert main([*args, "--output", str(tmp_path / "keras"), "--engine", "keras"]) == 0
    assert main([*args, "--output", str(tmp_path / "onnx"), "--engine", "onnx", "--dtype", "float16"]) == 0
    a = np.load(tmp_path / "keras" / "features.npy")
    b = np.load(tmp_path / "onnx" / "features.npy")
    assert a.shape == (6, 256) and b.dtype == np.float16
    np.testing.assert_allclose(b.astype(np.float32), a, rtol=2e-3, atol=1e-4)  # float16 rounding only
    assert json.loads((tmp_path / "onnx" / "metadata.json").read_text())["engine"] == "onnx"
    ids = [(tmp_path / e / "ids.csv").read_text() for e in ("keras", "onnx")]
    assert ids[0] == ids[1]


def test_auto_engine_is_onnx_without_a_gpu_and_falls_back_to_keras(tmp_path, monkeypatch, caplog):
    import tfvision.extract as ex

    assert not tf.config.list_physical_devices("GPU")  # CI and the dev machines: CPU only
    images = image_folder(tmp_path / "images", {"a": 2, "b": 2})
    args = ["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input", str(images)]
    assert main([*args, "--output", str(tmp_path / "auto")]) == 0
    assert json.loads((tmp_path / "auto" / "metadata.json").read_text())["engine"] == "onnx"

    def broken(model):
        raise RuntimeError("tf2onnx left ops ONNX Runtime cannot run: ['Imaginary']")

    monkeypatch.setattr(ex, "onnx_engine", broken)
    assert main([*args, "--output", str(tmp_path / "fallback")]) == 0
    assert json.loads((tmp_path / "fallback" / "metadata.json").read_text())["engine"] == "keras"
    assert "ONNX conversion failed (RuntimeError: tf2onnx left ops" in caplog.text
    np.testing.assert_allclose(np.load(tmp_path / "fallback" / "features.npy"),
                               np.load(tmp_path / "auto" / "features.npy"), rtol=1e-5, atol=1e-5)


def test_onnx_engine_slices_batches_without_changing_rows(tmp_path, monkeypatch):
    """The ONNX engine runs each batch in cache-sized slices (see `onnx_engine`); uneven slices
    must come back whole and in order, equal to the Keras engine on the same batch."""
    import onnxruntime as ort

    import tfvision.extract as ex

    monkeypatch.setattr(ex, "ORT_PIXELS_PER_CALL", 3 * 32 * 32)  # slices of 3: 3 + 3 + 1 for 7 images
    keras.utils.set_random_seed(5)
    model = ex.feature_model("small_cnn", None, 32, 3)
    engine = ex.onnx_engine(model)
    x = pipeline_images(sorted(image_folder(tmp_path, {"a": 7}).rglob("*.*")), 32)
    sizes, real_run = [], ort.InferenceSession.run

    def counting(self, names, feeds, *args, **kwargs):
        sizes.append(len(feeds["image"]))
        return real_run(self, names, feeds, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    got = engine(x)
    assert sizes == [3, 3, 1]
    np.testing.assert_allclose(got, ex.keras_engine(model)(x), rtol=1e-5, atol=1e-5)


def test_csv_input_with_template_skips_unreadable_images_and_keeps_rows_aligned(tmp_path):
    root = tmp_path / "rakuten"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(9):
        name = f"image_{100 + i}_product_{7 + i}.jpg"
        (root / "images" / name).write_bytes(jpeg_bytes(photo(i, 48)) if i != 4 else b"not a jpeg")
        rows.append({"imageid": 100 + i, "productid": 7 + i, "prdtypecode": ["10", "2280", "50"][i % 3 if i < 6 else 0]})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    out = tmp_path / "features"
    assert main(["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input",
                 str(root / "train.csv"), "--path-template", "images/image_{imageid}_product_{productid}.jpg",
                 "--label-column", "prdtypecode", "--id-column", "imageid", "--output", str(out), "--tsne",
                 "--engine", "keras"]) == 0
    ids = pd.read_csv(out / "ids.csv", dtype=str)
    feats, labels = np.load(out / "features.npy"), np.load(out / "labels.npy")
    assert len(ids) == len(feats) == len(labels) == 8
    assert "104" not in ids["id"].tolist()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["n_rejected"] == 1 and meta["rejected"][0]["id"] == "104"
    assert meta["class_names"] == ["10", "2280", "50"]
    kept = [r for i, r in enumerate(rows) if i != 4]
    np.testing.assert_array_equal(labels, [meta["class_names"].index(r["prdtypecode"]) for r in kept])
    np.testing.assert_allclose(meta["class_weights"], compute_class_weight(
        "balanced", classes=np.arange(3), y=labels), rtol=1e-5)
    # row i of features.npy is the image named on row i of ids.csv
    again = tmp_path / "again"
    keep = root / "images" / f"image_{ids['id'][5]}_product_{int(ids['id'][5]) - 93}.jpg"
    one = tmp_path / "one"
    one.mkdir()
    (one / keep.name).write_bytes(keep.read_bytes())
    assert main(["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input", str(one),
                 "--output", str(again), "--engine", "keras"]) == 0
    np.testing.assert_allclose(np.load(again / "features.npy")[0], feats[5], rtol=1e-5, atol=1e-7)
    assert (out / "tsne.png").read_bytes()[:4] == b"\x89PNG"


def _peak_bytes(tmp_path: Path, n: int, image: Path, trace: bool = True) -> tuple[int, int]:
    """Peak Python-side allocation (numpy included) of one extraction over `n` images."""
    csv = tmp_path / f"list{n}.csv"
    pd.DataFrame({"path": [str(image)] * n, "id": [f"item{i:06d}" for i in range(n)]}).to_csv(csv, index=False)
    out = tmp_path / f"out{n}"
    args = ["--backbone", "efficientnetv2_b0", "--weights", "null", "--image-size", "32", "--input", str(csv),
            "--id-column", "id", "--output", str(out), "--batch-size", "32", "--engine", "keras"]
    if not trace:
        assert main(args) == 0
        return 0, 0
    gc.collect()  # garbage left by earlier tests would otherwise be freed (or not) mid-run, at random
    tracemalloc.start()
    try:
        assert main(args) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, np.load(out / "features.npy", mmap_mode="r").shape[1]


def test_memory_stays_flat_as_the_image_count_grows(tmp_path):
    image = tmp_path / "one.png"
    Image.fromarray(photo(1, 40)).save(image)
    _peak_bytes(tmp_path, 8, image, trace=False)  # warm-up: one-off allocations of the first run
    small, dim = _peak_bytes(tmp_path, 64, image)
    large, _ = _peak_bytes(tmp_path, 448, image)
    features = (448 - 64) * dim * 4  # what keeping the features in memory would add (1.9 MB)
    # What does grow: one id, one path and one flag per image (about 0.2 KB against 5 KB of features).
    assert large - small < 0.15 * features, (small, large, features)


def test_nan_features_stop_with_exit_1_and_no_output(tmp_path, monkeypatch, capsys):
    import tfvision.extract as ex

    images = image_folder(tmp_path / "images", {"a": 2})
    monkeypatch.setattr(ex, "keras_engine", lambda model: ex.Engine(lambda x: np.full((len(x), 256), np.nan, np.float32)))
    out = tmp_path / "features"
    assert main(["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input", str(images),
                 "--output", str(out), "--engine", "keras"]) == 1
    assert "NaN/Inf features" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".features*"))


def test_float16_overflow_is_named(tmp_path, monkeypatch, capsys):
    import tfvision.extract as ex

    images = image_folder(tmp_path / "images", {"a": 2})
    monkeypatch.setattr(ex, "keras_engine", lambda model: ex.Engine(lambda x: np.full((len(x), 256), 1e6, np.float32)))
    assert main(["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input", str(images),
                 "--output", str(tmp_path / "f"), "--dtype", "float16", "--engine", "keras"]) == 1
    assert "use --dtype float32" in capsys.readouterr().err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert main(["--backbone", "small_cnn", "--weights", "null", "--input", str(tmp_path / "nope.csv"),
                 "--output", str(tmp_path / "o")]) == 2
    (tmp_path / "list.csv").write_text("file,label\na.jpg,x\n")
    assert main(["--backbone", "small_cnn", "--weights", "null", "--input", str(tmp_path / "list.csv"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "--path-column" in capsys.readouterr().err
    assert main(["--backbone", "small_cnm", "--weights", "null", "--input", str(tmp_path / "list.csv"),
                 "--path-column", "file", "--output", str(tmp_path / "o")]) == 2
    assert "--backbone: unknown backbone 'small_cnm' (did you mean 'small_cnn'?)" in capsys.readouterr().err
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-00000-of-00001.tfrecord").write_bytes(b"")
    assert main(["--backbone", "small_cnn", "--weights", "null", "--input", str(shards),
                 "--output", str(tmp_path / "o")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_tfrecord_shards_give_the_same_features_as_the_files(small_digits, tmp_path):
    convert = pytest.importorskip("tfvision.convert")
    from tests.test_tfrecord import write_config
    from tfvision.config_loader import load_config

    cfg = load_config(write_config(small_digits, tmp_path))
    shards = tmp_path / "shards"
    convert.convert(cfg, shards, shard_mb=0.03, gzip=False, progress=False)
    out = tmp_path / "from_records"
    assert main(["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input", str(shards),
                 "--split", "val", "--output", str(out), "--engine", "keras"]) == 0
    ids = pd.read_csv(out / "ids.csv", dtype=str)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["n_images"] == len(ids) > 0 and meta["class_names"] == [str(i) for i in range(10)]
    files = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(small_digits / p) for p in ids["id"]], "label": ids["label"]}).to_csv(files, index=False)
    direct = tmp_path / "from_files"
    assert main(["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input", str(files),
                 "--output", str(direct), "--engine", "keras"]) == 0
    np.testing.assert_allclose(np.load(out / "features.npy"), np.load(direct / "features.npy"), rtol=1e-5, atol=1e-7)
    labels = np.load(out / "labels.npy")
    np.testing.assert_array_equal(labels, [meta["class_names"].index(v) for v in ids["label"]])


def test_truncated_shard_stops_with_exit_2_naming_it(small_digits, tmp_path, capsys):
    # extract reads shards through the trainer's reader, so it gets the same truncation check.
    convert = pytest.importorskip("tfvision.convert")
    from tests.test_tfrecord import write_config
    from tfvision.config_loader import load_config

    shards = tmp_path / "shards"
    convert.convert(load_config(write_config(small_digits, tmp_path)), shards, shard_mb=0.03, gzip=False,
                    progress=False)
    shard = sorted(shards.glob("val-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["--backbone", "small_cnn", "--weights", "null", "--image-size", "32", "--input", str(shards),
                 "--split", "val", "--output", str(tmp_path / "o"), "--engine", "keras"]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err
