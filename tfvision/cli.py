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
    except OSError as e:
        if e.errno not in _WRITE_FAULTS:
            raise
        # A full disk or a folder we may not write is the user's to fix, not a bug: one line.
        # Every writer goes through a temporary name, so nothing partial sits under a final one.
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; {_WRITE_FAULTS[e.errno]}; nothing partial was kept "
              f"under a final name, so rerun the same command afterwards", file=sys.stderr)
        return 2


_WRITE_FAULTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EFBIG: "free some space or raise the file-size limit",
    errno.EROFS: "write the output to a writable folder",
    errno.EACCES: "write the output to a folder you may write",
}
