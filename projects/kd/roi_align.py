"""ROIAlign whose backward pass on CPU is vectorised; its forward is torchvision's.

torchvision's CPU backward of ``roi_align`` is a scalar loop over every (roi, channel, bin, sample)
that recomputes the bilinear weights each time: on BCCD's RetinaNet GID step (about 40 GI boxes of
64 channels, 10x10 bins) it took 10.5 ms an iteration, seven times its forward. The gradient is
the transpose of the same bilinear sampling, so here it is computed with tensor operations: the
sampling weights of each roi, separable in y and x, once for all channels, then one
``index_add_`` of every weighted output gradient into the input's gradient: GID's pooling of the
student's pyramid, forward and backward, takes 7 ms instead of 14 ms there (one thread). The
forward, and so every value computed from it, is torchvision's own; the gradient equals
torchvision's up to the order of float additions (``tests/test_gid_assignment.py``).
"""

from typing import List, Tuple

import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import nn
from torch.autograd.function import once_differentiable
from torchvision.ops import roi_align

__all__ = [
    "ROIAlignFastGrad",
    "roi_align_input_grad",
    "with_fast_roi_align_grad",
    "pool_levels",
    "SYNC_FREE_POOLING",
]

# When pool_levels pools without host-device synchronisations: "cuda" (GPU tensors only: on the
# CPU nothing waits, and detectron2's per-level selection does less work), "always"
# (tools/count_syncs.py, to count on the CPU what a GPU runs) or "never".
SYNC_FREE_POOLING = "cuda"


