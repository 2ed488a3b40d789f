"""Optimizers with differential learning rates (backbone lower than head).

Keras 3 has no per-variable learning rate. Scaling gradients does not work for
Adam-type optimizers (they are scale-invariant), so the multiplier is applied
to the learning rate inside `update_step`, which every Keras 3 optimizer
routes each variable through (also under MirroredStrategy, where the variable
may be a per-replica component: lookup goes through `_get_variable_index`).
"""

from __future__ import annotations

import keras


class _LrMultipliers:
    """Mixin for a Keras optimizer: per-variable learning-rate multipliers.

    Multipliers are keyed by variable identity at construction, so they are
    not part of `get_config`: a reloaded optimizer trains every variable at
    the base rate (only a concern when fine-tuning from a saved .keras file).
    """

    def __init__(self, *args, lr_multipliers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._mult_by_id = dict(lr_multipliers or {})
        self._mults = []

    def build(self, variables):
        super().build(variables)
        self._mults = [self.lr_multiplier(v) for v in variables]

    def lr_multiplier(self, variable) -> float:
        """The factor on the learning rate `variable` trains at."""
        return self._mult_by_id.get(id(variable), 1.0)

    def update_step(self, gradient, variable, learning_rate):
        m = self._mults[self._get_variable_index(variable)] if self._mults else 1.0
        lr = learning_rate * m if m != 1.0 else learning_rate
        if self.weight_decay is not None and self._use_weight_decay(variable):
            # Decoupled decay at the variable's own rate (see _apply_weight_decay).
            wd = keras.ops.cast(self.weight_decay, variable.dtype)
            variable.assign(variable - variable * wd * keras.ops.cast(lr, variable.dtype))
        return super().update_step(gradient, variable, lr)

    def _apply_weight_decay(self, variables):
        # Done per variable in update_step instead, where its multiplier is known;
        # update_step runs inside the strategy's per-replica update, so this
        # stays correct under MirroredStrategy.
        return


@keras.saving.register_keras_serializable(package="tfvision")
class ScaledAdam(_LrMultipliers, keras.optimizers.Adam):
    pass


@keras.saving.register_keras_serializable(package="tfvision")
class ScaledAdamW(_LrMultipliers, keras.optimizers.AdamW):
    pass


@keras.saving.register_keras_serializable(package="tfvision")
class ScaledSGD(_LrMultipliers, keras.optimizers.SGD):
    pass


_CLASSES = {"adam": ScaledAdam, "adamw": ScaledAdamW, "sgd": ScaledSGD}


def build_optimizer(cfg, learning_rate, backbone_variables=(), backbone_mult: float = 1.0):
    """Optimizer from an OptimizerConfig; backbone variables train at lr * backbone_mult."""
    kwargs = {"learning_rate": learning_rate}
    if cfg.name == "adamw":
        kwargs["weight_decay"] = cfg.weight_decay
    if cfg.name == "sgd":
        kwargs["momentum"] = cfg.momentum
        kwargs["nesterov"] = True
    if cfg.clipnorm:
        kwargs["clipnorm"] = cfg.clipnorm
    mults = {id(v): backbone_mult for v in backbone_variables} if backbone_mult != 1.0 else {}
    return _CLASSES[cfg.name](lr_multipliers=mults, **kwargs)
