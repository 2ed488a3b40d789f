#!/usr/bin/env python
"""Thin wrapper around `python -m tfvision.medical.dicom_to_nifti IN_DIR OUT_DIR`."""

import sys

from tfvision.medical.dicom_to_nifti import main

if __name__ == "__main__":
    sys.exit(main())
