"""Accelerator-side augmentation (augment.placement "accelerator", issue 17): the batched ops
against the host's, MixUp/CutMix statistics, joint image/mask geometry, mixed precision, and
one training run through the CLI whose saved model carries no augmentation."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import stats  # noqa: E402

from tests.conftest import photo, run_cli  # noqa: E402
from tests.test_training import MIRRORED  # noqa: E402  (tfvision.train on 2 logical CPUs)
from tfvision.config import AugmentParams  # noqa: E402
from tfvision.data import augment as aug  # noqa: E402
from tfvision.data import batch_augment as ba  # noqa: E402
from tfvision.data.pipeline import PipelineSpec  # noqa: E402
from tfvision.errors import ConfigError  # noqa: E402

OFF = AugmentParams(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hflip=0, vflip=0, affine_p=0, color_p=0,
                    noise_p=0, blur_p=0, erase_p=0, elastic_p=0)
N = 128  # draws per placement: binomial sd of a 0.5 fraction is 0.044


def _only(**kw) -> AugmentParams:
    return dataclasses.replace(OFF, **kw)


def _host(images, params: AugmentParams, masks=None):
    """augment_image on each image in a tf.data map (the host pipeline's way), seeds 0..n-1."""
    table, plan = aug.param_table([params]), aug.Plan.from_tiers([params])
    cols = {"image": images, "i": tf.range(len(images))}
    if masks is not None:
        cols["mask"] = masks
    ds = tf.data.Dataset.from_tensor_slices(cols).map(
        lambda s: aug.augment_image(s, table[0], tf.stack([s["i"], 11]), plan))
    out = next(iter(ds.batch(len(images))))
    return out["image"].numpy(), (out["mask"].numpy() if masks is not None else None)


def _device(images, params: AugmentParams, masks=None, seed=(5, 6), **mix):
    """The whole batch at once, as the train step does, from uint8."""
    batch = {"image": tf.cast(tf.round(images), tf.uint8), "tier": tf.zeros([len(images)], tf.int32),
             "target": tf.one_hot(tf.range(len(images)) % 2, 2)}
    if masks is not None:
        batch["mask"] = masks
    out = ba.BatchAugment((params,), **mix)(batch, tf.constant(seed, tf.int32))
    return out


def _features(imgs, ref):
    """Per image: touched, mean, std, left-right and top-bottom balance."""
    touched = np.abs(imgs - ref[None]).reshape(len(imgs), -1).max(1) > 0  # ref holds integers, as uint8 does
    h, w = imgs.shape[1] // 2, imgs.shape[2] // 2
    feats = np.stack([imgs.mean((1, 2, 3)), imgs.std((1, 2, 3)),
                      imgs[:, :, :w].mean((1, 2, 3)) - imgs[:, :, w:].mean((1, 2, 3)),
                      imgs[:, :h].mean((1, 2, 3)) - imgs[:, h:].mean((1, 2, 3))], 1)
    return touched, feats


OP_PARAMS = {
    "hflip": _only(hflip=0.5),
    "vflip": _only(vflip=0.5),
    "affine": _only(affine_p=0.5, shift=0.1, scale=0.15, rotate=20.0),
    "color": _only(color_p=0.5, brightness=0.3, contrast=0.3, saturation=0.4, hue=0.05),
    "noise": _only(noise_p=0.5, noise_std=12.0),
    "blur": _only(blur_p=0.5, blur_sigma=1.5),
    "erase": _only(erase_p=0.5, erase_size=0.2, erase_holes=3),
    "elastic": _only(elastic_p=0.5, elastic_alpha=3.0),
}


@pytest.mark.parametrize("name", list(OP_PARAMS))
def test_each_op_matches_the_host_distribution(name):
    """Same fraction touched at p=0.5, and the same distribution of per-image statistics (two-sample
    KS on the touched images), not the same pixels: the draws differ, their law must not."""
    params = OP_PARAMS[name]
    assert [op.__name__ for op, _ in aug.Plan.from_tiers([params]).ops] == [name]  # the other ops are not built
    ref = photo(3, 32).astype(np.float32)
    images = tf.constant(np.repeat(ref[None], N, 0))
    host, _ = _host(images, params)
    dev = _device(images, params)["image"].numpy()
    assert dev.dtype == np.float32 and dev.shape == host.shape and 0 <= dev.min() and dev.max() <= 255
    (th, fh), (td, fd) = _features(host, ref), _features(dev, ref)
    assert abs(th.mean() - 0.5) < 0.15 and abs(td.mean() - 0.5) < 0.15, (th.mean(), td.mean())
    assert abs(th.mean() - td.mean()) < 0.2
    for k in range(fh.shape[1]):
        a, b = fh[th, k], fd[td, k]
        if np.ptp(a) < 1e-3 and np.ptp(b) < 1e-3:  # a constant statistic (a flip keeps the mean): equal
            assert abs(a.mean() - b.mean()) < 0.6, (name, k)
        else:
            assert stats.ks_2samp(a, b).pvalue > 1e-3, (name, k, a.mean(), b.mean(), a.std(), b.std())


def test_tiers_are_per_sample_and_unused_ops_are_left_out():
    light, heavy = _only(hflip=0.0), _only(hflip=1.0, erase_p=0.0)
    images = tf.constant(np.repeat(photo(1, 32)[None], 8, 0).astype(np.float32))
    batch = {"image": tf.cast(images, tf.uint8), "tier": tf.constant([0, 1] * 4), "target": tf.zeros([8, 2])}
    out = ba.BatchAugment((light, heavy))(batch, tf.constant([1, 2]))["image"].numpy()
    ref = images.numpy()
    assert all(np.array_equal(out[i], ref[i]) for i in range(0, 8, 2))  # tier 0: never flipped
    assert all(np.array_equal(out[i], ref[i, :, ::-1]) for i in range(1, 8, 2))  # tier 1: always
    assert [op.__name__ for op, _ in aug.Plan.from_tiers([light, heavy]).ops] == ["hflip"]


@pytest.mark.parametrize("ops", [dict(hflip=1.0), dict(vflip=1.0), dict(affine_p=1.0, rotate=25.0, scale=0.2,
                                                                        shift=0.15),
                                 dict(elastic_p=1.0, elastic_alpha=3.0),
                                 dict(hflip=0.5, vflip=0.5, affine_p=1.0, rotate=25.0, elastic_p=1.0)])
def test_checkerboard_image_and_mask_move_together(ops):
    cell = (np.indices((48, 48)) // 8).sum(0) % 2
    image = np.where(cell[..., None] == 1, 225.0, 30.0).astype(np.float32) * np.ones(3, np.float32)
    images = tf.constant(np.repeat(image[None], 8, 0))
    masks = tf.constant(np.repeat(cell[None, ..., None].astype(np.int32), 8, 0))
    out = _device(images, _only(**ops), masks=masks)
    img, m = out["image"].numpy()[..., 0], out["mask"].numpy()
    assert m.dtype == np.int32 and set(np.unique(m)) <= {0, 1}  # labels never blended
    sure = (img < 60) | (img > 195)  # pixels clearly one colour (bilinear edges aside)
    assert ((img > 127) == (m[..., 0] == 1))[sure].mean() > 0.99
    assert not np.array_equal(m, masks.numpy())  # something moved


def _mix_draws(n, masks=False, **mix):
    """Per draw: image 0 (black) paired with image 3 (white): lambda, the white fraction of image 0,
    the label mass per row and per class, and whether mask 0 labels image 0's white pixels."""
    images = np.zeros((4, 16, 16, 3), np.float32)
    images[2:] = 255
    batch = {"image": tf.constant(images, tf.uint8), "tier": tf.zeros([4], tf.int32),
             "target": tf.one_hot([0, 0, 1, 1], 2), "mask": tf.constant(images[..., :1] > 0, tf.int32)}
    if not masks:
        del batch["mask"]
    fn = tf.function(lambda s: ba.BatchAugment((OFF,), mix_p=1.0, **mix)(batch, s))
    lams, white, mass, mask_ok = [], [], [], []
    for i in range(n):
        out = fn(tf.constant([i, 1]))
        t = out["target"].numpy()
        lams.append(t[0, 0])
        white.append(out["image"].numpy()[0].mean() / 255.0)
        mass.append((t.sum(1), t.sum(0)))
        if masks:
            mask_ok.append(np.array_equal(out["mask"].numpy()[0, ..., 0] == 1, out["image"].numpy()[0, ..., 0] > 127))
    return np.array(lams), np.array(white), mass, mask_ok


def test_mixup_lambda_is_beta_and_label_mass_is_conserved():
    with pytest.raises(ValueError, match="MixUp"):  # with masks, as on the host
        _mix_draws(1, masks=True, mixup_alpha=0.4)
    lams, white, mass, _ = _mix_draws(300, mixup_alpha=0.4)
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    np.testing.assert_allclose(white, 1.0 - lams, atol=2e-3)  # pixels blended by the same lambda
    for rows, cols in mass:
        np.testing.assert_allclose(rows, 1.0, atol=1e-5)
        np.testing.assert_allclose(cols, [2.0, 2.0], atol=1e-5)


def test_cutmix_box_area_matches_lambda_and_masks_follow():
    lams, white, mass, mask_ok = _mix_draws(150, masks=True, cutmix_alpha=1.0)
    np.testing.assert_allclose(white, 1.0 - lams, atol=1e-5)  # exactly the pasted area
    assert 0.3 < lams.mean() < 0.7 and lams.std() > 0.15
    assert len(mask_ok) == 150 and all(mask_ok)  # the mask pasted with the same box
    for rows, cols in mass:
        np.testing.assert_allclose(rows, 1.0, atol=1e-5)
        np.testing.assert_allclose(cols, [2.0, 2.0], atol=1e-5)


def test_step_seeds_are_reproducible_and_differ_by_step_and_replica():
    s = ba.step_seed
    assert np.array_equal(s(3, 10, 0), s(3, 10, 0))
    seeds = {tuple(s(3, step, r).numpy()) for step in range(4) for r in range(2)}
    assert len(seeds) == 8 and tuple(s(4, 0, 0).numpy()) not in seeds


def test_the_step_wrapper_draws_per_step_and_repeats_a_step_exactly():
    """The step counter (the optimizer's iterations) seeds each step: a new step draws anew,
    the same step again (a resumed run) draws the same."""
    counter = tf.Variable(0, dtype=tf.int64)
    seen = ba.batch_augmented(lambda data: data[0], ba.BatchAugment((_only(hflip=0.5, color_p=1.0),)),
                              step_counter=lambda: counter)
    step = tf.function(seen)
    batch = {"image": tf.constant(np.stack([photo(i, 32) for i in range(8)])), "tier": tf.zeros([8], tf.int32),
             "target": tf.one_hot([0, 1] * 4, 2)}
    first = step(batch).numpy()
    counter.assign_add(1)
    second = step(batch).numpy()
    counter.assign(0)
    assert not np.array_equal(first, second) and np.array_equal(first, step(batch).numpy())


def _tiny_model():
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2)(x)
    out = keras.layers.Activation("softmax", dtype="float32")(out)
    return keras.Model(inp, out)


HEAVY = _only(hflip=0.5, vflip=0.5, affine_p=1.0, rotate=20.0, shift=0.1, scale=0.1, color_p=1.0, brightness=0.3,
              contrast=0.3, saturation=0.3, hue=0.05, noise_p=1.0, noise_std=10.0, blur_p=1.0, erase_p=1.0,
              elastic_p=1.0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_and_ops_stay_float32(policy):
    batch = {"image": tf.constant(np.stack([photo(i, 32) for i in range(8)])),
             "target": tf.one_hot([0, 1] * 4, 2), "tier": tf.zeros([8], tf.int32)}
    spec = PipelineSpec(image_size=(32, 32), channels=3, batch_size=8, tiers=[HEAVY], cutmix_alpha=1.0, mix_p=1.0,
                        placement="accelerator")
    reference = ba.BatchAugment.from_spec(spec)(batch, tf.constant([1, 2]))["image"]
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _tiny_model()
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        ba.install(model, spec)
        before = [w.numpy() for w in model.trainable_weights]
        # A dataset of uint8 batch dicts: only the installed step can take it.
        history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=2, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"]).all()
        assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights, strict=True))
        assert model.compute_dtype == policy.split("_")[1]
        # The ops' math ignores the policy (keras-cv #2353 broke there): same seed, same float32 pixels.
        again = ba.BatchAugment.from_spec(spec)(batch, tf.constant([1, 2]))["image"]
        assert again.dtype == tf.float32 and np.array_equal(again.numpy(), reference.numpy())
        cast = ba.BatchAugment.from_spec(spec, dtype=policy.split("_")[1])(batch, tf.constant([1, 2]))["image"]
        np.testing.assert_allclose(tf.cast(cast, tf.float32).numpy(), reference.numpy(), rtol=1e-2, atol=1.0)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_albumentations_is_refused_with_accelerator_placement(tmp_path):
    from tfvision.config_loader import load_config

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"task": "classification", "data": {"source": "folders", "root": str(tmp_path)},
                               "model": {"backbone": "small_cnn", "weights": None},
                               "augment": {"placement": "accelerator", "albumentations": {"transform": {}}}}))
    with pytest.raises(ConfigError, match="augment.placement"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="did you mean|not one of"):
        load_config(cfg, ["augment.albumentations=null", "augment.placement=gpu"])


