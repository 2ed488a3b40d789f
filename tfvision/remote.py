"""Paths that may be URLs: ``gs://`` (Cloud Storage) or ``ram://`` (TensorFlow's in-memory
filesystem, for tests), next to ordinary local paths.

The one place that knows how to list, read, copy and move a file wherever it lives. A local
path goes through `os`, exactly as before; a URL goes through ``tf.io.gfile``, TensorFlow's
own filesystem layer (no second cloud client to install or authenticate). TensorFlow is
imported only when a URL is met, so config validation and local runs stay TF-free here.

What holds on Cloud Storage, and why the code is shaped this way:

- Writing one object is atomic: a reader sees the old object or the whole new one, never
  half. `put` still writes under a temporary name first, because a writer killed mid-upload
  must leave nothing under the final name that a later run would trust.
- A rename is not atomic. TensorFlow's GCS filesystem renames by copying, then deleting the
  source, object by object; a filesystem without rename (UnimplementedError) gets the same
  done here (`move`). A crash between the two steps leaves the complete file under its final
  name plus a stray temporary one, which the next run removes (`is_temp`); never a partial
  file under a final name.
- Nothing spans several objects: a folder is never swapped in one step. Writers that need a
  consistent set (shards then manifest; a run folder's files) order their writes so that
  the file that declares the set complete goes last.

>>> is_url("gs://bucket/shards"), is_url("/data/shards")
(True, False)
>>> join("gs://bucket/shards/", "manifest.json")
'gs://bucket/shards/manifest.json'
"""

from __future__ import annotations

import os
from pathlib import Path


def is_url(path) -> bool:
    """True for a ``scheme://`` path, which `pathlib` would mangle (``Path("gs://b")`` is ``gs:/b``)."""
    return "://" in str(path)


