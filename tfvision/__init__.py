"""tfvision: TensorFlow/Keras toolkit for Kaggle and medical imaging.

Importing the package is cheap on purpose: TensorFlow is only imported by the
modules that need it, so config validation runs in a second.
"""

__version__ = "0.1.0"
