"""train.strategy "jax" (issue 16): Keras on the JAX backend, fed by tf.data.

JAX code runs in subprocesses (Keras picks its backend once per process, and this one has
TensorFlow's), each with two fake CPU devices (``XLA_FLAGS``) so that
`keras.distribution.DataParallel` splits every batch in two.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, run_cli
from tfvision.backend import select_backend, use_tensorflow
from tfvision.errors import ConfigError

pytest.importorskip("jax")

JAX_ENV = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "TF_CPP_MIN_LOG_LEVEL": "2", "NO_ALBUMENTATIONS_UPDATE": "1"}


def run_jax(script: str, *args, timeout=300):
    out = run_cli("-c", script, *args, env=JAX_ENV, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- backend selection


def test_select_backend_sets_jax_before_keras_is_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "keras", raising=False)  # the CLI selects before importing it
    monkeypatch.setenv("KERAS_BACKEND", "")  # recorded, so that the test's own setting is undone
    monkeypatch.delenv("KERAS_BACKEND")
    assert select_backend("jax") == "jax" and os.environ["KERAS_BACKEND"] == "jax"


@pytest.mark.parametrize(("strategy", "env", "message"), [
    ("jax", "tensorflow", "unset KERAS_BACKEND or set it to jax"),
    ("mirrored", "jax", "needs the TensorFlow backend"),
    ("tpu", "jax", "use train.strategy 'jax'"),
])
def test_select_backend_refuses_a_fixed_other_backend(monkeypatch, strategy, env, message):
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setenv("KERAS_BACKEND", env)
    with pytest.raises(ConfigError, match=message):
        select_backend(strategy)


def test_select_backend_leaves_default_and_a_matching_backend(monkeypatch):
    import keras  # noqa: F401  (this process's Keras, on TensorFlow)

    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert select_backend("default") == "tensorflow"  # Keras is imported here: it only checks
    assert select_backend("mirrored") == "tensorflow"
    with pytest.raises(ConfigError, match="Keras was imported with it already"):
        select_backend("jax")


def test_use_tensorflow_overrides_keras_backend_jax_before_keras_is_imported(monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    use_tensorflow("export")
    assert os.environ["KERAS_BACKEND"] == "tensorflow"
    assert "export runs on Keras's TensorFlow backend; KERAS_BACKEND=jax is ignored" in caplog.text


def test_use_tensorflow_refuses_once_keras_has_another_backend(monkeypatch):
    class JaxKeras:  # what `import keras` leaves in sys.modules under KERAS_BACKEND=jax
        class backend:
            backend = staticmethod(lambda: "jax")

    monkeypatch.setitem(sys.modules, "keras", JaxKeras)
    with pytest.raises(ConfigError, match="predict needs Keras's TensorFlow backend"):
        use_tensorflow("predict")


def test_cli_refuses_jax_strategy_on_tensorflow_backend(tmp_path):
    out = run_cli("-m", "tfvision.train", "--config", str(REPO / "configs" / "demo.json"), "--output-dir",
                  str(tmp_path / "run"), "--set", "train.strategy=jax", env={"KERAS_BACKEND": "tensorflow"},
                  timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.strategy: 'jax'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- models, losses, metrics

STEP_EVERY_MODEL = r"""
import json
import keras
import numpy as np
from tfvision.config import HeadConfig
from tfvision.keras_metrics import MaskedAUC
from tfvision.losses import MaskedBinaryLoss
from tfvision.models.heads import build_image_model, input_norm
from tfvision.models.unet import build_unet
from tfvision.seg_losses import CEPlusDice, SegmentationFocalLoss, SoftDice, WeightedCrossEntropy
from tfvision.seg_metrics import per_class_metrics

assert keras.backend.backend() == "jax"
keras.distribution.set_distribution(keras.distribution.DataParallel())
rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
out = {}
# multi-label: [targets, known] packed in y_true
model = build_image_model("small_cnn", 3, 3, None, HeadConfig(type="mlp", hidden=[8]),
                          input_norm("small_cnn", "imagenet", 3))
model.compile("adam", MaskedBinaryLoss(3, gamma=2.0, alpha=[0.5, 1.0, 2.0]), metrics=[MaskedAUC(3)],
              jit_compile=True)
y = np.concatenate([rng.integers(0, 2, (4, 3)), np.ones((4, 3))], axis=-1).astype("float32")
out["multilabel"] = [float(v) for v in model.train_on_batch(x, y)]
mask = rng.integers(0, 3, (4, 32, 32, 1)).astype("int32")
model = build_unet(3, 3, input_norm("unet", "imagenet", 3), base_filters=4, depth=3, attention=True)
model.compile("adam", CEPlusDice(3), metrics=per_class_metrics(3), jit_compile=True)
out["unet"] = [float(v) for v in model.train_on_batch(x, mask)]
logits = rng.normal(size=(4, 32, 32, 3)).astype("float32")
for loss in (SoftDice(3), WeightedCrossEntropy(3, [1.0, 2.0, 3.0]), SegmentationFocalLoss(3)):
    out[loss.name] = float(loss(mask, logits))
