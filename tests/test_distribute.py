"""train.strategy: multi_worker (two processes on localhost) and tpu (without a TPU)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import keras
import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, run_cli
from tests.test_training import MIRRORED  # train with 2 logical CPUs mirrored
from tfvision import distribute
from tfvision.config_loader import load_config
from tfvision.errors import ConfigError

# The demo config, made small: 300 digits, no augmentation or dropout (the runs compared
# must draw the same numbers), a fixed data order.
DEMO = ["augment.enabled=false", "augment.mix.mixup_alpha=0", "model.head.dropout=0",
        "data.deterministic=true", "data.prepare=null", "train.optimizer.lr=0.003"]



def demo_args(root, run, *sets):
    return ["--config", str(REPO / "configs" / "demo.json"), "--output-dir", str(run), "--quiet",
            "--set", f"data.root={root}", *DEMO, *sets]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_workers(args, tmp: Path, n: int = 2, only=None) -> dict[int, subprocess.Popen]:
    """`python -m tfvision.train args` as worker i of an n-worker cluster on localhost, for each
    i in `only` (default all). Each worker's temporary folders go under `tmp`."""
    hosts = [f"localhost:{p}" for p in free_ports(n)]
    procs = {}
    for i in (range(n) if only is None else only):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(tmp),
               "TF_CPP_MIN_LOG_LEVEL": "2", "NO_ALBUMENTATIONS_UPDATE": "1"}
        procs[i] = subprocess.Popen([sys.executable, "-m", "tfvision.train", *args, "--set",
                                     "train.strategy=multi_worker"], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return procs


def finish(procs: dict[int, subprocess.Popen], timeout=150) -> dict[int, tuple[int, str]]:
    return {i: (p.wait(timeout=timeout), p.stderr.read()[-3000:]) for i, p in procs.items()}


def epochs_logged(history: Path) -> list[int]:
    """The epochs in history.csv so far (CSVLogger creates it empty and adds rows at epoch ends)."""
    try:
        return pd.read_csv(history)["epoch"].tolist()
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return []


def weights(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


# --------------------------------------------------------------------------- multi_worker


@pytest.mark.configs
def test_two_workers_train_the_weights_one_process_trains_at_the_same_global_batch(small_digits, tmp_path):
    """2 workers x 16 per replica against one process mirroring 2 CPUs x 16: the same global
    batches, the same per-replica batch statistics (BatchNorm), so the same weights."""
    sets = ['train.phases=[{"epochs": 2}]', "train.steps_per_epoch=4", "train.batch_size=16"]
    (tmp_path / "tmp").mkdir()
    workers = start_workers(demo_args(small_digits, tmp_path / "two", *sets), tmp_path / "tmp")
    one = run_cli("-c", MIRRORED, *demo_args(small_digits, tmp_path / "one", *sets,
                                             "train.strategy=mirrored"))
    results = finish(workers)
    assert one.returncode == 0, one.stderr[-3000:]
    assert all(rc == 0 for rc, _ in results.values()), results

    a = weights(tmp_path / "one" / "checkpoints" / "phase0.weights.h5")
    b = weights(tmp_path / "two" / "checkpoints" / "phase0.weights.h5")
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)
    h1, h2 = pd.read_csv(tmp_path / "one" / "history.csv"), pd.read_csv(tmp_path / "two" / "history.csv")
    assert h2["epoch"].tolist() == [0, 1] and h2["loss"][1] < h2["loss"][0]  # it trained
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-4)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["replicas"] == 2
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["val_accuracy"] is not None
    # Only the chief wrote a run folder; the other worker's temporary one is gone.
    assert list((tmp_path / "tmp").glob("tfvision-worker*")) == []


