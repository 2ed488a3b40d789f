"""Accelerator-side augmentation (``augment.placement: "accelerator"``): the host's ops on whole
batches, inside the train step.

With this placement tf.data only reads, decodes, crops (the random-resized-crop
window is part of decoding), resizes and batches uint8 images, and yields the
batch dict (``image``, ``target``, ``tier``, and ``known``, ``weight``, ``mask``
where the task has them). `install` wraps the model's train step so that each
batch is augmented, mixed and formatted (the task's ``format_batch``) on the
model's device, under its distribution strategy, before the step proper:

- the same ops, parameter table and tiers as on the host (`augment.OPS`,
  `param_table`, `Plan.from_tiers`; the ops are written once for batches):
  each sample gathers its own tier's row, and ops no tier fires are not built;
- each op runs on the whole batch and `tf.where` keeps it on the samples whose
  coin came up: static shapes and no per-image `tf.cond`, so the graph also runs
  on a TPU;
- masks take their images' geometric draws (nearest-neighbour); MixUp/CutMix is
  `mix.mix_batch` itself, per replica batch;
- the math is float32 under any mixed-precision policy, with one cast at the end
  to the dtype the model's input takes;
- random streams are stateless, seeded by (run seed, phase, optimizer step,
  replica): a run is reproducible (a resumed one too, as the step is restored),
  and replicas draw different augmentations.

The wrapper is an attribute of the model object, not a layer: nothing of it
enters a ``.keras`` file, a SavedModel or the inference graph.

>>> install(model, PipelineSpec.from_config(cfg), task.format_batch, phase=0)
>>> model.fit(train_ds)  # train_ds from build_dataset(..., spec) with placement "accelerator"
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tfvision.config import AugmentParams
from tfvision.data import augment as aug
from tfvision.data.mix import mix_batch
from tfvision.data.pipeline import default_format

# Fold-in tags: keep the per-step stream apart from any other use of the run seed.
_STREAM = 0x5EED


@dataclasses.dataclass(frozen=True)
class BatchAugment:
    """What to do to a training batch: tiers and MixUp/CutMix settings (see `AugmentConfig`)."""

    tiers: tuple[AugmentParams, ...]
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_p: float = 0.0
    seed: int = 0
    dtype: str = "float32"  # the model's input dtype: the one cast, at the end

    @classmethod
    def from_spec(cls, spec, phase: int = 0, dtype: str = "float32") -> BatchAugment:
        """From a `PipelineSpec`; `phase` gives each training phase its own streams."""
        return cls(tuple(spec.tiers), spec.mixup_alpha, spec.cutmix_alpha, spec.mix_p,
                   seed=spec.seed * 1009 + phase, dtype=dtype)

    def __call__(self, batch: dict, seed: tf.Tensor) -> dict:
        """Augment and mix one (replica's) batch dict; returns it with a float image.

        Args:
            batch: ``image`` [B,H,W,C] (uint8 or float, 0..255), ``tier`` [B] int,
                ``target``, and optionally ``mask`` [B,H,W,1] int, ``known``, ``weight``.
            seed: [2] int32, e.g. `step_seed`.
        """
        return augment_batch(batch, aug.param_table(list(self.tiers)), aug.Plan.from_tiers(list(self.tiers)),
                             seed, self)


def augment_batch(batch: dict, table: tf.Tensor, plan: aug.Plan, seed: tf.Tensor, mix: BatchAugment) -> dict:
    """The planned ops on every sample of `batch` with its tier's parameters, then MixUp/CutMix.

    Each op draws a coin per sample from the op's gate column; the op's own stream
    (`augment._Rng`) gives each sample its magnitudes, as on the host.
    """
    rng = aug._Rng(seed)
    s = {"image": tf.cast(batch["image"], tf.float32)}
    if "mask" in batch:
        s["mask"] = batch["mask"]
    params = tf.gather(table, tf.cast(batch["tier"], tf.int32))
    for op, gate in plan.ops:
        fire = tf.reshape(rng.uniform([aug._n(params)]) < aug.col(params, gate), [-1, 1, 1, 1])
        out = op(s, params, aug._Rng(rng.next_seed()))
        s = {k: tf.where(fire, out[k], v) for k, v in s.items()}
    out = {**batch, **s}
    if mix.mix_p > 0:
        out = mix_batch({**out, "seed": rng.next_seed()}, mix.mixup_alpha, mix.cutmix_alpha, mix.mix_p)
        del out["seed"]
    out["image"] = tf.cast(out["image"], mix.dtype)
    return out


def step_seed(seed: int, step, replica) -> tf.Tensor:
    """[2] int32 stateless seed for one optimizer step on one replica."""
    base = tf.random.experimental.stateless_fold_in(tf.constant([seed, _STREAM], tf.int32), tf.cast(step, tf.int32))
    return tf.random.experimental.stateless_fold_in(base, tf.cast(replica, tf.int32))


def batch_augmented(train_step, augment: BatchAugment, format_batch=None, step_counter=None):
    """Wrap a bound `train_step` so that each batch dict is augmented, mixed and formatted first.

    Args:
        train_step: the model's own step, taking ``(x, y[, w])``.
        augment: what to apply.
        format_batch: the task's batch dict -> ``(x, y[, w])`` hook; default image, target[, weight].
        step_counter: returns the step variable that seeds each step (the optimizer's
            ``iterations``); read when the train function is traced.

    Returns:
        A step taking the batch dict.
    """
    fmt = format_batch or default_format

    def step(batch):
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0
        counter = step_counter() if step_counter is not None else 0
        return train_step(fmt(augment(batch, step_seed(augment.seed, counter, replica))))

    return step


def install(model, spec, format_batch=None, phase: int = 0) -> None:
    """Augment every training batch of `model` on its device; call after `compile`.

    Wraps the class's own `train_step` (never an earlier wrapper, so a phase re-installs
    cleanly), seeded by the compiled optimizer's step counter. Functional models and
    models with their own step (Mask R-CNN) alike: only the batch changes.

    Args:
        model: a compiled Keras model.
        spec: the phase's `PipelineSpec` (tiers, MixUp/CutMix, seed).
        format_batch: the task's batch dict -> ``(x, y[, w])`` hook (None: image, target[, weight]).
        phase: the training phase, so that each phase draws its own streams.
    """
    dtype = model.inputs[0].dtype if getattr(model, "inputs", None) else "float32"
    augment = BatchAugment.from_spec(spec, phase, dtype)
    fmt = format_batch or default_format
    base = type(model).train_step.__get__(model)
    model.train_step = batch_augmented(base, augment, fmt, lambda: model.optimizer.iterations)
    build = type(model)._symbolic_build.__get__(model)

    def symbolic_build(iterator=None, data_batch=None):
        # Keras 3.15 builds metrics and losses from a first batch (or, distributed, from the
        # dataset's element spec: distribute.Runtime.adapt), read as (x, y, w): the raw batch
        # dict would be taken for x alone. Build from the formatted batch the step will see.
        if isinstance(data_batch, dict) and "tier" in data_batch:
            specs = tf.nest.map_structure(lambda v: tf.TensorSpec(v.shape, v.dtype), data_batch)
            traced = tf.function(lambda b: fmt(augment(b, tf.zeros([2], tf.int32))))
            data_batch = traced.get_concrete_function(specs).structured_outputs
        return build(iterator=iterator, data_batch=data_batch)

    model._symbolic_build = symbolic_build
