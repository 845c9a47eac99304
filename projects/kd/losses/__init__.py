"""Distillation losses: pure functions of tensors, one module per method family.

Teacher inputs are detached inside every function; student inputs keep their graph.
"""

from .chen2017 import (
    hint_loss,
    objectness_soft_cross_entropy,
    teacher_bounded_regression,
    weighted_soft_cross_entropy,
)
from .gid import (
    gi_feature_loss,
    gi_relation_loss,
    gi_relation_losses,
    gi_response_loss,
)
from .kd_detr import kd_detr_loss, paired_giou_loss

__all__ = [
    "weighted_soft_cross_entropy",
    "objectness_soft_cross_entropy",
    "teacher_bounded_regression",
    "hint_loss",
    "gi_feature_loss",
    "gi_relation_loss",
    "gi_relation_losses",
    "gi_response_loss",
    "paired_giou_loss",
    "kd_detr_loss",
]
