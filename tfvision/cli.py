"""The shell every `python -m tfvision.<command>` shares.

Exit codes are the same everywhere: 0 success, 2 a problem the user can fix
(config, data, arguments; one line on stderr), 1 anything else (a traceback).
"""

from __future__ import annotations

import errno
import logging
import os
import sys

from tfvision.errors import UserError


def run_command(command, parse_args, argv=None) -> int:
    """Parse `argv`, run ``command(args)`` and map a `UserError` to exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow
    args = parse_args(argv)
    try:
        return command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        fix = _write_fault(e)
        if fix is None:
            raise
        # A full disk or a folder we may not write is the user's to fix, not a bug: one line.
        # Every writer goes through a temporary name, so nothing partial sits under a final one.
        print(f"error: {_first_line(e)}; {fix}; nothing partial was kept under a final name, "
              f"so rerun the same command afterwards", file=sys.stderr)
        return 2


def _write_fault(e: Exception) -> str | None:
    """What to do about `e` when it is a failed write (disk full, read-only), else None.

    TensorFlow's own writers (TFRecord shards, SavedModel variables, TensorBoard events)
    raise `tf.errors.OpError`s, not `OSError`, carrying the OS's message: match that text.
    """
    if isinstance(e, OSError):
        return _WRITE_FAULTS.get(e.errno)
    if type(e).__module__.startswith("tensorflow"):
        text = str(e)
        return next((fix for code, fix in _WRITE_FAULTS.items() if os.strerror(code) in text), None)
    return None


def _first_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    return str(e).strip().splitlines()[0]


_WRITE_FAULTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EFBIG: "free some space or raise the file-size limit",
    errno.EROFS: "write the output to a writable folder",
    errno.EACCES: "write the output to a folder you may write",
}
