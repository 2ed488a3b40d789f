#!/usr/bin/env python
"""Thin wrapper: `python tools/predict.py --run RUN_DIR ...` == `python -m tfvision.predict ...`."""

import sys

from tfvision.predict import main

if __name__ == "__main__":
    sys.exit(main())
