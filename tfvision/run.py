"""The run folder: one directory holds everything a training run made.

    config.json         resolved config (the run's single source of truth)
    run.json            inference contract: task, classes, size, channels, normalisation
    data_report.json    counts per split and class, rejected files with reasons
    splits/{train,val,test}.csv
    history.csv  training_curves.png  metrics.json
    checkpoints/{best,last}.keras  best.json  phase<i>.weights.h5
    backup/phase<i>/    BackupAndRestore state while a phase is running
    progress.json       phases finished so far
    tensorboard/

A run folder that already holds a config resumes instead of starting over; any other
folder that holds files is refused, so a run never mixes its files with the user's.

The run folder may be a URL (``gs://``): the run then writes a local working copy, which
`working_copy` mirrors to it after every epoch and at the end, and pulls back to resume.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pandas as pd

from tfvision import remote
from tfvision.config import Config
from tfvision.config_loader import config_from_dict
from tfvision.errors import ConfigError, UserError
from tfvision.fileio import ours_or_absent, process_dir, read_json, user_cache_dir, write_json
from tfvision.tasks import task_names

log = logging.getLogger("tfvision.train")


def new_run_dir(cfg: Config, output_dir: str | None) -> Path | str:
    """The run folder: `output_dir` (a URL stays a string), else a new one under ``runs/``."""
    if output_dir:
        return output_dir if remote.is_url(output_dir) else Path(output_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def open_run(run_dir: Path, cfg: Config) -> bool:
    """Create `run_dir` or check it belongs to `cfg`. Returns True when resuming."""
    if _same_config(run_dir, cfg):
        return True
    _claim(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", _plain(cfg))
    return False


def _plain(cfg: Config) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))


def _same_config(run_dir: Path | str, cfg: Config) -> bool:
    """True when `run_dir` is a run of `cfg`; False when it has no config.json (not a run yet).

    Raises:
        ConfigError: it is a run of another config.
    """
    saved = remote.join(run_dir, "config.json")
    if not remote.isfile(saved):
        return False
    changed = _diff(read_json(saved), _plain(cfg))
    if changed:
        raise ConfigError(
            f"{run_dir}: this run folder was started with a different config "
            f"(differs at {', '.join(changed[:5])}); use another --output-dir, or --resume {run_dir}"
        )
    return True


def _claim(run_dir) -> None:
    """Refuse a folder that holds files but is not a run folder: it is the user's."""
    if not ours_or_absent(run_dir, "config.json"):
        raise ConfigError(f"--output-dir: {run_dir} holds files but is not a run folder (no config.json); "
                          f"give a new or empty folder, or a run folder to resume")


@contextmanager
def working_copy(run_dir: Path | str, cfg: Config, writes: bool = True):
    """Yield ``(folder, sync)``: the local folder a run writes, and the call that publishes it.

    A local `run_dir` is its own working copy (`sync` does nothing). For a URL, Keras and
    h5py cannot write an object store in place (they append and seek), so the run writes a
    scratch copy in the user cache, pulled from `run_dir` first (a resumed run continues
    from what was published) and mirrored to it by `sync` (`remote.Mirror`): after every
    epoch, and at the end, including a failed end, so a crash loses at most the epoch that
    was running. With `writes` False (a multi-worker run's other workers) nothing is sent.
    The rules are `open_run`'s, checked on the remote folder before anything is copied: a
    folder that holds files but no config.json is refused, as is a run of another config.
    """
    if not remote.is_url(run_dir):
        yield Path(run_dir), lambda: None
        return
    if not _same_config(run_dir, cfg):
        _claim(run_dir)
    with process_dir(user_cache_dir() / "remote-runs", _scratch_prefix(run_dir)) as scratch:
        mirror = remote.Mirror(scratch / "run", str(run_dir))
        mirror.pull()
        (scratch / "run").mkdir(exist_ok=True)
        log.info("run folder %s: working copy %s, published after every epoch", run_dir, scratch / "run")
        sync = mirror.push if writes else (lambda: None)
        try:
            yield scratch / "run", sync
        except BaseException:
            try:  # what finished before the failure is complete (atomic writes): keep it
                sync()
            except Exception as e:
                log.warning("could not publish the run folder to %s: %s", run_dir, e)
            raise
        sync()