# A CLI run in subprocesses (45-70 s on 2 loaded cores): with the user-path suites, -m configs.
@pytest.mark.configs
def test_training_run_on_two_replicas_saves_no_augmentation(small_digits, tmp_path):
    """The CLI trains with placement "accelerator" under MirroredStrategy on 2 logical CPUs; the
    best.keras it saves is the task's plain model: same layers as a fresh build, and its
    predictions are deterministic (no random op in the inference graph)."""
    from tfvision.config_loader import load_config
    from tfvision.models.heads import input_norm
    from tfvision.tasks import get_task

    cfg = {"seed": 1, "task": "classification",
           "data": {"source": "csv", "root": str(small_digits), "csv": "digits.csv", "group_column": "group",
                    "image_size": 32, "split": {"method": "stratified", "val_fraction": 0.25}},
           "model": {"backbone": "small_cnn", "weights": None},
           "augment": {"placement": "accelerator", "params": {"erase_p": 0.3, "blur_p": 0.2},
                       "mix": {"cutmix_alpha": 1.0, "p": 0.5}},
           "train": {"batch_size": 16, "steps_per_epoch": 3, "epochs": 1, "strategy": "mirrored",
                     "monitor": "val_accuracy", "tensorboard": False}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    r = run_cli("-c", MIRRORED, "--config", str(path), "--output-dir", str(run), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["replicas"] == 2
    assert json.loads((run / "metrics.json").read_text())["val_accuracy"] is not None

    saved = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    conf = load_config(run / "config.json")
    fresh = get_task("classification", conf).build_model(conf, 10, input_norm("small_cnn", "imagenet", 3))
    assert [type(layer).__name__ for layer in saved.layers] == [type(layer).__name__ for layer in fresh.layers]
    assert len(saved.weights) == len(fresh.weights)
    x = np.stack([photo(i, 32) for i in range(4)]).astype(np.float32)
    np.testing.assert_array_equal(saved.predict(x, verbose=0), saved.predict(x, verbose=0))
    assert "train_step" not in vars(saved)  # the wrapper lived on the training object only


@pytest.mark.slow
def test_demo_reaches_the_same_accuracy_with_either_placement(tmp_path):
    """The demo (8 epochs, MixUp) trained with each placement: same accuracy within noise."""
    acc = {}
    for placement in ("host", "accelerator"):
        run = tmp_path / placement
        r = run_cli("-m", "tfvision.train", "--config", "configs/demo.json", "--output-dir", str(run),
                    "--set", f"data.root={tmp_path / 'digits'}", f"augment.placement={placement}", "--quiet")
        assert r.returncode == 0, r.stderr[-3000:]
        acc[placement] = json.loads((run / "metrics.json").read_text())["val_accuracy"]
    assert acc["accelerator"] >= 0.90 and abs(acc["accelerator"] - acc["host"]) < 0.04, acc


@pytest.mark.slow
def test_segmentation_learns_with_masks_augmented_on_the_device(tmp_path):
    """U-Net on MNI slices, 3 epochs, with affine, elastic, flips and CutMix in the train step and
    the segmentation task's format_batch after them (50 s). The plumbing end to end; the
    checkerboard test above is the exact check of alignment."""
    from tests import layouts
    from tests.test_segmentation import _config
    from tfvision.train import main

    root = layouts.mni_volumes(tmp_path / "mni").root
    cfg = _config(root, tmp_path, augment={"placement": "accelerator", "mix": {"cutmix_alpha": 1.0, "p": 0.5}},
                  train={"epochs": 3})
    assert main(["--config", str(cfg), "--output-dir", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_dice_per_class"]["brain"] > 0.9
