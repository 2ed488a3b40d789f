"""Decode, augment, mix and the batched pipeline; ops checked eagerly and inside Dataset.map."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfvision.config import AugmentParams, Config, TierConfig
from tfvision.data import augment as aug
from tfvision.data.check import check_files
from tfvision.data.decode import decode, decode_resized
from tfvision.data.mix import mix_batch
from tfvision.data.pipeline import PipelineSpec, Samples, build_dataset, crop_window, per_iterator

OFF = AugmentParams(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hflip=0, vflip=0, affine_p=0, color_p=0,
                    noise_p=0, blur_p=0, erase_p=0)


def read(p):
    return tf.io.read_file(str(p))


# --------------------------------------------------------------------------- decode


def test_decode_picks_decoder_from_bytes_not_extension(odd_images):
    rgb = odd_images["_rgb_array"].astype(np.float32)
    png_as_jpg = decode(read(odd_images["png_named.jpg"]), 3).numpy()
    np.testing.assert_array_equal(png_as_jpg, rgb)  # lossless path, exact
    jpg = decode(read(odd_images["rgb.jpg"]), 3).numpy()
    assert jpg.shape == rgb.shape and np.abs(jpg - rgb).mean() < 6  # JPEG loss only


def test_decode_gray_cmyk_and_16bit(odd_images):
    rgb = odd_images["_rgb_array"].astype(np.float32)
    gray = decode(read(odd_images["gray.png"]), 3).numpy()
    assert gray.shape == rgb.shape
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_array_equal(gray[..., 0], rgb[..., 0])
    g16 = decode(read(odd_images["gray16.png"]), 1).numpy()
    np.testing.assert_allclose(g16[..., 0], rgb[..., 0], atol=1e-3)  # 16-bit scaled back to 0..255
    cmyk = decode(read(odd_images["cmyk.jpg"]), 3).numpy()
    assert cmyk.shape == rgb.shape and np.abs(cmyk - rgb).mean() < 12
    one = decode(read(odd_images["rgb.jpg"]), 1)
    assert one.shape[-1] == 1 and one.dtype == tf.float32


def test_dct_downscaled_crop_matches_full_decode(odd_images, tmp_path):
    big = np.asarray(Image.fromarray(odd_images["_rgb_array"]).resize((400, 400)))
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=95)
    window = tf.constant([40, 80, 320, 240])
    fast = decode_resized(read(path), 3, (64, 64), window)
    full = decode(read(path), 3)[40:360, 80:320]
    slow = tf.image.resize(full, (64, 64), antialias=True)
    assert float(tf.reduce_mean(tf.abs(fast - slow))) < 6.0


def test_check_lists_every_broken_file_with_a_reason(odd_images):
    paths = [str(p) for k, p in odd_images.items() if not k.startswith("_")]
    bad = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in check_files(paths, 3, progress=False)}
    assert set(bad) == {"truncated.jpg", "empty.jpg", "text.png"}
    assert bad["empty.jpg"] == "empty file"
    assert "jpeg" in bad["truncated.jpg"].lower()
    assert bad["text.png"].startswith("Unknown image file format") and not bad["text.png"].endswith("name:")


@pytest.mark.parametrize("name,channels", [("rgb.jpg", 3), ("png_named.jpg", 3), ("gray.png", 3),
                                           ("gray16.png", 1), ("cmyk.jpg", 3), ("rgb.jpg", 1)])
def test_decode_resized_equals_resizing_the_float_decode(odd_images, name, channels):
    # JPEGs are resized straight from uint8: the pixels must not change for it.
    data = read(odd_images[name])
    window = tf.constant([3, 5, 40, 50])
    want = tf.image.resize(decode(data, channels, window, target=(24, 20)), (24, 20))
    got = decode_resized(data, channels, (24, 20), window)
    assert got.dtype == tf.float32 and got.shape == (24, 20, channels)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)


def test_tiny_files_decode(tmp_path):
    """Files shorter than the DICOM preamble (132 bytes) still decode."""
    path = tmp_path / "one.png"
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(path)
    assert path.stat().st_size < 132
    np.testing.assert_array_equal(decode(read(path), 3).numpy(), np.full((1, 1, 3), 200.0))


# --------------------------------------------------------------------------- augment


def _batch(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((n, size // 4, size // 4, 1)) > 0.5).astype(np.int32)
    mask = np.kron(mask, np.ones((1, 4, 4, 1), np.int32))  # blocky labels 0/1
    image = np.repeat(mask * 200.0 + 20.0, 3, axis=-1).astype(np.float32)
    return image, mask


def _geo_only(**kw):
    return dataclasses.replace(OFF, **kw)


def _augment_each(image, mask, params: AugmentParams, seed=0):
    """Run augment_image on every image of a batch, eagerly."""
    table = aug.param_table([params])
    plan = aug.Plan.from_tiers([params])
    outs = [aug.augment_image({"image": tf.constant(image[i]), "mask": tf.constant(mask[i])}, table[0],
                              tf.constant([seed, i]), plan) for i in range(len(image))]
    return np.stack([o["image"].numpy() for o in outs]), np.stack([o["mask"].numpy() for o in outs])


def test_augment_eager_equals_dataset_map():
    image, mask = _batch()
    params = AugmentParams(blur_p=0.5, erase_p=0.5, elastic_p=0.5)
    table = aug.param_table([params])
    plan = aug.Plan.from_tiers([params])

    def run(sample, seed):
        return aug.augment_image(sample, table[0], seed, plan)

    elems = {"image": tf.constant(image), "mask": tf.constant(mask)}
    seeds = tf.constant([[3, i] for i in range(len(image))])
    mapped = list(tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(elems),
                                      tf.data.Dataset.from_tensor_slices(seeds)).map(run))
    for i, m in enumerate(mapped):
        eager = run({"image": tf.constant(image[i]), "mask": tf.constant(mask[i])}, seeds[i])
        for k in ("image", "mask"):
            np.testing.assert_allclose(eager[k].numpy(), m[k].numpy(), atol=1e-4)
    assert not np.allclose(np.stack([m["image"].numpy() for m in mapped]), image)  # something changed


def test_geometric_ops_move_image_and_mask_together():
    image, mask = _batch(n=8)
    p = _geo_only(hflip=0.5, vflip=0.5, affine_p=1.0, shift=0.1, scale=0.1, rotate=25.0)
    img, m = _augment_each(image, mask, p, seed=1)
    assert m.dtype == np.int32 and set(np.unique(m)) <= {0, 1}  # labels never blended
    # Where the image is clearly one label, the mask agrees (bilinear edges aside).
    img = img[..., 0]
    sure = (img < 40) | (img > 200)
    agree = ((img > 120) == (m[..., 0] == 1))[sure].mean()
    assert agree > 0.99
    assert not np.array_equal(m, mask)


def test_affine_warp_matches_numpy_reflect_and_tf_bilinear():
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 255, (20, 28, 3)).astype(np.float32)
    # Integer shifts, up to several image sizes away: exactly numpy's reflect padding (REFLECT_101).
    padded = np.pad(img, [(90, 90), (90, 90), (0, 0)], mode="reflect")
    for tx, ty in [(3, -5), (-60, 41), (85, -77)]:
        m = aug.affine_matrix(0.0, 1.0, float(tx), float(ty), 20.0, 28.0)
        got = aug._warp(tf.constant(img), m, False).numpy()
        np.testing.assert_allclose(got, padded[90 - ty : 110 - ty, 90 - tx : 118 - tx], atol=1e-3)
        mask = aug._warp(tf.constant(img[..., :1].astype(np.int32)), m, True).numpy()
        np.testing.assert_array_equal(mask, padded[90 - ty : 110 - ty, 90 - tx : 118 - tx, :1].astype(np.int32))
    # A rotation with zoom: TF's own bilinear kernel wherever the source point lies inside.
    m = aug.affine_matrix(0.3, 1.2, 1.5, -2.0, 20.0, 28.0)
    got = aug._warp(tf.constant(img), m, False).numpy()
    want = tf.raw_ops.ImageProjectiveTransformV3(
        images=img[None], transforms=m, output_shape=[20, 28], fill_value=-1.0, interpolation="BILINEAR",
        fill_mode="CONSTANT")[0].numpy()
    ys, xs = np.mgrid[0:20, 0:28]
    mm = m.numpy()[0]
    sx, sy = mm[0] * xs + mm[1] * ys + mm[2], mm[3] * xs + mm[4] * ys + mm[5]
    inside = (sx >= 0) & (sx <= 26.99) & (sy >= 0) & (sy <= 18.99)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-3)


@pytest.mark.parametrize("value", [0.0, 255.0])
def test_every_op_keeps_images_in_0_255_even_at_the_extremes(value):
    # Weighted sums (bilinear warps, blur, MixUp) overshoot 255 by an ulp unless clipped.
    img = tf.fill([64, 64, 3], value)
    p = aug.param_table([AugmentParams(affine_p=1, rotate=30, scale=0.2, shift=0.1, elastic_p=1, color_p=1,
                                       noise_p=1, blur_p=1, blur_sigma=2.0, erase_p=1)])[0]
    for op, _ in aug.OPS:
        for seed in range(4):
            out = op({"image": img}, p, aug._Rng(tf.constant([seed, 1])))["image"].numpy()
            assert 0.0 <= out.min() and out.max() <= 255.0, op.__name__
    batch = {"image": tf.fill([4, 16, 16, 3], value), "target": tf.one_hot([0, 1, 0, 1], 2)}
    for seed in range(8):
        out = mix_batch({**batch, "seed": tf.constant([seed, 0])}, 0.4, 0.0, p=1.0)["image"].numpy()
        assert 0.0 <= out.min() and out.max() <= 255.0


def test_ops_respect_their_probability():
    image, mask = _batch(n=16)
    assert aug.Plan.from_tiers([OFF]).ops == ()  # nothing can fire: nothing is built
    half = _geo_only(hflip=0.5)
    img, _ = _augment_each(image, mask, half, seed=5)
    flipped = [np.array_equal(img[i], image[i, :, ::-1]) and not np.array_equal(img[i], image[i])
               for i in range(16)]
    unchanged = [np.array_equal(img[i], image[i]) for i in range(16)]
    assert all(f or u for f, u in zip(flipped, unchanged, strict=True)) and 0 < sum(flipped) < 16


def test_color_jitter_matches_its_definition():
    """Colour is one matrix: check it against brightness, contrast and saturation done by hand."""
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (32, 28, 3)).astype(np.float32)
    p = aug.param_table([_geo_only(color_p=1.0, brightness=0.3, contrast=0.3, saturation=0.5, hue=0.0)])[0]
    out = aug.color({"image": tf.constant(img)}, p, aug._Rng(tf.constant([4, 2])))["image"].numpy()
    r = aug._Rng(tf.constant([4, 2]))
    b, c, sat = (1 + float(r.sym(0.3)), 1 + float(r.sym(0.3)), 1 + float(r.sym(0.5)))
    luma = np.array([0.299, 0.587, 0.114])
    grey = img @ luma
    saturated = grey[..., None] + sat * (img - grey[..., None])
    pivot = grey[::4, ::4].mean()  # the contrast pivot is estimated on a 4x4 grid
    assert abs(pivot - grey.mean()) < 8
    expected = np.clip(c * b * saturated + (1 - c) * b * pivot, 0, 255)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-2)
    # Grey and multispectral images: brightness and contrast only, about the mean over all bands.
    for channels in (1, 4):
        img = rng.uniform(0, 255, (32, 28, channels)).astype(np.float32)
        out = aug.color({"image": tf.constant(img)}, p, aug._Rng(tf.constant([4, 2])))["image"].numpy()
        expected = np.clip(c * b * img + (1 - c) * b * img[::4, ::4].mean(), 0, 255)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-2)


def test_noise_is_gaussian_with_its_drawn_std_and_differs_per_image():
    img = tf.fill([64, 48, 3], 128.0)
    p = aug.param_table([_geo_only(noise_p=1.0, noise_std=20.0)])[0]
    fields = []
    for i in range(8):
        out = aug.noise({"image": img}, p, aug._Rng(tf.constant([9, i])))["image"].numpy()
        r = out - 128.0
        assert abs(r.mean()) < 1.5 and 0 < r.std() <= 20.0 * 1.05
        z = (r - r.mean()) / r.std()
        assert abs((z**4).mean() - 3.0) < 0.3  # Gaussian kurtosis, not uniform (1.8)
        fields.append(z)
    for i in range(8):
        for j in range(i):
            assert abs(np.corrcoef(fields[i].ravel(), fields[j].ravel())[0, 1]) < 0.5  # not the same field
    # Traced with an unknown size (no bank to cut), the same op still adds Gaussian noise.
    fn = tf.function(lambda x: aug.noise({"image": x}, p, aug._Rng(tf.constant([9, 0])))["image"],
                     input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
    r = fn(img).numpy() - 128.0
    assert 0 < r.std() <= 21.0


def test_tiers_pick_strength_per_image():
    table = aug.param_table([TierConfig().light, TierConfig().medium, TierConfig().heavy])
    rows = tf.gather(table, [2, 0])
    assert float(aug.col(rows, "erase_p")[0]) == pytest.approx(TierConfig().heavy.erase_p)
    assert TierConfig().heavy.erase_p > 0
    assert float(aug.col(rows, "erase_p")[1]) == 0.0


# --------------------------------------------------------------------------- mix


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_label_mass_matches_pixels(mixup, cutmix):
    n = 6
    image = np.zeros((n, 16, 16, 3), np.float32)
    image[n // 2 :] = 255.0  # first half black, second half white
    target = np.eye(2, dtype=np.float32)[[0] * (n // 2) + [1] * (n - n // 2)]
    for s in range(10):
        out = mix_batch({"image": tf.constant(image), "target": tf.constant(target), "seed": tf.constant([s, 0])},
                        mixup, cutmix, p=1.0)
        t, x = out["target"].numpy(), out["image"].numpy()
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
        # The share of "white" in each mixed image equals the weight of class 1.
        np.testing.assert_allclose(x.mean(axis=(1, 2, 3)) / 255.0, t[:, 1], atol=1e-5)


def test_cutmix_moves_each_mask_pixel_with_its_image_pixel():
    # Image b is a checkerboard of values 10b and 10b + 1, so every mixed pixel names its source
    # image and square; mask b labels the same squares (b, b + 5), so the source says the label.
    n, size = 4, 16
    checker = (np.add.outer(np.arange(size), np.arange(size)) % 2)[None, :, :, None]
    src = np.arange(n)[:, None, None, None]
    image = np.broadcast_to(10.0 * src + checker, (n, size, size, 3)).astype(np.float32)
    mask = (src + 5 * checker).astype(np.int32)
    batch = {"image": tf.constant(image), "target": tf.zeros((n, 1)), "mask": tf.constant(mask)}

    def check(out):
        x, m = out["image"][..., :1].numpy(), out["mask"].numpy()
        origin = (x // 10).astype(int)
        np.testing.assert_array_equal(x % 10, checker.repeat(n, 0))  # whole pixels, never blended
        np.testing.assert_array_equal(m, np.take_along_axis(mask, origin, 0))  # the source's label there
        return (origin != src).mean()

    pasted = [check(mix_batch({**batch, "seed": tf.constant([s, 0])}, 0.0, 1.0, p=1.0)) for s in range(8)]
    assert 0.1 < np.mean(pasted) < 0.9  # CutMix did paste boxes
    ds = tf.data.Dataset.from_tensors(batch).repeat(4).enumerate()
    for out in ds.map(lambda i, b: mix_batch({**b, "seed": tf.stack([tf.cast(i, tf.int32), 1])}, 0.0, 1.0, p=1.0)):
        check(out)
    with pytest.raises(ValueError, match="augment.mix.mixup_alpha.*CutMix"):
        mix_batch({**batch, "seed": tf.constant([0, 0])}, 0.2, 1.0, p=1.0)


def test_mix_known_mask_is_anded():
    known = np.array([[1, 1], [1, 0]], np.float32)
    out = mix_batch({"image": tf.zeros((2, 8, 8, 3)), "target": tf.zeros((2, 2)), "known": tf.constant(known),
                     "seed": tf.constant([0, 0])}, 0.4, 0.0, p=1.0)
    np.testing.assert_array_equal(out["known"].numpy(), [[1, 0], [1, 0]])


# --------------------------------------------------------------------------- pipeline


def _samples(odd_images, repeat=4):
    names = ["rgb.jpg", "png_named.jpg", "gray.png", "cmyk.jpg", "gray16.png"]
    paths = np.array([str(odd_images[n]) for n in names] * repeat)
    targets = np.eye(3, dtype=np.float32)[np.arange(len(paths)) % 3]
    return Samples(paths, targets)


def test_training_batches_have_the_promised_shape_dtype_and_range(odd_images):
    spec = PipelineSpec(image_size=(40, 48), channels=3, batch_size=6, tiers=[AugmentParams(erase_p=0.5)],
                        mixup_alpha=0.2, cutmix_alpha=1.0, mix_p=0.5)
    ds = build_dataset(_samples(odd_images), spec, training=True, repeat=True)
    for x, y in ds.take(5):
        assert x.shape == (6, 40, 48, 3) and x.dtype == tf.float32
        assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 255.0
        np.testing.assert_allclose(y.numpy().sum(1), 1.0, atol=1e-6)


def test_eval_pipeline_keeps_order_and_every_sample(odd_images):
    s = _samples(odd_images, repeat=1)
    spec = PipelineSpec(image_size=(32, 32), channels=3, batch_size=2, tiers=[OFF])
    ys = np.concatenate([y.numpy() for _, y in build_dataset(s, spec, training=False)])
    np.testing.assert_array_equal(ys, s.targets)


def test_unchecked_corrupt_file_is_skipped_not_blanked(odd_images):
    paths = np.array([str(odd_images["rgb.jpg"]), str(odd_images["truncated.jpg"]), str(odd_images["gray.png"])])
    s = Samples(paths, np.eye(3, dtype=np.float32))
    spec = PipelineSpec(image_size=(32, 32), channels=3, batch_size=8, tiers=[OFF])
    x, y = next(iter(build_dataset(s, spec, training=False)))
    assert x.shape[0] == 2
    np.testing.assert_array_equal(y.numpy(), np.eye(3)[[0, 2]])
    assert float(tf.reduce_min(tf.reduce_max(x, axis=[1, 2, 3]))) > 0  # no black stand-in


def test_checked_training_drops_the_batch_of_a_file_that_broke_after_its_check(odd_images):
    # The fused map+batch path (files checked before training) guards whole batches.
    good = [str(odd_images["rgb.jpg"]), str(odd_images["gray.png"])]
    paths = np.array(good * 4 + [str(odd_images["truncated.jpg"])] + good * 4)
    s = Samples(paths, np.zeros((len(paths), 2), np.float32) + [[1, 0]])
    s.targets[8] = [0, 1]  # the broken file's label: must never reach a batch
    spec = PipelineSpec(image_size=(24, 24), channels=3, batch_size=3, tiers=[OFF], checked=True,
                        shuffle_buffer=1, deterministic=True)
    batches = list(build_dataset(s, spec, training=True))
    assert len(batches) == 17 // 3 - 1  # 5 full batches, the one holding the broken file skipped
    for x, y in batches:
        assert y.numpy()[:, 1].sum() == 0
        assert float(tf.reduce_min(tf.reduce_max(x, axis=[1, 2, 3]))) > 0  # no blank image


def test_sample_weights_flow_through(odd_images):
    s = _samples(odd_images, repeat=1)
    s.weights = np.arange(len(s), dtype=np.float32)
    spec = PipelineSpec(image_size=(16, 16), channels=3, batch_size=5, tiers=[OFF])
    _, _, w = next(iter(build_dataset(s, spec, training=False)))
    np.testing.assert_array_equal(w.numpy(), np.arange(5))


def test_crop_window_stays_inside_the_image(odd_images):
    table = aug.param_table([AugmentParams(crop_scale=[0.1, 1.0], crop_ratio=[0.5, 2.0])])
    data = read(odd_images["rgb.jpg"])
    for s in range(30):
        y, x, h, w = crop_window(data, table[0], tf.constant([s, 1])).numpy()
        assert 0 <= y and 0 <= x and h >= 1 and w >= 1 and y + h <= 64 and x + w <= 64


def test_spec_from_config_uses_tiers_when_enabled():
    cfg = Config.__new__(Config)  # only the fields PipelineSpec reads
    from tfvision.config import AugmentConfig, DataConfig, TrainConfig

    cfg.data = DataConfig(source="csv", root=".", csv="x.csv", image_size=[20, 30])
    cfg.augment = AugmentConfig(tiers=TierConfig(enabled=True))
    cfg.train = TrainConfig(batch_size=3)
    cfg.seed = 0
    spec = PipelineSpec.from_config(cfg)
    assert spec.image_size == (20, 30) and len(spec.tiers) == 3 and spec.batch_size == 3


def test_masks_travel_with_their_images_through_the_pipeline(tmp_path):
    """Segmentation-ready: a label PNG is cropped, resized and augmented with its image."""
    rng = np.random.default_rng(0)
    paths, masks = [], []
    for i in range(6):
        labels = np.kron(rng.integers(0, 3, (8, 8)), np.ones((8, 8), np.int64)).astype(np.uint8)  # 64x64
        image = np.repeat((labels * 100 + 20)[..., None], 3, axis=-1).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
        Image.fromarray(labels).save(tmp_path / f"mask{i}.png")
        paths.append(str(tmp_path / f"img{i}.png"))
        masks.append(str(tmp_path / f"mask{i}.png"))
    s = Samples(np.array(paths), np.zeros((6, 1), np.float32), mask_paths=np.array(masks))
    p = dataclasses.replace(OFF, crop_scale=[0.3, 1.0], hflip=0.5, affine_p=1.0, rotate=20.0, shift=0.1)
    spec = PipelineSpec(image_size=(32, 32), channels=3, batch_size=6, tiers=[p])
    ds = build_dataset(s, spec, training=True, format_batch=lambda b: (b["image"], b["mask"]))
    x, m = next(iter(ds))
    assert m.dtype == tf.int32 and m.shape == (6, 32, 32, 1)
    assert set(np.unique(m.numpy())) <= {0, 1, 2}
    img = x.numpy()[..., 0]
    level = np.round((img - 20) / 100)
    sure = np.abs(img - (level * 100 + 20)) < 3  # pixels away from blended (bilinear) edges
    assert sure.mean() > 0.4
    agree = (level == m.numpy()[..., 0])[sure].mean()
    assert agree > 0.98


def test_elastic_moves_image_and_mask_together_and_keeps_labels():
    image, mask = _batch(n=6)
    img, m = _augment_each(image, mask, _geo_only(elastic_p=1.0, elastic_alpha=3.0), seed=9)
    assert set(np.unique(m)) <= {0, 1} and not np.array_equal(m, mask)
    img = img[..., 0]
    sure = (img < 40) | (img > 200)
    assert ((img > 120) == (m[..., 0] == 1))[sure].mean() > 0.99


def test_dicom_files_feed_the_image_pipeline():
    """DICOM (X-ray / CT) goes through the same decode: modality LUT, then its VOI window."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "CT_small.dcm"):
        path = get_testdata_file(name, download=False)
        ds = dcmread(path)
        hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        if "WindowCenter" in ds:  # the file's own VOI window
            lo = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
            hi = lo + float(ds.WindowWidth)
        else:  # no window: robust percentile range
            lo, hi = np.percentile(hu, [0.5, 99.5])
        expected = np.clip((hu - lo) / (hi - lo), 0, 1) * 255
        got = decode(read(path), 1).numpy()[..., 0]
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert decode(read(path), 3).numpy().shape == hu.shape + (3,)
        assert check_files([path], 3, progress=False) == []


