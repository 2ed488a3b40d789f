"""Mask R-CNN hyper-parameters, with the defaults of TF Model Garden's ``maskrcnn`` config.

One frozen dataclass is the single source of truth for every stage; the model
keeps it and each module reads only the fields it needs. Tests shrink the
widths and sample counts; the defaults are what a real run uses.

>>> MaskRCNNConfig().rpn_samples, MaskRCNNConfig(max_level=4).num_levels
(256, 3)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MaskRCNNConfig:
    # Pyramid: P2..P6 with 256 channels; the box and mask crops use P2..P5 only (FPN paper).
    min_level: int = 2
    max_level: int = 6
    fpn_filters: int = 256

    # Anchors: side = anchor_size * stride, so 32 px on P2 .. 512 px on P6.
    anchor_size: float = 8.0
    num_scales: int = 1
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # width / height

    # RPN targets and proposals.
    rpn_positive_iou: float = 0.7
    rpn_negative_iou: float = 0.3
    rpn_samples: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_k_train: int = 2000  # per level
    rpn_post_nms_top_k_train: int = 1000  # per level, then overall
    rpn_pre_nms_top_k_test: int = 1000
    rpn_post_nms_top_k_test: int = 1000
    rpn_nms_iou: float = 0.7

    # Second stage: ROI sampling, crops and heads.
    roi_samples: int = 512
    roi_positive_fraction: float = 0.25
    roi_positive_iou: float = 0.5
    box_crop: int = 7
    mask_crop: int = 14  # the mask head upsamples once: 28 x 28 masks
    box_num_fcs: int = 2
    box_fc_dims: int = 1024
    mask_convs: int = 4
    mask_filters: int = 256
    max_mask_rois: int = 128

    # Box coding: deltas are multiplied by these weights (Model Garden's 1,1,1,1 for the
    # RPN and 10,10,5,5 for the box head), i.e. divided by 1 / weight.
    rpn_box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    roi_box_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)

    # Losses.
    rpn_huber_delta: float = 1.0 / 9.0
    box_huber_delta: float = 1.0
    rpn_score_weight: float = 1.0
    rpn_box_weight: float = 1.0
    frcnn_class_weight: float = 1.0
    frcnn_box_weight: float = 1.0
    mask_weight: float = 1.0

    # Inference.
    detection_score: float = 0.05
    detection_nms_iou: float = 0.5
    max_detections: int = 100

    def __post_init__(self):
        if not 2 <= self.min_level <= min(self.max_level, 5):
            raise ValueError(f"levels: need 2 <= min_level <= min(max_level, 5), got "
                             f"{self.min_level}..{self.max_level}")
        if self.rpn_negative_iou > self.rpn_positive_iou:
            raise ValueError("rpn_negative_iou must not exceed rpn_positive_iou")

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    @property
    def crop_levels(self) -> range:
        """The levels ROI-Align reads: P6 exists for the RPN's large anchors only."""
        return range(self.min_level, min(self.max_level, 5) + 1)

    @property
    def mask_size(self) -> int:
        return 2 * self.mask_crop

    @property
    def anchors_per_location(self) -> int:
        return self.num_scales * len(self.aspect_ratios)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MaskRCNNConfig:
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**{**values, **tuples})
