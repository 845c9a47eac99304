"""Adapters (connectors): the trained layers that map a student's features to the teacher's
channels before the two are compared (Chen et al.'s hints, GID's instance features). They belong
to the distiller: saved in its checkpoints, dropped when the student is exported."""

from typing import Dict, List

import torch
import torch.nn.functional as F
from fvcore.nn.weight_init import c2_xavier_fill
from torch import nn

__all__ = ["conv1x1_adapter", "HintAdapters"]


def conv1x1_adapter(student_channels: int, teacher_channels: int) -> nn.Conv2d:
    """A 1x1 convolution from the student's channels to the teacher's, initialised as detectron2
    initialises its FPN convolutions (fvcore's ``c2_xavier_fill``: Kaiming uniform, a = 1; zero
    bias)."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
    c2_xavier_fill(conv)
    return conv


class HintAdapters(nn.Module):
    """One 1x1 convolution per hinted feature, mapping the student's channels to the teacher's.

    The paper finds the adaptation layer helps even when the channel counts already match, so it
    is always there. When the student runs at lower resolution its adapted feature is resized to
    the teacher's map (bilinear) before the comparison [open in the paper].
    """

    def __init__(
        self, names: List[str], student_channels: Dict[str, int], teacher_channels: Dict[str, int]
    ):
        """
        Args:
            names: the hinted features.
            student_channels: channels of each student feature.
            teacher_channels: channels of each teacher feature.
        """
        super().__init__()
        self.adapters = nn.ModuleDict()
        for name in names:
            self.adapters[name] = conv1x1_adapter(student_channels[name], teacher_channels[name])

    def forward(
        self, name: str, student_feature: torch.Tensor, teacher_feature: torch.Tensor
    ) -> torch.Tensor:
        adapted = self.adapters[name](student_feature)
        if adapted.shape[-2:] != teacher_feature.shape[-2:]:
            adapted = F.interpolate(
                adapted, size=teacher_feature.shape[-2:], mode="bilinear", align_corners=False
            )
        return adapted