print(json.dumps(out))
"""


@pytest.mark.configs  # XLA compiles a U-Net: about 1-2 minutes on 2 loaded cores
def test_models_losses_and_metrics_train_a_step_on_jax():
    """The multi-label and segmentation losses and metrics (the classification ones are Keras's)."""
    out = run_jax(STEP_EVERY_MODEL)
    flat = [v for vs in out.values() for v in (vs if isinstance(vs, list) else [vs])]
    assert len(out) == 5 and np.isfinite(flat).all(), out


DATA_PARALLEL = r"""
import json
import keras
import numpy as np
from tfvision.config import HeadConfig
from tfvision.models.heads import build_image_model, input_norm

rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
y = np.eye(10, dtype="float32")[rng.integers(0, 10, 16)]
weights = {}
for n in (1, 2):
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:n]))
    keras.utils.set_random_seed(0)
    model = build_image_model("small_cnn", 3, 10, None, HeadConfig(dropout=0.0),
                              input_norm("small_cnn", "imagenet", 3))
    # SGD: a difference in gradients shows as is (Adam magnifies those of near-zero gradients)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.CategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    start = model.get_weights()
    for _ in range(3):
        model.train_on_batch(x, y)
    weights[n] = model.get_weights()
    layout = model.weights[0].value.sharding
diff = max(float(np.abs(a - b).max()) for a, b in zip(weights[1], weights[2]))
moved = max(float(np.abs(a - b).max()) for a, b in zip(weights[1], start))
print(json.dumps({"diff": diff, "moved": moved, "devices": len(layout.device_set)}))
"""


def test_data_parallel_over_two_devices_matches_one():
    """Batch statistics (BatchNorm) and gradients are over the global batch, split or not."""
    out = run_jax(DATA_PARALLEL)
    assert out["devices"] == 2
    print(f"after 3 SGD steps: max |w(2 devices) - w(1 device)| {out['diff']:.2e}, "
          f"max |w - w0| {out['moved']:.2e}")
    # float32 sums in another order, through 3 large steps: 0.1% of the change (6e-4 of 0.58) on
    # 2 loaded cores. BatchNorm over each half-batch alone would differ by the change itself.
    assert out["moved"] > 0.1 and out["diff"] < 5e-3 * out["moved"], out


# --------------------------------------------------------------------------- the CLI


def weights_h5(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def train(root, run, *sets, env=None, timeout=600):
    out = run_cli("-m", "tfvision.train", "--config", str(REPO / "configs" / "demo.json"), "--output-dir", str(run),
                  "--quiet", "--set", f"data.root={root}", "data.prepare=null", "train.tensorboard=false", *sets,
                  env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.configs
def test_demo_on_jax_matches_tensorflow_and_exports_on_tensorflow(tmp_path, digits_root):
    """The demo on 2 fake devices reaches TensorFlow's accuracy; the run folder has TensorFlow's
    files; with KERAS_BACKEND=jax still set, export (--verify passing), evaluate and predict run
    it on the TensorFlow backend."""
    jax_run, tf_run = tmp_path / "jax", tmp_path / "tf"
    epochs = ['train.phases=[{"epochs": 2, "trainable": "all"}]', "train.batch_size=32"]
    metrics = train(digits_root, jax_run, *epochs, "train.strategy=jax", env=JAX_ENV)
    assert metrics["val_accuracy"] > 0.9, metrics
    run = json.loads((jax_run / "run.json").read_text())
    assert run["replicas"] == 2
    # TensorFlow, a few steps: the files and keys, not the accuracy
    tf_metrics = train(digits_root, tf_run, 'train.phases=[{"epochs": 1, "trainable": "all"}]',
                       "train.steps_per_epoch=3", env={"KERAS_BACKEND": "tensorflow"})
    assert files(jax_run) == files(tf_run)
    assert metrics.keys() == tf_metrics.keys()
    assert run.keys() == json.loads((tf_run / "run.json").read_text()).keys()
    assert weights_h5(jax_run / "checkpoints" / "phase0.weights.h5").keys() == \
        weights_h5(tf_run / "checkpoints" / "phase0.weights.h5").keys()

    # As in a Kaggle notebook that set KERAS_BACKEND=jax for training: the commands switch to
    # TensorFlow themselves, with a notice.
    out = run_cli("-m", "tfvision.export", "--run", str(jax_run), "--verify", "--n-images", "8",
                  env=JAX_ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "export runs on Keras's TensorFlow backend; KERAS_BACKEND=jax is ignored" in out.stderr
    manifests = list((jax_run / "export").glob("*.json"))
    assert manifests and any(json.loads(m.read_text()).get("verified") for m in manifests), manifests
    out = run_cli("-m", "tfvision.evaluate", "--run", str(jax_run), env=JAX_ENV, timeout=600)
    assert out.returncode == 0 and "evaluate runs on Keras's TensorFlow backend" in out.stderr, out.stderr[-3000:]
    out = run_cli("-m", "tfvision.predict", "--run", str(jax_run), "--input-dir", str(digits_root / "images"),
                  "--output", str(tmp_path / "predictions.csv"), env=JAX_ENV, timeout=600)
    assert out.returncode == 0 and "predict runs on Keras's TensorFlow backend" in out.stderr, out.stderr[-3000:]
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 1 + 1797


# JAX 0.7.2, the Kaggle TPU image's (.ci/tf220): the same batches, the same loss after one step
# (2e-6), but the first conv kernel 1.5e-3 apart after it and 0.1 after 4 steps. Not the CLI:
# one SGD step of `fit` on 32 of these digit images, 2 devices against 1, ends 8.8e-4 apart
# (of 0.19 moved) on JAX 0.7.2 and 4.5e-7 on JAX 0.10.2. The random images of
# test_data_parallel_over_two_devices_matches_one agree on both.
@pytest.mark.xfail(tuple(int(p) for p in version("jax").split(".")[:2]) < (0, 10), strict=False,
                   reason="JAX < 0.10: one step on 2 CPU devices is 8.8e-4 from 1 device's (0.1 after 4)")
@pytest.mark.configs  # two CLI trainings on JAX: about 2 minutes on 2 loaded cores
def test_demo_on_two_devices_matches_one_device_at_the_same_global_batch(tmp_path, small_digits):
    """The CLI end to end: 2 devices x 16 per device at 2x the rate (the linear rule) train the
    weights one device does with batch 32 at 2x the rate. Plain SGD: Adam turns the rounding
    noise of near-zero gradients into whole steps of +-lr."""
    fixed = ["augment.enabled=false", "augment.mix.mixup_alpha=0", "model.head.dropout=0",
             "data.deterministic=true", 'train.phases=[{"epochs": 1, "trainable": "all"}]',
             "train.strategy=jax", "train.steps_per_epoch=4", "train.optimizer.name=sgd",
             "train.optimizer.momentum=0", "train.optimizer.weight_decay=0"]
    train(small_digits, tmp_path / "two", *fixed, "train.batch_size=16", "train.optimizer.lr=0.05",
          env=JAX_ENV)
    train(small_digits, tmp_path / "one", *fixed, "train.batch_size=32", "train.optimizer.lr=0.1",
          env={**JAX_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    two = weights_h5(tmp_path / "two" / "checkpoints" / "phase0.weights.h5")
    one = weights_h5(tmp_path / "one" / "checkpoints" / "phase0.weights.h5")
    assert two.keys() == one.keys()
    diff = {k: float(np.abs(two[k] - one[k]).max()) for k in two}
    losses = [float(pd.read_csv(tmp_path / r / "history.csv")["loss"].iloc[-1]) for r in ("one", "two")]
    print("max |w(2 devices) - w(1 device)| after 4 SGD steps:", max(diff.values()), "mean loss", losses)
    # Both must see the same batches: until tfvision.data.pipeline.per_iterator, the batches fit
    # trained on depended on how far Keras's peek iterator had read ahead, and the two runs
    # differed by 3e-2 to 0.2 (8e-2 after 2 steps, as much as the weights moved). Same batches:
    # the mean training loss agrees within 1e-4, the weights within 1.6e-3 (3 runs on 2 loaded
    # cores; BatchNorm moving variance and the first kernel), float32 sums split in two and
    # amplified through 4 steps at lr 0.1, as in test_data_parallel_over_two_devices_matches_one.
    assert abs(losses[0] - losses[1]) < 1e-3, losses
    assert max(diff.values()) < 1e-2, sorted(diff.items(), key=lambda kv: -kv[1])[:5]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["replicas"] == 2
    assert json.loads((tmp_path / "one" / "run.json").read_text())["replicas"] == 1


@pytest.mark.configs
def test_unet_segmentation_config_trains_on_jax(tmp_path):
    """tests/test_segmentation.py's U-Net config (MNI brain slices) on 2 fake devices: Dice and IoU
    from the same metrics, scored into metrics.json as with TensorFlow."""
    pytest.importorskip("nilearn.datasets")
    from tests import layouts
    from tests.test_segmentation import _config

    root = layouts.mni_volumes(tmp_path / "mni").root
    run = tmp_path / "run"
    out = run_cli("-m", "tfvision.train", "--config", str(_config(root, tmp_path)), "--output-dir", str(run),
                  "--quiet", "--set", "train.strategy=jax", "train.batch_size=4", env=JAX_ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    print("U-Net on JAX:", {k: metrics[k] for k in ("val_dice_macro", "val_iou_macro")})
    assert set(metrics["val_dice_per_class"]) == {"background", "brain"}
    assert metrics["val_dice_per_class"]["brain"] > 0.8, metrics
