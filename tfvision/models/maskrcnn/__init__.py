"""Mask R-CNN for Keras 3 on tfvision's backbones: see `model.MaskRCNN`.

Modules follow the data flow: config -> fpn -> anchors -> rpn (head, targets,
proposals) -> roi (sampling, ROI-Align, mask targets) -> heads -> losses ->
detect (inference), all assembled in model. `box_coding` and `sampling` are
the pieces both stages share.
"""
