"""Box helpers for boxes normalised to each image's own size, as the DETR family predicts them."""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "inverse_sigmoid",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "normalize_boxes",
    "denormalize_boxes",
]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``logit(x)``, clamped so that boxes on the image border stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU (Rezatofighi et al.) of every box in ``boxes1`` with every box in ``boxes2``.

    Args:
        boxes1: (N, 4) xyxy boxes.
        boxes2: (M, 4) xyxy boxes.

    Returns:
        (N, M) GIoU in [-1, 1].
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / union.clamp(min=1e-7)
    lt_hull = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb_hull = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    hull = (rb_hull - lt_hull).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


def _size_tensor(image_sizes: Sequence[Tuple[int, int]], like: Tensor) -> Tensor:
    """(B, 1, 4) tensor (w, h, w, h) per image."""
    wh = [[float(w), float(h), float(w), float(h)] for h, w in image_sizes]
    return torch.tensor(wh, dtype=like.dtype, device=like.device)[:, None, :]


def normalize_boxes(boxes_xyxy: Tensor, image_sizes: List[Tuple[int, int]]) -> Tensor:
    """Absolute xyxy boxes in the model's input frame -> anchors for :meth:`DETR.decode_groups`.

    Args:
        boxes_xyxy: (B, M, 4) boxes in pixels of the resized input image (e.g. R-CNN proposals).
        image_sizes: (h, w) of each input image before padding (``DETREncoded.image_sizes``).

    Returns:
        (B, M, 4) cxcywh boxes normalised by each image's own size and clipped to the image: the
        corners are clamped to [0, 1] before the conversion, so a box that sticks out keeps the
        part inside (clamping cx, cy, w, h instead would leave it sticking out, or move it).
    """
    corners = (boxes_xyxy / _size_tensor(image_sizes, boxes_xyxy)).clamp(0, 1)
    return box_xyxy_to_cxcywh(corners)


def denormalize_boxes(boxes_cxcywh: Tensor, image_sizes: List[Tuple[int, int]]) -> Tensor:
    """The inverse of :func:`normalize_boxes` (without its clamp): (B, M, 4) -> absolute xyxy."""
    return box_cxcywh_to_xyxy(boxes_cxcywh) * _size_tensor(image_sizes, boxes_cxcywh)