@pytest.mark.configs
def test_killed_worker_restarts_and_every_epoch_is_logged_once(small_digits, tmp_path):
    sets = ['train.phases=[{"epochs": 3}]', "train.steps_per_epoch=25", "train.batch_size=8"]
    (tmp_path / "tmp").mkdir()
    run = tmp_path / "run"
    args = demo_args(small_digits, run, *sets)
    procs = start_workers(args, tmp_path / "tmp")
    history = run / "history.csv"
    deadline = time.time() + 90
    while not epochs_logged(history):
        assert time.time() < deadline and procs[0].poll() is None, finish(procs, 5)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # mid-epoch 2
    procs[1].wait()  # reaped: a zombie's pid still answers os.kill(pid, 0)
    # The chief's collectives fail on the lost peer and it exits; the cluster is restarted.
    rc, err = finish({0: procs[0]}, timeout=90)[0]
    assert rc != 0 and "Unavailable" in err, err
    assert epochs_logged(history) == [0]  # the kill came before epoch 2 ended
    backup = json.loads((run / "backup" / "phase0" / "training_metadata.json").read_text())
    assert backup["epoch"] == 1

    results = finish(start_workers(args, tmp_path / "tmp"))
    assert all(rc == 0 for rc, _ in results.values()), results
    assert epochs_logged(history) == [0, 1, 2]
    assert not (run / "backup" / "phase0").exists()  # BackupAndRestore removes it when done
    assert (run / "metrics.json").is_file()
    # The killed worker's temporary folder went with its successor; the others removed their own.
    assert list((tmp_path / "tmp").glob("tfvision-worker*")) == []


# --------------------------------------------------------------------------- batch and rate


def test_batch_size_is_per_replica_and_the_rate_scales_with_replicas():
    four = distribute.Runtime("multi_worker", SimpleNamespace(num_replicas_in_sync=4), worker=1, workers=4)
    assert four.global_batch(16) == 64 and four.scale_lr(0.001) == pytest.approx(0.004)
    assert not four.is_chief
    one = distribute.Runtime("default", SimpleNamespace(num_replicas_in_sync=1))
    assert one.global_batch(16) == 16 and one.scale_lr(0.001) == 0.001 and one.is_chief


def test_loose_files_are_sharded_by_data_each_worker_keeping_every_other_batch(small_digits):
    """What each of 2 workers trains on: batches 0, 2, 4... and 1, 3, 5... of the one-process
    stream, at the per-replica batch; validation batches full and of static shape."""

    from tfvision.data.inputs import FileInputs
    from tfvision.data.pipeline import PipelineSpec
    from tfvision.data.sources import load_samples
    from tfvision.data.splits import assign_splits
    from tfvision.tasks import get_task

    cfg = demo_config(f"data.root={small_digits}", *DEMO, "train.batch_size=8")
    task = get_task(cfg.task, cfg)
    inputs = FileInputs(cfg, task, assign_splits(load_samples(cfg.data).frame, cfg.data.split, cfg.seed))
    spec = PipelineSpec.from_config(cfg)

    one = inputs.dataset("train", spec, training=True, repeat=True, format_batch=task.format_batch)
    stream = [x.numpy() for x, _ in one.take(6)]
    for i in (0, 1):
        runtime = distribute.Runtime("multi_worker", Workers(i), worker=i, workers=2)
        train, val, steps, val_steps = runtime.fit_data(inputs, spec, task.format_batch, None)
        assert (steps, val_steps) == (inputs.sizes["train"] // 16, inputs.sizes["val"] // 16)
        for got, want in zip(train.take(3), stream[i::2], strict=True):
            np.testing.assert_array_equal(got[0].numpy(), want)
        assert val.element_spec[0].shape == (8, 32, 32, 3)


class Workers:
    """Hands a dataset function what MultiWorkerMirroredStrategy gives worker `i` of `n`."""

    def __init__(self, i, n=2):
        import tensorflow as tf

        self.num_replicas_in_sync = n
        self.context = tf.distribute.InputContext(n, i, n)

    def distribute_datasets_from_function(self, fn):
        return fn(self.context)


def test_shards_are_split_between_workers_by_file(small_digits, tmp_path, monkeypatch):
    from tests.test_tfrecord import SHARD_MB, write_config
    from tfvision.convert import convert
    from tfvision.data.pipeline import PipelineSpec
    from tfvision.data.tfrecord import RecordInputs
    from tfvision.errors import DataError
    from tfvision.tasks import get_task

    path = write_config(small_digits, tmp_path)
    convert(load_config(path), tmp_path / "shards", shard_mb=SHARD_MB, progress=False)  # 5 train shards
    cfg = load_config(path, ["data.source=tfrecord", f"data.root={tmp_path / 'shards'}", "augment.enabled=false"])
    task = get_task(cfg.task, cfg)
    inputs, spec = RecordInputs(cfg, task), PipelineSpec.from_config(cfg)

    def cluster(n, i):
        hosts = [f"h{k}:1" for k in range(n)]
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": hosts},
                                                    "task": {"type": "worker", "index": i}}))
        return distribute.Runtime("multi_worker", Workers(i, n), worker=i, workers=n)

    seen = []
    for i in (0, 1):
        train, *_ = cluster(2, i).fit_data(inputs, spec, task.format_batch, None)
        seen.append({x.tobytes() for batch in train.take(30) for x in batch[0].numpy()})
    assert not seen[0] & seen[1] and len(seen[0]) + len(seen[1]) == inputs.sizes["train"] == 225
    with pytest.raises(DataError, match="5 train shard.* for 6 workers"):
        cluster(6, 5).fit_data(inputs, spec, task.format_batch, None)


