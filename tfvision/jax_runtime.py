"""``train.strategy: "jax"``: Keras on the JAX backend over all devices, fed by tf.data.

The Kaggle TPU route (issue 16): Kaggle's TPU image has no TensorFlow TPU runtime, but it has
JAX. `JaxRuntime` is the `tfvision.distribute.Runtime` interface for `keras.distribution`:

- `keras.distribution.DataParallel` over every device (`keras.distribution.list_devices()`):
  the variables are replicated, each global batch is split along its first axis, and the
  gradients are averaged by XLA's collectives.
- ``train.batch_size`` is per device, as with every strategy: tf.data batches at
  ``batch_size x devices`` and the learning rate is scaled by the device count
  (`tfvision.distribute`'s linear rule), so one device trains exactly as configured.
- Every batch during `fit` is full (a batch is split evenly over the devices): training batches
  already are, and validation during `fit` runs on full batches of the repeated validation set,
  as the tf.distribute strategies do. metrics.json still scores every validation image once.
- The strategy is TensorFlow's default one (a no-op scope): Keras places the variables itself.

>>> runtime = jax_runtime(cfg)  # after select_backend("jax")
>>> train, val, steps, val_steps = runtime.fit_data(inputs, spec, task.format_batch, None)
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfvision.errors import ConfigError


def make_distribution(devices: list[str]) -> keras.distribution.Distribution:
    """The `keras.distribution` layout for training: data parallel over `devices`.

    The place for `keras.distribution.ModelParallel` (a `DeviceMesh` with a "model" axis and a
    `LayoutMap` of variable paths) once a model no longer fits one device's memory.
    """
    return keras.distribution.DataParallel(devices=devices)


@dataclasses.dataclass
class JaxRuntime:
    """What training must know about a `keras.distribution` run (see the module docstring)."""

    distribution: keras.distribution.Distribution
    devices: int
    name: str = "jax"
    strategy: tf.distribute.Strategy = dataclasses.field(default_factory=tf.distribute.get_strategy)
    worker: int = 0  # one process (see jax_runtime)
    workers: int = 1
    steps_per_execution: int = 1
    policy: str = "float32"
    element_spec: object = None

    @property
    def is_chief(self) -> bool:
        return self.worker == 0

    @property
    def replicas(self) -> int:
        return self.devices

    @property
    def distributed(self) -> bool:
        return self.devices > 1

    def global_batch(self, per_replica: int) -> int:
        return per_replica * self.replicas

    def scale_lr(self, lr: float) -> float:
        """The linear scaling rule: `lr` is the rate for one device's batch."""
        return lr * self.replicas

    def fit_data(self, inputs, spec, format_batch, steps_per_epoch: int | None):
        """(train, val, steps, val_steps) for `model.fit`: one tf.data pipeline at the global batch."""
        from tfvision.data.pipeline import steps_for

        batch = self.global_batch(spec.batch_size)
        spec = dataclasses.replace(spec, batch_size=batch)
        n_train, n_val = inputs.sizes["train"], inputs.sizes["val"]
        train = inputs.dataset("train", spec, training=True, repeat=True, format_batch=format_batch)
        self.element_spec = train.element_spec
        if not self.distributed:  # one device takes a last partial batch
            val = inputs.dataset("val", spec, training=False, format_batch=format_batch)
            return train, val, steps_per_epoch or steps_for(n_train, batch, True), steps_for(n_val, batch, False)
        val = inputs.dataset("val", spec, training=False, repeat=True, format_batch=format_batch)
        val = val.rebatch(batch, drop_remainder=True)
        return train, val, steps_per_epoch or steps_for(n_train, batch, True), max(1, n_val // batch)

    def execution_steps(self, steps: int) -> int:
        """The largest divisor of `steps` up to ``steps_per_execution`` (see `tfvision.distribute`)."""
        return max(d for d in range(1, min(self.steps_per_execution, steps) + 1) if steps % d == 0)

    def adapt(self, model: keras.Model) -> None:
        """Nothing to adapt: Keras's JAX trainer shards each batch by the distribution."""


def jax_runtime(cfg) -> JaxRuntime:
    """Set `keras.distribution` over all devices and return the runtime.

    Raises:
        ConfigError: Keras is not on the JAX backend, or the config uses what the JAX backend
            cannot run (the tf.data-side ``augment.placement: "accelerator"`` step).
    """
    if keras.backend.backend() != "jax":
        from tfvision.backend import select_backend

        select_backend("jax")  # raises: Keras is imported with another backend
    if cfg.augment.placement == "accelerator":
        raise ConfigError("augment.placement: 'accelerator' augments inside a TensorFlow train step "
                          "(tfvision.data.batch_augment), which the JAX backend does not run; use 'host' "
                          "with train.strategy 'jax'")
    import jax

    if jax.process_count() > 1:
        raise ConfigError("train.strategy 'jax': several JAX processes (a multi-host pod slice) need each "
                          "host to feed its own share of every batch, which tfvision does not do yet; "
                          "train on one host (a TPU v5e-8 VM is one)")
    devices = keras.distribution.list_devices()
    distribution = make_distribution(devices)
    keras.distribution.set_distribution(distribution)
    return JaxRuntime(distribution, devices=len(devices))
