#!/usr/bin/env python
"""Thin wrapper: `python tools/extract.py --backbone NAME --input X --output OUT` == `python -m tfvision.extract ...`."""

import sys

from tfvision.extract import main

if __name__ == "__main__":
    sys.exit(main())