def _axis_taps(
    start: torch.Tensor, length: torch.Tensor, pooled: int, size: int, sampling_ratio: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The map indices and weights one axis of ROIAlign's bilinear sampling reads, per roi.

    torchvision's rule: ``pooled`` bins along ``length`` from ``start``, each sampled at ``grid``
    evenly spaced points (``sampling_ratio``, or ``ceil(length / pooled)`` when it is 0); a point
    beyond ``[-1, size]`` reads nothing, one in ``[-1, 0]`` reads position 0, one past
    ``size - 1`` reads the last position.

    Args:
        start, length: (K,) each roi's start and length in map cells, along this axis.
        pooled: output bins along this axis.
        size: map size along this axis.
        sampling_ratio: ROIAlign's sampling ratio (0 = adaptive).

    Returns:
        index: (K, pooled, 2 G) long positions, G the largest grid of the rois (the low and high
            neighbour of each sample);
        weight: (K, pooled, 2 G) their interpolation weights divided by the roi's grid, 0 for the
            samples beyond its grid or outside the map.
    """
    if sampling_ratio > 0:
        grid = torch.full_like(length, float(sampling_ratio))
    else:
        grid = torch.ceil(length / pooled)
    num = max(int(grid.max()), 1) if grid.numel() else 1
    i = torch.arange(num, dtype=length.dtype, device=length.device)
    p = torch.arange(pooled, dtype=length.dtype, device=length.device)[:, None]
    bin_size, grid = (length / pooled)[:, None, None], grid[:, None, None]
    # torchvision's expression and order: start + p * bin + (i + 0.5) * bin / grid.
    coord = start[:, None, None] + p * bin_size + (i + 0.5) * bin_size / grid
    valid = (i < grid) & (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor()
    at_end = low >= size - 1
    low = torch.where(at_end, float(size - 1), low)
    frac = torch.where(at_end, low, coord) - low
    index = torch.stack([low, torch.where(at_end, low, low + 1)], dim=-1)
    weight = torch.stack([1.0 - frac, frac], dim=-1) / grid[..., None]
    # Where nothing is read the coordinate may be anything (a roi without samples divides by 0).
    index = torch.where(valid[..., None], index, 0.0).long()
    weight = torch.where(valid[..., None], weight, 0.0)
    return index.flatten(2), weight.flatten(2)


def roi_align_input_grad(
    grad: torch.Tensor,
    rois: torch.Tensor,
    input_shape: Tuple[int, int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """The gradient of torchvision's ``roi_align`` with respect to its input.

    Args:
        grad: (K, C, ph, pw) gradient of the pooled output.
        rois: (K, 5) the rois of the forward pass: image index, then x1, y1, x2, y2.
        input_shape: (N, C, H, W) of the input feature map.
        output_size: (ph, pw).
        spatial_scale, sampling_ratio, aligned: as given to ``roi_align``.

    Returns:
        (N, C, H, W) gradient of the input (channels-last strides), in float32 (float64 if
        ``grad`` is float64).
    """
    n, c, h, w = input_shape
    ph, pw = output_size
    dtype = torch.promote_types(grad.dtype, torch.float32)
    if rois.shape[0] == 0:  # a pyramid level without rois
        return torch.zeros(input_shape, dtype=dtype, device=grad.device)
    rois = rois.to(dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    width, height = x2 - x1, y2 - y1
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    iy, wy = _axis_taps(y1, height, ph, h, sampling_ratio)
    ix, wx = _axis_taps(x1, width, pw, w, sampling_ratio)
    k = rois.shape[0]
    # (K, ph, pw, Sy, Sx): every output bin's samples, as rows of the channels-last input.
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    index = iy[:, :, None, :, None] * w + ix[:, None, :, None, :]
    index = index + (rois[:, 0].long() * (h * w))[:, None, None, None, None]
    g = grad.to(dtype).permute(0, 2, 3, 1).reshape(k * ph * pw, 1, c)
    rows = (g * weight.view(k * ph * pw, iy.shape[-1] * ix.shape[-1], 1)).view(-1, c)
    out = torch.zeros((n * h * w, c), dtype=dtype, device=grad.device)
    out.index_add_(0, index.view(-1), rows)
    # Channels-last strides: autograd adds it to the map's other gradients as it is.
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


class _ROIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (input.shape, input.dtype, output_size, spatial_scale, sampling_ratio, aligned)
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        shape, dtype, output_size, spatial_scale, sampling_ratio, aligned = ctx.args
        grad_input = roi_align_input_grad(
            grad, rois, shape, output_size, spatial_scale, sampling_ratio, aligned
        )
        return grad_input.to(dtype), None, None, None, None, None


class ROIAlignFastGrad(ROIAlign):
    """detectron2's :class:`ROIAlign`, with the vectorised backward on CPU inputs that need a
    gradient; otherwise (CUDA, no gradient) exactly detectron2's."""

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: NCHW feature map.
            rois: (K, 5) boxes, the image index then x1, y1, x2, y2.
        """
        if input.device.type != "cpu" or not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        return _ROIAlignFunction.apply(
            input,
            rois.to(dtype=input.dtype),
            tuple(self.output_size),
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
        )


def with_fast_roi_align_grad(level_poolers: nn.ModuleList) -> nn.ModuleList:
    """A :class:`ROIPooler`'s ``level_poolers`` with every :class:`ROIAlign` a
    :class:`ROIAlignFastGrad` of the same settings (other poolers are kept).

    Args:
        level_poolers: ``ROIPooler.level_poolers``.
    """
    return nn.ModuleList(
        (
            ROIAlignFastGrad(p.output_size, p.spatial_scale, p.sampling_ratio, p.aligned)
            if type(p) is ROIAlign
            else p
        )
        for p in level_poolers
    )


def pool_levels(
    pooler: nn.Module, features: List[torch.Tensor], boxes: List[Boxes]
) -> torch.Tensor:
    """``pooler(features, boxes)`` for a detectron2 ``ROIPooler``, without host-device syncs on a
    GPU (:data:`SYNC_FREE_POOLING`).

    ``ROIPooler`` finds each level's boxes with ``nonzero`` (the host waits for the GPU, once per
    level) and numbers the boxes' images with a ``repeat_interleave`` of a device tensor (once
    more). Here every level pools every box and each box keeps its own level's result: the same
    values and gradients (a box's ROIAlign reads only its level; the others add zeros), for L
    times the ROIAlign work, which on a GPU costs less than the waits at the few hundred boxes a
    distiller pools (``tests/test_gpu_readiness.py`` checks them equal bit for bit on the CPU).

    Args:
        pooler: a ``ROIPooler`` (its ``level_poolers`` and level settings are used).
        features: its input feature maps, one per level.
        boxes: per image, the boxes to pool.
    """
    mode = SYNC_FREE_POOLING
    if (
        len(pooler.level_poolers) == 1
        or not boxes
        or mode == "never"
        or (mode == "cuda" and not features[0].is_cuda)
    ):
        return pooler(features, boxes)
    tensors = [b.tensor for b in boxes]
    index = torch.cat([t.new_full((t.shape[0], 1), float(i)) for i, t in enumerate(tensors)])
    rois = torch.cat([index, torch.cat(tensors)], dim=1)
    levels = assign_boxes_to_levels(
        boxes, pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
    )
    out = None
    for level, level_pooler in enumerate(pooler.level_poolers):
        pooled = level_pooler(features[level], rois)
        keep = (levels == level).view(-1, 1, 1, 1)
        out = pooled if out is None else torch.where(keep, pooled, out)
    return out
