#!/usr/bin/env python
"""Thin wrapper: `python tools/export.py --run RUN_DIR --format all --verify` == `python -m tfvision.export ...`."""

import sys

from tfvision.export import main

if __name__ == "__main__":
    sys.exit(main())
