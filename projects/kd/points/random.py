"""Random boxes: KD-DETR's general distillation points, and the random points of the
heterogeneous distillers.

Drawn on the CPU from the global torch RNG (or a given generator) whatever the device, so that the
points depend only on the RNG state the trainer checkpoints (a resumed run draws the same points)
and not on the device.
"""

from typing import Optional

import torch
from torch import Tensor

from kd.points.batch import clip_points

__all__ = ["RANDOM_BOX_MODES", "random_points"]

RANDOM_BOX_MODES = ("uniform", "sigmoid_normal")


def random_points(
    batch: int,
    num: int,
    *,
    mode: str = "sigmoid_normal",
    clip: bool = True,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Random boxes, redrawn every call.

    Args:
        batch: B, images.
        num: M, boxes per image.
        mode: "sigmoid_normal": each of (cx, cy, w, h) the sigmoid of a standard normal
            [KD-DETR code]; "uniform": each uniform in (0, 1) [KD-DETR paper].
        clip: clip the boxes to the image (:func:`~kd.points.batch.clip_points`), as points an
            R-CNN answers at need (ROIAlign samples zeros outside the image). KD-DETR between two
            DETRs keeps the raw boxes, as its code does (an anchor may reach past the border).
        device, dtype: of the result.
        generator: optional RNG (tests).

    Returns:
        (B, M, 4) cxcywh boxes in [0, 1].
    """
    if mode not in RANDOM_BOX_MODES:
        raise ValueError(f"random box mode must be one of {RANDOM_BOX_MODES}, got {mode!r}")
    if mode == "sigmoid_normal":
        boxes = torch.randn(batch, num, 4, generator=generator).sigmoid()
    else:
        boxes = torch.rand(batch, num, 4, generator=generator)
    boxes = boxes.to(device=device, dtype=dtype)
    return clip_points(boxes) if clip else boxes
