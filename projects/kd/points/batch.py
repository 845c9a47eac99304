"""A batch of distillation points: boxes ``(cx, cy, w, h)`` in ``[0, 1]`` of each image's own
unpadded input (the DETR family's convention), ``(B, M, 4)``, with a ``(B, M)`` validity mask
where images have different counts. The same numbers name the same region for two models that
see the image at different sizes or paddings, so points pass between families unchanged."""

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["clip_points", "pad_points"]


def clip_points(points: Tensor) -> Tensor:
    """Clip normalised cxcywh boxes to the image (in xyxy, so a box keeps the part inside).

    Both families then see the same region: ROIAlign would sample zeros outside the image where a
    DETR's normalised anchor cannot go.
    """
    return box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(points).clamp(0.0, 1.0))


def pad_points(per_image: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-image point sets of different sizes as one padded batch.

    Args:
        per_image: B tensors (M_i, 4), normalised cxcywh.

    Returns:
        (points, valid): (B, M, 4) with M = max M_i, padded with the whole-image box (a valid
        region for every model, so padding never produces NaNs), and (B, M) bool, True on real
        points. ``points[valid]`` lists the real points image by image, in their order.
    """
    points = nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)
    lengths = torch.tensor([len(p) for p in per_image], device=points.device)
    valid = torch.arange(points.shape[1], device=points.device)[None] < lengths[:, None]
    whole = points.new_tensor([0.5, 0.5, 1.0, 1.0])
    return torch.where(valid[..., None], points, whole), valid
