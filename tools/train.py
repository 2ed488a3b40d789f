#!/usr/bin/env python
"""Thin wrapper: `python tools/train.py --config configs/demo.json` == `python -m tfvision.train ...`."""

import sys

from tfvision.train import main

if __name__ == "__main__":
    sys.exit(main())
