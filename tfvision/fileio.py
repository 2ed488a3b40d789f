"""Atomic writes and folder ownership.

Each writer writes to a temporary sibling and `os.replace`s it into place (atomic on
POSIX within one filesystem), so a crash never leaves a partial file under a final name.
A folder is replaced only when it holds the marker file of the command that made it:
tfvision never deletes or replaces what it did not create.

A ``gs://`` (or ``ram://``) path works in `atomic_path`, `write_text`, `write_json`,
`read_json`, `ours_or_absent`, `claim_dir` and `check_output_outside`: a file is written
locally, then uploaded under a temporary name and moved into place (`tfvision.remote`,
which says what that guarantees on Cloud Storage). The ledger of user-named outputs
(`owned_output`) and the folder swaps (`build_dir`) stay local.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tfvision import remote
from tfvision.errors import UserError


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", before_replace=None):
    """Yield a temporary path next to `path`; move it into place on success.

    `suffix` keeps an extension some writers insist on (Keras wants ``.keras``).
    `before_replace(tmp)` runs on the finished file just before it takes its final name.
    For a URL `path`, `tmp` is a local file, uploaded when finished (`remote.put`): the
    writers (h5py, zipfile, TFRecordWriter) may seek and append, which an object cannot.
    """
    if remote.is_url(path):
        with tempfile.TemporaryDirectory(prefix="tfvision-upload-") as folder:
            tmp = Path(folder) / f".{remote.name(path)}.tmp-{os.getpid()}{suffix}"
            yield tmp
            if before_replace is not None:
                before_replace(tmp)
            remote.put(tmp, str(path))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# Files written at a name the user chose (predict's CSV, a label volume, Grad-CAM overlays) carry
# no marker, so a ledger in the user cache remembers the hash of what was written where: a file
# is ours to replace only while its bytes are still the ones we wrote. The cache must be
# writable ($TFVISION_CACHE moves it).
LEDGER = "written.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ledger() -> dict:
    try:
        return read_json(user_cache_dir() / LEDGER)
    except (OSError, ValueError):
        return {}


def wrote(path: str | os.PathLike) -> bool:
    """True when `path` holds exactly the bytes tfvision last wrote there."""
    path = Path(path)
    digest = _ledger().get(str(path.resolve()))
    return digest is not None and path.is_file() and _sha256(path) == digest


def check_replaceable(path: str | os.PathLike, flag: str) -> None:
    """Refuse (UserError) to write `path` when a file there was not written by tfvision."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not wrote(path)):
        raise UserError(f"{flag}: {path} already exists and tfvision did not write it; "
                        f"move it away or choose another name")


@contextmanager
def owned_output(path: str | os.PathLike, flag: str, suffix: str = ""):
    """`atomic_path` for an output at a user-chosen name: an existing file there is replaced
    only when tfvision wrote it (`check_replaceable`); what is written is recorded as ours.

    The record is written before the file takes its name, so every file tfvision leaves
    under a final name is on record and a rerun may replace it; a failed record (a full
    disk) fails the write instead.
    """
    path = Path(path)
    check_replaceable(path, flag)

    def record(tmp: Path) -> None:
        ledger = {k: v for k, v in _ledger().items() if Path(k).is_file()}
        ledger[str(path.resolve())] = _sha256(tmp)
        write_text(user_cache_dir() / LEDGER, json.dumps(ledger, indent=0))

    with atomic_path(path, suffix, before_replace=record) as tmp:
        yield tmp


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n")


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path):
    return json.loads(remote.read_bytes(path))


def safe_name(value: str) -> str:
    """`value` as one harmless path component: no separators, no leading dots, never empty.

    Names taken from data (a CSV's patient column, a DICOM PatientID) may hold ``../x`` or
    ``/abs``; joined to a folder as they are, they would write outside it. When cleaning
    changes the name, a short hash of the original keeps distinct values apart.

    >>> safe_name("../x")
    'x-d6b96a97'
    """
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._") or "unknown"
    if clean == value:
        return clean
    return f"{clean}-{hashlib.sha256(str(value).encode()).hexdigest()[:8]}"


