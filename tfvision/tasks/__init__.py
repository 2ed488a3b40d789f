"""Tasks: what differs between classification, multi-label and segmentation.

A task turns the sample table into targets, builds the model, its loss and
metrics, formats batches for `fit`, and summarises validation predictions.
The trainer only talks to this interface (Model Garden's Task idea).
"""

# The registry lives in base.py, below the task modules, so that they register
# without importing this package back.
from tfvision.tasks.base import TASKS


def get_task(name: str, cfg=None):
    """The task registered as `name`, configured by `cfg` (needed by multilabel)."""
    from tfvision.tasks import classification, multilabel, segmentation  # noqa: F401  (registers)

    return TASKS.get(name)(cfg)