def test_tf_config_names_the_worker_chief_first(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.cluster_from_env()
    cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert distribute.cluster_from_env() == (3, 2)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 5}}))
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.cluster_from_env()


def test_only_the_chief_writes_the_run_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    chief = distribute.Runtime("multi_worker", None, worker=0, workers=2)
    with distribute.write_folder(chief, run) as folder:
        assert folder == run
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    worker = distribute.Runtime("multi_worker", None, worker=1, workers=2)
    with distribute.write_folder(worker, run) as folder:  # a new run: the worker derives its own
        assert folder.parent.parent == tmp_path / "tmp" and not folder.exists()
    (run / "backup").mkdir()
    (run / "backup" / "state.json").write_text("1")
    with distribute.write_folder(worker, run) as folder:
        assert folder.parent.parent == tmp_path / "tmp"
        assert (folder / "backup" / "state.json").read_text() == "1"  # resumes at the chief's state
        (folder / "history.csv").write_text("epoch\n0\n")
    assert not folder.parent.exists() and not (run / "history.csv").exists()
    assert sorted(p.name for p in run.iterdir()) == ["backup", "config.json"]
    # A killed worker's folder (marker, dead pid) goes; anything else with the name stays.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan, foreign = tmp_path / "tmp" / "tfvision-worker1-old", tmp_path / "tmp" / "tfvision-worker1-user"
    for folder in (orphan, foreign):
        folder.mkdir()
    (orphan / distribute.WORKER_MARKER).write_text(json.dumps({"pid": int(dead)}))
    with distribute.write_folder(worker, run):
        assert not orphan.exists() and foreign.exists()


# --------------------------------------------------------------------------- tpu


@pytest.fixture
def fresh_runtimes(monkeypatch):
    monkeypatch.setattr(distribute, "_RUNTIMES", {})
    yield
    keras.mixed_precision.set_global_policy("float32")


def demo_config(*sets):
    # The demo's own config, its data to be built in a fresh folder: validation needs no data, and a
    # clean clone has no data/sklearn_digits (these tests once passed only where a demo had run).
    root = Path(tempfile.mkdtemp(prefix="demo-config-")) / "sklearn_digits"
    return load_config(str(REPO / "configs" / "demo.json"), [f"data.root={root}", *sets])


def test_tpu_strategy_is_resolved_connected_initialised_and_trains_in_bfloat16(monkeypatch, fresh_runtimes):
    import tensorflow as tf

    calls = []

    class Resolver:
        def __init__(self, tpu):
            calls.append(("resolver", tpu))

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", lambda r: calls.append(("connect", r)))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", lambda r: calls.append(("init", r)))
    monkeypatch.setattr(tf.distribute, "TPUStrategy", lambda r: calls.append(("strategy", r)) or "tpu-strategy")
    runtime = distribute.setup(demo_config("train.strategy=tpu"))
    assert [c[0] for c in calls] == ["resolver", "connect", "init", "strategy"]
    assert calls[0] == ("resolver", "local") and calls[1][1] is calls[2][1] is calls[3][1]
    assert runtime.strategy == "tpu-strategy" and runtime.steps_per_execution == 32
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.layers.Dense(2).dtype_policy.compute_dtype == "bfloat16"
    assert distribute.setup(demo_config("train.strategy=tpu")) is runtime  # one per process
    monkeypatch.setattr(distribute, "_RUNTIMES", {})
    assert distribute.setup(demo_config("train.strategy=tpu", "train.steps_per_execution=8")).steps_per_execution == 8


