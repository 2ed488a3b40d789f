"""Per-step learning-rate schedules. Keras has no OneCycle; this one follows
Smith & Topin (and PyTorch's OneCycleLR with cosine annealing).

>>> lr = OneCycle(max_lr=1e-3, total_steps=100)
>>> float(lr(0)) < float(lr(30)) > float(lr(99))
True
"""

from __future__ import annotations

import math

import keras
from keras import ops


def _cos_anneal(start, end, frac):
    return end + (start - end) * 0.5 * (1.0 + ops.cos(math.pi * frac))


@keras.saving.register_keras_serializable(package="tfvision")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Rise from max_lr/div_factor to max_lr over pct_start of the steps, then fall
    to max_lr/(div_factor*final_div_factor), both with cosine curves."""

    def __init__(self, max_lr, total_steps, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        start = self.max_lr / self.div_factor
        end = start / self.final_div_factor
        up = max(1.0, self.pct_start * self.total_steps - 1.0)
        down = max(1.0, self.total_steps - 1.0 - up)
        rising = _cos_anneal(start, self.max_lr, ops.clip(step / up, 0.0, 1.0))
        falling = _cos_anneal(self.max_lr, end, ops.clip((step - up) / down, 0.0, 1.0))
        return ops.where(step <= up, rising, falling)

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor}


@keras.saving.register_keras_serializable(package="tfvision")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `total_steps`.

    Not ``keras.optimizers.schedules.CosineDecay(warmup_target=lr, ...)``: the decay
    is the same, but Keras's warmup starts at ``initial_learning_rate`` on step 0 and
    reaches the target one step later than this one (``lr * (step + 1) / warmup``),
    so swapping it in would change every warmup step. Checkpoints also store this
    class by its registered name (``tfvision>WarmupCosine``) in their compile config.
    """

    def __init__(self, lr, total_steps, warmup_steps=0, min_lr=0.0):
        self.lr = float(lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = float(max(self.warmup_steps, 1))
        decay = float(max(self.total_steps - self.warmup_steps, 1))
        warmup = self.lr * ops.minimum(1.0, (step + 1.0) / warm)
        cosine = _cos_anneal(self.lr, self.min_lr, ops.clip((step - self.warmup_steps) / decay, 0.0, 1.0))
        return ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {"lr": self.lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr": self.min_lr}


def build_schedule(cfg, lr: float, total_steps: int, steps_per_epoch: int):
    """Schedule (or constant float) for one training phase from a ScheduleConfig."""
    if cfg.name == "onecycle":
        return OneCycle(lr, total_steps, cfg.pct_start, cfg.div_factor, cfg.final_div_factor)
    if cfg.name == "cosine":
        return WarmupCosine(lr, total_steps, int(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr)
    return lr  # constant, and plateau (ReduceLROnPlateau needs a plain variable)
