"""The shell every `python -m tfvision.<command>` shares.

Exit codes are the same everywhere: 0 success, 2 a problem the user can fix
(config, data, arguments; one line on stderr), 1 anything else (a traceback).
"""

from __future__ import annotations

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