@pytest.mark.configs
def test_tpu_strategy_without_a_tpu_stops_with_a_config_error(small_digits, tmp_path):
    r = run_cli("-m", "tfvision.train", *demo_args(small_digits, tmp_path / "run", "train.strategy=tpu"),
                timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "finds no TPU" in r.stderr and "TPUs not found" in r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_tpu_refuses_host_side_python_and_conflicting_jit(monkeypatch):
    import pydicom.data

    with pytest.raises(ConfigError, match="albumentations"):
        distribute.check_tpu_config(demo_config("train.strategy=tpu", 'augment.albumentations={"transform": {}}'))
    with pytest.raises(ConfigError, match="bfloat16"):
        distribute.check_tpu_config(demo_config("train.strategy=tpu", "train.mixed_precision=mixed_float16"))
    distribute.check_tpu_config(demo_config("train.strategy=tpu", "train.mixed_precision=mixed_bfloat16"))
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2")
    with pytest.raises(ConfigError, match="auto_jit"):
        distribute.check_tpu_config(demo_config("train.strategy=tpu"))
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
    distribute.check_tpu_config(demo_config("train.strategy=tpu"))

    png = REPO / "README.md"  # any file that is not DICOM
    dicom = pydicom.data.get_testdata_file("CT_small.dcm")
    distribute.check_host_decoders([png])
    with pytest.raises(ConfigError, match="DICOM .*CT_small"):
        distribute.check_host_decoders([png, dicom])


def test_tpu_needs_static_shapes():
    import tensorflow as tf

    images = tf.data.Dataset.from_tensor_slices(np.zeros((10, 4, 4, 3), np.float32))
    distribute.check_static(images.batch(4, drop_remainder=True).element_spec, "training")
    with pytest.raises(ConfigError, match=r"dynamic shape \(None, 4, 4, 3\)"):
        distribute.check_static(images.batch(4).element_spec, "training")
    ragged = tf.data.Dataset.range(3).map(lambda n: tf.zeros([n, 2])).batch(1, drop_remainder=True)
    with pytest.raises(ConfigError, match="dynamic shape"):
        distribute.check_static(ragged.element_spec, "validation")


@pytest.mark.configs
def test_tpu_run_checks_the_real_pipeline_and_records_bfloat16(small_digits, tmp_path, monkeypatch,
                                                               fresh_runtimes):
    """The TPU path end to end on the CPU: only the TPU pieces are stand-ins (the default
    strategy plays TPUStrategy); the pipeline, the shape check and the policy are real."""
    import tensorflow as tf

    from tfvision.train import main

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", lambda tpu: tpu)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", lambda r: None)
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", lambda r: None)

    class StandIn:  # a class, as Keras asks isinstance(strategy, tf.distribute.TPUStrategy)
        def __new__(cls, resolver):
            return tf.distribute.get_strategy()

    monkeypatch.setattr(tf.distribute, "TPUStrategy", StandIn)
    # 240 training images, one replica: a batch of 256 can never be full, its shape is dynamic.
    args = demo_args(small_digits, tmp_path / "big", "train.strategy=tpu", "train.batch_size=256",
                     'train.phases=[{"epochs": 1}]')
    assert main(args) == 2
    monkeypatch.setattr(distribute, "_RUNTIMES", {})
    run = tmp_path / "run"
    args = demo_args(small_digits, run, "train.strategy=tpu", "train.batch_size=16", "train.steps_per_epoch=2",
                     "train.steps_per_execution=2", 'train.phases=[{"epochs": 1}]')
    assert main(args) == 0
    assert json.loads((run / "run.json").read_text())["mixed_precision"] == "mixed_bfloat16"
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0]