def test_dicom_is_decoded_once_per_sample(monkeypatch):
    """The crop window's size comes from the header: pydicom decodes the pixels once, not twice."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from tfvision.data import decode as D

    calls = []
    real = D.dicom_display
    monkeypatch.setattr(D, "dicom_display", lambda b: calls.append(1) or real(b))
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name, download=False)
        calls.clear()
        img = D.decode(read(path), 1)  # window drawn from image_shape, then the decode
        assert len(calls) == 1
        ds = dcmread(path)
        assert D.image_shape(read(path)).numpy().tolist() == [ds.Rows, ds.Columns] == list(img.shape[:2])
        assert len(calls) == 1  # the shape alone decodes nothing


def test_albumentations_bridge_runs_a_ported_compose(odd_images, tmp_path):
    import albumentations as A

    spec_dict = A.to_dict(A.Compose([A.HorizontalFlip(p=1.0)]))
    s = _samples(odd_images, repeat=1)
    base = PipelineSpec(image_size=(32, 32), channels=3, batch_size=5, tiers=[OFF])
    plain = next(iter(build_dataset(s, base, training=False)))[0].numpy()
    bridged = PipelineSpec(image_size=(32, 32), channels=3, batch_size=5, tiers=[OFF], albumentations=spec_dict,
                           deterministic=True, shuffle_buffer=1)
    x = next(iter(build_dataset(s, bridged, training=True)))[0].numpy()
    # Same images (shuffle buffer 1 keeps order), flipped by albumentations on uint8 pixels.
    np.testing.assert_allclose(x, np.round(plain[:, :, ::-1]), atol=1.0)


@pytest.mark.parametrize("checked", [False, True])
def test_deterministic_switch_reproduces_batches(odd_images, checked):
    s = _samples(odd_images, repeat=3)
    spec = PipelineSpec(image_size=(24, 24), channels=3, batch_size=4, tiers=[AugmentParams(erase_p=0.5)],
                        mixup_alpha=0.3, mix_p=0.5, deterministic=True, seed=11, checked=checked)
    a = [x.numpy() for x, _ in build_dataset(s, spec, training=True).take(3)]
    b = [x.numpy() for x, _ in build_dataset(s, spec, training=True).take(3)]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_dataset_normalization_statistics_match_numpy(odd_images):
    from tfvision.data.pipeline import channel_stats

    s = _samples(odd_images, repeat=1)
    spec = PipelineSpec(image_size=(16, 16), channels=3, batch_size=2, tiers=[OFF])
    images = np.concatenate([x.numpy() for x, _ in build_dataset(s, spec, training=False)])
    mean, std = channel_stats(s, spec)
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, images.reshape(-1, 3).std(0), rtol=1e-4)


def test_per_iterator_starts_every_iterator_at_the_same_first_pass():
    """Keras on JAX peeks at a batch through an iterator of its own before `fit`; how far that
    one reads ahead must not change the order `fit` sees (tests/test_jax_backend.py)."""
    def passes():
        return tf.data.Dataset.range(8).shuffle(8, seed=0, reshuffle_each_iteration=True).repeat()

    def read(ds, n):
        it = iter(ds.batch(8))
        return [next(it).numpy().tolist() for _ in range(n)]

    fresh = per_iterator(passes)
    first = read(fresh, 3)  # three passes: a peek whose prefetch ran ahead
    assert read(fresh, 3) == first and first[0] != first[1]  # and each pass reshuffles
    shared = passes()  # the shuffle's seed generator is shared by the dataset's iterators
    assert read(shared, 3) == first and read(shared, 1)[0] != first[0]