def join(root, *names: str) -> str:
    """`root` joined with `names` with ``/``, keeping a URL's ``//``."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *names])
    return str(Path(root, *names))


def absolute(path, resolve: bool = False) -> str:
    """`path` made absolute (symlinks resolved with `resolve`); a URL as it is, without a
    trailing slash. For prefix tests: is this file inside that folder?"""
    if is_url(path):
        return str(path).rstrip("/")
    path = Path(path).expanduser()
    return str(path.resolve()) if resolve else os.path.abspath(path)


def name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else Path(path).name


def parent(path) -> str:
    if is_url(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def is_temp(filename: str) -> bool:
    """A temporary name tfvision writes through (``.<name>.tmp-...``): never a finished file."""
    return filename.startswith(".") and ".tmp-" in filename


def _gfile():
    import tensorflow as tf  # only when a URL is met: see the module docstring

    return tf.io.gfile


def _not_found():
    import tensorflow as tf

    return tf.errors.NotFoundError


# --------------------------------------------------------------------------- questions


def exists(path) -> bool:
    return _gfile().exists(str(path)) if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _gfile().isdir(str(path)) if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if is_url(path):
        try:  # one request per file: sources ask this of every listed image
            return not _gfile().stat(str(path)).is_directory
        except _not_found():
            return False
    return os.path.isfile(path)


def size(path) -> int:
    return _gfile().stat(str(path)).length if is_url(path) else os.path.getsize(path)


def listdir(path) -> list[str]:
    """Names in folder `path` (no trailing ``/`` on subfolders), sorted; [] when it is absent."""
    if is_url(path):
        g = _gfile()
        return sorted(n.rstrip("/") for n in g.listdir(str(path))) if g.isdir(str(path)) else []
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def files_under(root) -> list[str]:
    """Every file below `root`, as ``/``-separated paths relative to it, sorted."""
    if is_url(root):
        base = str(root).rstrip("/")
        return sorted(join(top, f)[len(base) + 1:] for top, _, files in _gfile().walk(base) for f in files)
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- reading and writing


def read_bytes(path) -> bytes:
    if is_url(path):
        with _gfile().GFile(str(path), "rb") as f:
            return f.read()
    return Path(path).read_bytes()


def makedirs(path) -> None:
    if is_url(path):
        _gfile().makedirs(str(path))
    else:
        os.makedirs(path, exist_ok=True)


def remove(path) -> None:
    """Delete file `path`; nothing when it is already gone."""
    if is_url(path):
        try:
            _gfile().remove(str(path))
        except _not_found():
            pass
    else:
        Path(path).unlink(missing_ok=True)


def move(src: str, dst: str) -> None:
    """Rename `src` to `dst`, replacing it; copy then delete where the filesystem has no rename.

    On a local disk, `os.replace`: atomic. On a URL, `gfile.rename`, which TensorFlow's GCS
    filesystem itself does as copy + delete; a filesystem that has no rename at all
    (``UnimplementedError``) gets the same copy + delete here. Either way `dst` only ever
    holds a complete file (one object write is atomic); a crash can leave `src` behind too.
    """
    if not is_url(dst):
        os.replace(src, dst)
        return
    import tensorflow as tf

    g = tf.io.gfile
    try:
        g.rename(str(src), str(dst), overwrite=True)
    except tf.errors.UnimplementedError:
        _copy_over(str(src), str(dst))
        g.remove(str(src))


def _copy_over(src: str, dst: str) -> None:
    """`gfile.copy` onto `dst`, replacing it."""
    if dst.startswith("ram://"):
        # TF 2.21's ram:// appends to a file opened for writing instead of truncating it
        # (copying b"two" over b"one" gave b"onetwo"), so the old file goes first there.
        remove(dst)
    _gfile().copy(src, dst, overwrite=True)


def put(local, dst: str, tag: str | None = None) -> None:
    """Copy the finished local file `local` to the URL `dst`: first under a temporary name
    beside it (`is_temp`), then `move`d into place, so a killed upload leaves no partial
    file under `dst`. `tag` tells apart the temporary names of concurrent writers."""
    g = _gfile()
    tmp = join(parent(dst), f".{name(dst)}.tmp-{tag or os.getpid()}")
    g.makedirs(parent(dst))
    try:
        _copy_over(str(local), tmp)  # a killed upload's leftover with this tag is replaced
        move(tmp, dst)
    finally:
        remove(tmp)


def get(src: str, local) -> None:
    """Copy the URL `src` to the local path `local` (its folder is made)."""
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    _gfile().copy(str(src), str(local), overwrite=True)


def copy_tree(src, dst) -> list[str]:
    """Copy every finished file below `src` to `dst` (temporary names skipped); returns their
    relative paths. Used to pull a remote run folder into its local working copy."""
    names = [n for n in files_under(src) if not is_temp(n.rsplit("/", 1)[-1])]
    for rel in names:
        get(join(src, rel), Path(dst) / rel)
    return names


class Mirror:
    """Keeps the URL folder `url` a copy of the local working folder `local`.

    Keras, h5py and zipfile write local files (appending, seeking), which object stores do
    not offer; so a run on a remote folder writes a local working copy, and `push` sends
    what changed since the last push. Files go up oldest change first, so the remote
    folder trails the local one in the order its files were written: a checkpoint reaches
    it before the ``progress.json`` that counts on it, ``latest.weights.h5`` before the
    ``training_metadata.json`` that names its epoch. A file removed locally is removed
    remotely only when it came from `pull` or an earlier `push`: nothing else is touched.
    Only for a folder tfvision owns (a run folder), since `pull` clears temporary names.

    >>> mirror = Mirror("/tmp/run", "gs://bucket/runs/a")
    >>> mirror.pull()  # the remote files, e.g. to resume  # doctest: +SKIP
    >>> mirror.push()  # after each epoch, and at the end  # doctest: +SKIP
    """

    def __init__(self, local, url: str):
        self.local, self.url = Path(local), str(url)
        self.sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) on the remote

    def _stamp(self, rel: str) -> tuple[int, int]:
        st = (self.local / rel).stat()
        return st.st_size, st.st_mtime_ns

    def pull(self) -> None:
        """Copy the remote folder here; remove its temporary names (uploads a crash cut off
        between copy and delete, `move`: the complete file is already under its name)."""
        for rel in files_under(self.url):
            if is_temp(rel.rsplit("/", 1)[-1]):
                remove(join(self.url, rel))
        for rel in copy_tree(self.url, self.local):
            self.sent[rel] = self._stamp(rel)

    def push(self) -> None:
        here = [rel for rel in files_under(self.local) if not is_temp(rel.rsplit("/", 1)[-1])]
        changed = [(self._stamp(rel), rel) for rel in here]
        changed = [(stamp, rel) for stamp, rel in changed if self.sent.get(rel) != stamp]
        for stamp, rel in sorted(changed, key=lambda c: (c[0][1], c[1])):
            put(self.local / rel, join(self.url, rel))
            self.sent[rel] = stamp
        for rel in sorted(set(self.sent) - set(here)):
            remove(join(self.url, rel))
            del self.sent[rel]