@contextmanager
def local_run(run_dir: Path | str, publish: bool = False):
    """Yield a local folder holding the finished run `run_dir`, for the commands that read one
    (evaluate, predict, export). A folder is its own. A URL is pulled into a scratch copy in
    the user cache, removed afterwards; with `publish`, what the command wrote there
    (evaluate's ``eval/``, export's ``export/``) goes back to the URL when it succeeds."""
    if not remote.is_url(run_dir):
        yield Path(run_dir)
        return
    if not remote.isfile(remote.join(run_dir, "config.json")):
        raise UserError(f"{run_dir}: not a run folder (no config.json)")
    with process_dir(user_cache_dir() / "remote-runs", _scratch_prefix(run_dir)) as scratch:
        mirror = remote.Mirror(scratch / "run", str(run_dir))
        mirror.pull()
        yield scratch / "run"
        if publish:
            mirror.push()


@contextmanager
def local_runs(run_dirs, publish: bool = False):
    """`local_run` for each of `run_dirs` (an ensemble): a list of local folders."""
    with ExitStack() as stack:
        yield [stack.enter_context(local_run(d, publish)) for d in run_dirs]


def _scratch_prefix(url) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(url))[-40:] + "-"


def load_run_config(run_dir: Path | str) -> Config:
    path = remote.join(run_dir, "config.json")
    if not remote.isfile(path):
        raise ConfigError(f"{run_dir}: not a run folder (no config.json)")
    return config_from_dict(read_json(path), path)


def read_run(run_dir: Path, checkpoint: str = "best") -> dict:
    """A finished run's run.json, plus its fitted temperature and decision rule; no TensorFlow.

    Args:
        run_dir: the run folder.
        checkpoint: the checkpoint that must exist (``checkpoints/<checkpoint>.keras``).

    Returns:
        run.json's dict with ``temperature`` (calibration.json, else 1.0) and
        ``decision`` (thresholds.json, else None) added.

    Raises:
        UserError: not a finished run folder, or a temperature or task it cannot use.
    """
    run_dir = Path(run_dir)
    for name in ("run.json", f"checkpoints/{checkpoint}.keras"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: not a finished run folder (no {name})")
    info = read_json(run_dir / "run.json")
    calibration = run_dir / "calibration.json"
    info["temperature"] = float(read_json(calibration).get("temperature", 1.0)) if calibration.is_file() else 1.0
    if not info["temperature"] > 0:
        raise UserError(f"{calibration}: temperature must be > 0, got {info['temperature']}")
    thresholds = run_dir / "thresholds.json"
    info["decision"] = read_json(thresholds) if thresholds.is_file() else None
    if info.get("task") not in task_names():
        raise UserError(f"{run_dir / 'run.json'}: task {info.get('task')!r} is not one this tfvision knows "
                        f"({', '.join(task_names())})")
    return info


def write_splits(run_dir: Path, frame: pd.DataFrame) -> None:
    from tfvision.fileio import write_text

    columns = [c for c in frame.columns if c != "split"]  # keeps y:<class> and mask columns too
    for name in ("train", "val", "test"):
        part = frame[frame["split"] == name][columns]
        if len(part):
            write_text(run_dir / "splits" / f"{name}.csv", part.to_csv(index=False))


def read_splits(run_dir: Path) -> pd.DataFrame | None:
    parts = []
    for name in ("train", "val", "test"):
        p = run_dir / "splits" / f"{name}.csv"
        if p.exists():
            part = pd.read_csv(p, dtype=str, keep_default_na=False)
            part["split"] = name
            parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else None


def progress(run_dir: Path) -> int:
    p = run_dir / "progress.json"
    return read_json(p)["phases_done"] if p.exists() else 0


def mark_phase_done(run_dir: Path, phases_done: int) -> None:
    write_json(run_dir / "progress.json", {"phases_done": phases_done})
