#!/usr/bin/env python
"""Thin wrapper: `python tools/evaluate.py --run RUN_DIR ...` == `python -m tfvision.evaluate ...`."""

import sys

from tfvision.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