def user_cache_dir() -> Path:
    """Where derived data goes by default: ``$TFVISION_CACHE``, else ``$XDG_CACHE_HOME/tfvision``,
    else ``~/.cache/tfvision``. Never the dataset folder, which may be read-only (Kaggle's
    ``/kaggle/input``) and is the user's, not ours."""
    if os.environ.get("TFVISION_CACHE"):
        return Path(os.environ["TFVISION_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tfvision"


# {"pid"}: the folder is a scratch folder of one process (`process_dir`), made by that process
PROCESS_MARKER = ".tfvision-worker.json"


@contextmanager
def process_dir(parent: str | os.PathLike, prefix: str):
    """A fresh scratch folder for this process under `parent`, removed at the end.

    Folders with the same `prefix` that killed processes left behind go first: ours by
    their marker (`PROCESS_MARKER`), whose process is gone. Anything else there stays.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for folder in parent.glob(f"{prefix}*"):
        try:
            os.kill(read_json(folder / PROCESS_MARKER)["pid"], 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no marker (not ours), or a live process (PermissionError)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        write_json(tmp / PROCESS_MARKER, {"pid": os.getpid()})
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ours_or_absent(folder: str | os.PathLike, marker: str) -> bool:
    """True when `folder` may be (re)built by tfvision: it does not exist, is an empty folder,
    or holds `marker`, the file only the command that made it writes."""
    if not remote.exists(folder):
        return True
    if not remote.isdir(folder):
        return False
    return remote.isfile(remote.join(folder, marker)) or not remote.listdir(folder)


def claim_dir(folder: str | os.PathLike, marker: str, refusal: str) -> None:
    """Raise `UserError(refusal)` unless `ours_or_absent(folder, marker)`.

    The one ownership rule every writer follows: tfvision deletes or replaces only what it
    made, recognised by `marker`; anything else is the user's.
    """
    if not ours_or_absent(folder, marker):
        raise UserError(refusal)


def check_output_outside(output, inputs, flag: str) -> None:
    """Refuse an `output` that is, or lies inside, one of the `inputs` folders: tfvision never
    writes into the user's input data (it may be read-only, and it is theirs)."""
    out = remote.absolute(output, resolve=True)
    for folder in inputs:
        if folder is None:
            continue
        src = remote.absolute(folder, resolve=True)
        if out == src or out.startswith(src.rstrip("/") + "/"):
            raise UserError(f"{flag}: {output} is inside the input folder {folder}; "
                            f"tfvision does not write into its inputs, so choose a folder outside it")


def replace_dir(tmp: Path, final: Path, marker: str, refusal: str) -> None:
    """Move the finished folder `tmp` to `final`, replacing an earlier one of ours.

    The old folder is renamed aside before the new one moves in, so `final` is never
    half-written; the ownership check runs again here because the user may have put
    something there while we worked.
    """
    claim_dir(final, marker, refusal)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def temp_dir_beside(final: Path) -> Path:
    """A fresh hidden folder next to `final` (same filesystem, so the final rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def build_dir(final: str | os.PathLike, build, marker: str, refusal: str) -> Path:
    """Create folder `final` once: `build(tmp)` fills a temporary sibling, which then
    takes `final`'s place. `marker` (a file `build` writes last) says a folder is complete
    and ours; an existing folder without it is the user's and is refused with `refusal`,
    never deleted."""
    final = Path(final)
    if (final / marker).is_file():
        return final
    claim_dir(final, marker, refusal)
    tmp = temp_dir_beside(final)
    try:
        build(tmp)
        if not (tmp / marker).exists():
            raise RuntimeError(f"building {final} did not write {marker}")  # a bug in `build`
        replace_dir(tmp, final, marker, refusal)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final
