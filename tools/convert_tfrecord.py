#!/usr/bin/env python
"""Thin wrapper: `python tools/convert_tfrecord.py --config C --output DIR` == `python -m tfvision.convert ...`."""

import sys

from tfvision.convert import main

if __name__ == "__main__":
    sys.exit(main())
