"""Training callbacks that Keras does not provide in the form we need."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import keras

from tfvision.fileio import atomic_path, read_json, write_json

# The score of best.keras travels inside it, as one more entry of its zip (Keras 3.15 reads
# only its own entries), so one rename replaces the checkpoint and its score together. Two
# files renamed one after the other can always be split by a kill: best.json, the readable
# copy, is rewritten from the checkpoint when that happened.
BEST_RECORD = "tfvision_best.json"


def checkpoint_record(path) -> dict | None:
    """The ``{"monitor", "value", "epoch"}`` stored in a best checkpoint, or None."""
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(BEST_RECORD))
    except (OSError, KeyError, zipfile.BadZipFile):
        return None


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save ``last.keras`` every epoch and ``best.keras`` when `monitor` improves.

    Unlike `ModelCheckpoint` it writes through a temporary file (a kill never
    leaves a half-written checkpoint under the final name) and remembers the
    best value (inside ``best.keras``, copied to ``best.json``), so a resumed run
    does not overwrite a better checkpoint with a worse one.
    """

    def __init__(self, directory, monitor: str = "val_loss", mode: str = "auto"):
        super().__init__()
        self.dir = Path(directory)
        self.monitor = monitor
        self.mode = mode if mode != "auto" else ("max" if _higher_is_better(monitor) else "min")
        self.best = self._restore()

    def _restore(self):
        """The best value so far, read from best.keras; best.json is brought back in line."""
        best, state = self.dir / "best.keras", self.dir / "best.json"
        if not best.exists():
            return None
        record = checkpoint_record(best)
        if record is None:  # written before the score went inside: best.json is all there is
            return read_json(state)["value"] if state.exists() else None
        if not state.exists() or read_json(state) != record:
            write_json(state, record)  # a kill fell between the checkpoint and its copy
        return record["value"]

    def _improved(self, value) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        last = self.dir / "last.keras"
        save(self.model, last)
        value = logs.get(self.monitor)
        value = float(value) if value is not None else None
        if self._improved(value):
            self.best = value
            record = {"monitor": self.monitor, "value": value, "epoch": epoch + 1}
            # best.keras is this epoch's last.keras plus the record: a file copy, not a second
            # serialization (EfficientNetV2-B0 with AdamW: 72 MB, 1.0-1.3 s to save, 0.02-0.07 s to
            # copy; issue 17, benchmarks/README.md).
            with atomic_path(self.dir / "best.keras", suffix=".keras") as tmp:
                shutil.copyfile(last, tmp)
                _add_record(tmp, record)
            write_json(self.dir / "best.json", record)


class _Resumable:
    """Mixin for Keras callbacks whose counters must survive a killed run.

    Keras keeps `wait`, `best` and the like in memory only, so a run resumed by
    `BackupAndRestore` started its patience from zero again. The `STATE` attributes go to
    `state_path` every epoch, come back at the start of the resumed `fit`, and the file
    is removed when the phase ends.
    """

    STATE: tuple[str, ...] = ()

    def __init__(self, state_path, **kwargs):
        super().__init__(**kwargs)
        self.state_path = Path(state_path)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.state_path.exists():
            for name, value in read_json(self.state_path)["state"].items():
                setattr(self, name, value)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        state = {n: _plain(getattr(self, n)) for n in self.STATE}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.state_path, {"monitor": self.monitor, "epoch": epoch + 1, "state": state})

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.state_path.unlink(missing_ok=True)


def _plain(value):
    # JSON-ready: counters stay ints, metric values (NumPy or tensor scalars) become floats.
    return value if value is None or isinstance(value, int) else float(value)


class ResumableEarlyStopping(_Resumable, keras.callbacks.EarlyStopping):
    STATE = ("wait", "best", "best_epoch")


class ResumablePlateau(_Resumable, keras.callbacks.ReduceLROnPlateau):
    """The learning rate itself comes back with the optimizer, from `BackupAndRestore`."""

    STATE = ("wait", "best", "cooldown_counter")


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the learning rate each parameter group trains at to the epoch logs
    (history.csv, the progress line, TensorBoard, training_curves.png).

    ``lr`` is the base rate (the head's). Each entry of `groups` adds a column for
    the variables it lists: the base rate times the multiplier the optimizer
    applies to them, or 0.0 while none of them is trainable (a frozen backbone).
    A group keeps its column in every phase, so history.csv keeps one header.

    >>> LearningRateLogger({"lr_backbone": backbone.trainable_variables})

    Args:
        groups: column name -> the group's trainable variables in this phase.
    """

    def __init__(self, groups: dict[str, list] | None = None):
        super().__init__()
        self.groups = dict(groups or {})

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        opt = self.model.optimizer
        # Under mixed precision Keras wraps the optimizer in a LossScaleOptimizer whose own rate
        # is a placeholder 0.0 (Keras 3.15: every epoch logged lr 0.0); the inner one applies it.
        opt = getattr(opt, "inner_optimizer", opt)
        lr = float(keras.ops.convert_to_numpy(opt._get_current_learning_rate()))
        logs["lr"] = lr
        mult = getattr(opt, "lr_multiplier", lambda v: 1.0)  # 1 for a plain Keras optimizer
        for name, variables in self.groups.items():
            logs[name] = lr * mult(variables[0]) if variables else 0.0


def save(model: keras.Model, path, record: dict | None = None) -> None:
    """`model.save` through a temporary file, with `record` stored inside (see BEST_RECORD)."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
        if record is not None:
            _add_record(tmp, record)


def _add_record(archive, record: dict) -> None:
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr(BEST_RECORD, json.dumps(record))


def save_weights(model: keras.Model, path) -> None:
    with atomic_path(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)


def _higher_is_better(metric: str) -> bool:
    name = metric.removeprefix("val_")
    return not any(k in name for k in ("loss", "error", "mse", "mae"))


def monitor_mode(metric: str) -> str:
    return "max" if _higher_is_better(metric) else "min"

