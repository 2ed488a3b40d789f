"""Fault injection: every command x every fault, through the real CLI in a subprocess.

Each cell asserts the exit code, that a failure is one ``error:`` line with no traceback,
and that no input file changed (paths and bytes). Sessions run as root, where ``chmod -w``
stops nothing, so "read-only" is proven by the input's checksums, not by the OS.

Faults:
    user_output   the output is an existing folder (or file) of the user's: refused, kept
    read_only     the input tree is chmod a-w: the command works and writes nothing there
    missing_input the input does not exist
    empty_input   the input exists and holds nothing
    corrupt_file  one input file is garbage: the command finishes and names it
    disk_full     writes fail past a few KB (RLIMIT_FSIZE): one line, then a rerun succeeds
    kill_rerun    kill -9 while writing, then the same command finishes the job

A new command gets a `Case` builder in `BUILDERS`; `test_every_command_has_a_case` fails
until it has one.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, checksums
from eval_helpers import trained_run

pytestmark = pytest.mark.faults  # a suite of its own: CI runs it, plain `pytest` does not

COMMANDS = ["train", "convert", "evaluate", "predict", "export", "extract", "dicom_to_nifti", "rtstruct_to_labels"]
FAULTS = ["user_output", "read_only", "missing_input", "empty_input", "corrupt_file", "disk_full", "kill_rerun"]
KILL_AFTER_S = 3.0
FILE_LIMIT = 4096  # bytes: the first real output (a config, a checkpoint, a shard) is larger


@dataclass
class Case:
    """One command ready to run: argv, the input tree it must never change, where it writes."""

    argv: list[str]
    input: Path
    output: Path
    done: str  # a file under `output` that only a finished command writes
    corrupt: Path  # the input file the corrupt_file fault overwrites
    env: dict = field(default_factory=dict)
    limit: int = FILE_LIMIT  # bytes a file may grow to in the disk_full fault

    def finished(self) -> bool:
        if not self.done:
            return self.output.is_file()
        done = self.output / self.done
        return done.is_file() and '"running"' not in done.read_text()  # dicom_to_nifti's first report


def run(case: Case, *, limit: int | None = None, timeout=600) -> subprocess.CompletedProcess:
    def limit_writes():  # a full disk, as the writer sees it: writes past `limit` bytes fail
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, *case.argv], capture_output=True, text=True, timeout=timeout,
                          cwd=case.output.parent, env={**os.environ, **case.env},
                          preexec_fn=limit_writes if limit else None)


def assert_one_line_error(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]


# --------------------------------------------------------------------------- the commands


def _digits(dest: Path, digits_root: Path, n: int = 60) -> Path:
    frame = pd.read_csv(digits_root / "digits.csv").iloc[:n]
    (dest / "images").mkdir(parents=True)
    for p in frame["path"]:
        shutil.copy(digits_root / p, dest / p)
    frame.to_csv(dest / "digits.csv", index=False)
    return dest


def _config(tmp: Path, root: Path) -> Path:
    cfg = {"seed": 0,
           "data": {"source": "csv", "root": str(root), "csv": "digits.csv", "group_column": "group",
                    "image_size": 32, "max_bad_fraction": 0.1, "split": {"method": "stratified", "val_fraction": 0.3}},
           "model": {"backbone": "small_cnn", "weights": None},
           "train": {"batch_size": 16, "epochs": 1, "steps_per_epoch": 3, "tensorboard": True}}
    path = tmp / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def _train(tmp, digits_root, _run) -> Case:
    root = _digits(tmp / "data", digits_root)
    cfg = _config(tmp, root)
    return Case(["-m", "tfvision.train", "--config", str(cfg), "--output-dir", str(tmp / "out"), "--quiet"],
                root, tmp / "out", "metrics.json", root / "images" / "digit_0005.png")


def _convert(tmp, digits_root, _run) -> Case:
    root = _digits(tmp / "data", digits_root)
    cfg = _config(tmp, root)
    return Case(["-m", "tfvision.convert", "--config", str(cfg), "--output", str(tmp / "out"), "--quiet",
                 "--shard-mb", "0.01"], root, tmp / "out", "manifest.json", root / "images" / "digit_0005.png")


def _run_copy(tmp: Path, digits_root: Path, run: Path) -> tuple[Path, Path]:
    """A copy of the trained run whose data root is a fresh copy too (config and splits repointed)."""
    old_root = json.loads((run / "config.json").read_text())["data"]["root"]
    root = _digits(tmp / "data", digits_root, n=300)
    copy = tmp / "run"
    shutil.copytree(run, copy)
    for f in [copy / "config.json", *(copy / "splits").glob("*.csv")]:
        f.write_text(f.read_text().replace(old_root, str(root)))
    return copy, root


def _evaluate(tmp, digits_root, run) -> Case:
    copy, root = _run_copy(tmp, digits_root, run)
    val = pd.read_csv(copy / "splits" / "val.csv")["path"].iloc[0]
    # evaluate writes its report into the run (eval/val/): the input it must not change is the data.
    return Case(["-m", "tfvision.evaluate", "--run", str(copy)], root, copy, "eval/val/metrics.json", Path(val))


def _predict(tmp, digits_root, run) -> Case:
    images = _digits(tmp / "data", digits_root, n=40) / "images"
    return Case(["-m", "tfvision.predict", "--run", str(run), "--input-dir", str(images),
                 "--output", str(tmp / "out.csv")], images, tmp / "out.csv", "", images / "digit_0005.png")


def _export(tmp, digits_root, run) -> Case:
    copy, _ = _run_copy(tmp, digits_root, run)
    images = _digits(tmp / "verify", digits_root, n=12) / "images"
    return Case(["-m", "tfvision.export", "--run", str(copy), "--format", "savedmodel", "--verify",
                 "--images", str(images), "--output", str(tmp / "out")], copy, tmp / "out",
                "export_report.json", images / "digit_0005.png")


def _extract(tmp, digits_root, _run) -> Case:
    images = _digits(tmp / "data", digits_root, n=40) / "images"
    return Case(["-m", "tfvision.extract", "--backbone", "small_cnn", "--weights", "null", "--image-size", "32",
                 "--input", str(images), "--output", str(tmp / "out"), "--engine", "keras"],
                images, tmp / "out", "metadata.json", images / "digit_0005.png")


def _dicom_to_nifti(tmp, _digits_root, _run) -> Case:
    from pydicom.data import get_testdata_file

    src = tmp / "dicom"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name, download=False), src / name)
    shutil.copy(src / "CT_small.dcm", src / "CT_copy.dcm")  # the one the corrupt fault breaks
    return Case(["-m", "tfvision.medical.dicom_to_nifti", str(src), str(tmp / "out"), "--workers", "1",
                 "--no-progress"], src, tmp / "out", "conversion_report.json", src / "CT_copy.dcm")


def _rtstruct_to_labels(tmp, _digits_root, _run) -> Case:
    from tests.test_medical_geometry import write_rtstruct_case

    src = tmp / "patients"
    for patient in ("P1", "P2"):
        write_rtstruct_case(src / patient)
    (tmp / "names.json").write_text('{"Body": ["patient"]}')
    return Case(["-m", "tfvision.medical.rtstruct_to_labels", "--patients", str(src), "--map", str(tmp / "names.json"),
                 "--output", str(tmp / "out"), "--workers", "1", "--no-progress"],
                src, tmp / "out", "labels_report.json", src / "P2" / "rs" / "rtstruct.dcm",
                limit=256)  # its label volumes compress to a few hundred bytes


BUILDERS = {"train": _train, "convert": _convert, "evaluate": _evaluate, "predict": _predict,
            "export": _export, "extract": _extract, "dicom_to_nifti": _dicom_to_nifti,
            "rtstruct_to_labels": _rtstruct_to_labels}


def test_every_command_has_a_case():
    # every `python -m tfvision...` command is a module with a __main__ block
    entry_points = {p.stem for p in (REPO / "tfvision").rglob("*.py") if 'if __name__ == "__main__":' in p.read_text()}
    assert set(BUILDERS) == set(COMMANDS) == entry_points, "add a Case builder for the new command"


# --------------------------------------------------------------------------- the faults


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_root):
    return trained_run(tmp_path_factory, digits_root)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_fault(command, fault, tmp_path, digits_root, run_dir):
    case = BUILDERS[command](tmp_path, digits_root, run_dir)
    CELLS[fault](case)


def _user_output(case: Case):
    target = case.output
    if case.argv[1] == "tfvision.evaluate":  # evaluate writes into the run it is given: hand it a user's folder
        target = case.output.parent / "mine"
        case.argv[case.argv.index("--run") + 1] = str(target)
    if case.done:
        (target / "sub").mkdir(parents=True)
        (target / "notes.txt").write_text("my notes\n")
        (target / "sub" / "model.bin").write_bytes(os.urandom(3000))
    else:
        target.write_text("id,label\nmine,1\n")
    before, inputs = checksums(target), checksums(case.input)
    proc = run(case)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line_error(proc)
    assert checksums(target) == before and checksums(case.input) == inputs


def _read_only(case: Case):
    before = checksums(case.input)
    modes = {p: p.stat().st_mode for p in [case.input, *case.input.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        proc = run(case)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert case.finished()
    assert checksums(case.input) == before


def _missing_input(case: Case):
    shutil.rmtree(case.input)
    proc = run(case)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line_error(proc)
    assert not case.finished()


def _empty_input(case: Case):
    shutil.rmtree(case.input)
    case.input.mkdir()
    proc = run(case)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line_error(proc)
    assert checksums(case.input) == {}


def _corrupt_file(case: Case):
    case.corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    before = checksums(case.input)
    proc = run(case)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert case.finished()
    # the bad file is named somewhere the user looks: the console or the command's report
    reports = [case.output] if case.output.is_file() else list(case.output.rglob("*.json"))
    said = proc.stdout + proc.stderr + "".join(p.read_text() for p in reports)
    assert case.corrupt.name in said
    assert checksums(case.input) == before


def _disk_full(case: Case):
    before = checksums(case.input)
    proc = run(case, limit=case.limit)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_line_error(proc)
    # unfinished, or (dicom_to_nifti, which reports per series) finished with the cause on record
    assert not case.finished() or os.strerror(errno.EFBIG) in (case.output / case.done).read_text()
    proc = run(case)  # space is back: the same command completes, nothing half-written in its way
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert case.finished() and checksums(case.input) == before


def _kill_rerun(case: Case):
    before = checksums(case.input)
    proc = subprocess.Popen([sys.executable, *case.argv], cwd=case.output.parent, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **case.env})
    # Kill as the command starts writing its output; commands that write in one final step
    # (predict's CSV) are killed a few seconds in, while they read and compute.
    t0 = time.monotonic()
    while proc.poll() is None and not _writing(case) and time.monotonic() - t0 < KILL_AFTER_S:
        time.sleep(0.02)
    assert proc.poll() is None, "the command ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = run(case)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert case.finished() and checksums(case.input) == before


def _writing(case: Case) -> bool:
    """True once the command has begun writing output of its own (not just created a folder)."""
    out = case.output
    siblings = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    files = [f for d in [out, *siblings] if d.is_dir() for f in d.rglob("*") if f.is_file()]
    return bool(files) or any(p.is_file() for p in siblings)


CELLS = {"user_output": _user_output, "read_only": _read_only, "missing_input": _missing_input,
         "empty_input": _empty_input, "corrupt_file": _corrupt_file, "disk_full": _disk_full,
         "kill_rerun": _kill_rerun}
