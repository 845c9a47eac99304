"""Multi-scale deformable attention (Zhu et al., Deformable DETR), in plain PyTorch.

Each query attends to ``n_points`` sampled locations per head and feature level, placed around its
reference box by learned offsets; values are read by bilinear interpolation (``F.grid_sample``).
A compiled kernel is used only when one is importable and the tensors are on a GPU; both paths
compute the same function.
"""

import importlib
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

__all__ = ["ms_deform_attn", "MSDeformAttn", "level_shapes", "with_level_shapes"]


def _load_native_kernel():
    """The compiled op of the Deformable DETR / DINO / detrex builds, if one is installed."""
    try:
        return importlib.import_module("MultiScaleDeformableAttention")
    except ImportError:
        return None


_NATIVE = _load_native_kernel()


class _NativeMSDeformAttn(Function):
    """Autograd wrapper of the compiled kernel (same signature as the reference implementation)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, locations, weights, im2col_step):
        ctx.im2col_step = im2col_step
        out = _NATIVE.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, locations, weights, im2col_step
        )
        ctx.save_for_backward(value, spatial_shapes, level_start_index, locations, weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        grad_value, grad_loc, grad_w = _NATIVE.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, locations, weights, grad_out, ctx.im2col_step
        )
        return grad_value, None, None, grad_loc, grad_w, None


def with_level_shapes(shapes: List[Tuple[int, int]], device: torch.device) -> Tensor:
    """The (L, 2) long tensor of the levels' (height, width), carrying them as Python ints too.

    Every deformable layer and the reference points need the shapes as ints; reading them back
    from a GPU tensor (``tolist``) makes the host wait for the GPU, once per layer.
    """
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
    spatial_shapes.kd_level_shapes = tuple((int(h), int(w)) for h, w in shapes)
    return spatial_shapes


def level_shapes(spatial_shapes: Tensor) -> List[Tuple[int, int]]:
    """The levels' (height, width) as Python ints: those :func:`with_level_shapes` attached, else
    read from the tensor."""
    shapes = getattr(spatial_shapes, "kd_level_shapes", None)
    if shapes is None:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return list(shapes)


def _uses_native_kernel(value: Tensor) -> bool:
    return _NATIVE is not None and value.is_cuda


def _full_precision(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The attention-weighted sum of bilinearly sampled values.

    Args:
        value: (B, S, H, Dh) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) long, (height, width) of each level.
        level_start_index: (L,) long, offset of each level in ``S``.
        sampling_locations: (B, Q, H, L, P, 2) (x, y) in [0, 1] of each level's padded map
            (``grid_sample``'s ``align_corners=False`` convention: 0 and 1 are the outer edges).
        attention_weights: (B, Q, H, L, P), summing to 1 over (L, P) for each query and head.

    Returns:
        (B, Q, H * Dh). Locations outside a map read zeros.
    """
    if _uses_native_kernel(value):
        # The compiled kernels take float32 (and float64) only; under AMP the projections
        # before this hand it float16 or bfloat16. It runs in float32, outside the autocast, and
        # its output is cast back to the values' type.
        with torch.autocast(value.device.type, enabled=False):
            out = _NativeMSDeformAttn.apply(
                _full_precision(value),
                spatial_shapes,
                level_start_index,
                _full_precision(sampling_locations),
                _full_precision(attention_weights),
                64,
            )
        return out.to(value.dtype)
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants [-1, 1] coordinates and one (batch x head) image per sample set.
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B*H, Dh, Q, L*P) weighted by (B*H, 1, Q, L*P)
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (sampled * weights).sum(-1).view(batch, heads * head_dim, queries)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with its projections (Deformable DETR, section 4.1)."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        """
        Args:
            d_model: query and value width.
            n_levels: feature levels attended.
            n_heads: attention heads; ``d_model`` must be divisible by it.
            n_points: sampling points per head and level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start at zero weight with a bias that spreads each head's points along its own
        # direction, growing with the point index: the layer starts as a fixed dilated pattern.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (B, Q, D) queries (with their positional part added).
            reference: (B, Q, L, 2) reference points (x, y) or (B, Q, L, 4) reference boxes
                (cx, cy, w, h), in [0, 1] of each level's *padded* map.
            value: (B, S, D) flattened multi-level features.
            spatial_shapes: (L, 2) (height, width) per level.
            level_start_index: (L,) offset of each level in ``S``.
            padding_mask: (B, S) True on padding; padded values are zeroed so they read as
                outside the image.

        Returns:
            (B, Q, D).
        """
        batch, queries, _ = query.shape
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(batch, value.shape[1], self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points
        )
        if reference.shape[-1] == 2:
            # Offsets are in cells of each level.
            normalizer = spatial_shapes.flip(-1).to(offsets)  # (L, 2) as (w, h)
            locations = (
                reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None]
            )
        elif reference.shape[-1] == 4:
            # Offsets are in units of half the box size, spread over the points.
            locations = (
                reference[:, :, None, :, None, :2]
                + offsets / self.n_points * reference[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference must end in 2 or 4 coordinates, got {reference.shape}")
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)
