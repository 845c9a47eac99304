"""From backbone features to D-channel maps with padding masks, one per transformer level."""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["InputProjection", "level_padding_mask"]


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics ignore the batch padding, which it sets to zero.

    Plain GroupNorm would average over the padding, so an image's features would depend on the
    size of the largest image in its batch.
    """

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x: (B, C, H, W).
            mask: (B, H, W) bool, True on padding; None for plain GroupNorm.
        """
        if mask is None:
            return super().forward(x)
        b, c, h, w = x.shape
        valid = (~mask).to(x.dtype)[:, None, None]  # (B, 1, 1, H, W)
        grouped = x.view(b, self.num_groups, c // self.num_groups, h, w)
        count = valid.sum((2, 3, 4), keepdim=True) * (c // self.num_groups)
        mean = (grouped * valid).sum((2, 3, 4), keepdim=True) / count
        var = ((grouped - mean) ** 2 * valid).sum((2, 3, 4), keepdim=True) / count
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).view(b, c, h, w)
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y.masked_fill(mask[:, None], 0.0)


def _group_norm(channels: int) -> MaskedGroupNorm:
    # 32 groups as in Deformable DETR; narrower test models fall back to a divisor of the width.
    return MaskedGroupNorm(math.gcd(32, channels), channels)


class InputProjection(nn.Module):
    """1x1 conv + GroupNorm per backbone level, then stride-2 3x3 convs for the extra levels.

    The first extra level is computed from the last *backbone* output and each further one from
    the previous extra level, as in Deformable DETR. Padding is zeroed before every convolution
    and ignored by the norms, so the valid cells of a level are what the image alone would give.
    """

    def __init__(self, in_channels: Sequence[int], hidden_dim: int, num_levels: int):
        """
        Args:
            in_channels: channels of each backbone output used, finest first.
            hidden_dim: output channels D.
            num_levels: output levels, at least ``len(in_channels)``.
        """
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(
                f"NUM_FEATURE_LEVELS ({num_levels}) must be at least the number of IN_FEATURES "
                f"({len(in_channels)})"
            )
        self.convs = nn.ModuleList(nn.Conv2d(c, hidden_dim, 1) for c in in_channels)
        prev = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            self.convs.append(nn.Conv2d(prev, hidden_dim, 3, stride=2, padding=1))
            prev = hidden_dim
        self.norms = nn.ModuleList(_group_norm(hidden_dim) for _ in range(num_levels))
        self.num_backbone_levels = len(in_channels)
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.constant_(conv.bias, 0)

    def forward(
        self,
        features: List[Tensor],
        image_sizes: Sequence[Tuple[int, int]],
        padded_size: Tuple[int, int],
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            features: backbone maps, finest first, ``len(in_channels)`` of them.
            image_sizes: (h, w) of each image before padding.
            padded_size: (H, W) of the padded batch.

        Returns:
            ``num_levels`` maps (B, D, H_l, W_l) and their padding masks (B, H_l, W_l).
        """
        maps, masks = [], []

        def project(level: int, x: Tensor, mask_in: Tensor) -> Tensor:
            x = self.convs[level](x.masked_fill(mask_in[:, None], 0.0))
            mask = level_padding_mask(image_sizes, padded_size, tuple(x.shape[-2:])).to(x.device)
            maps.append(self.norms[level](x, mask))
            masks.append(mask)
            return maps[-1]

        for level, f in enumerate(features):
            mask_in = level_padding_mask(image_sizes, padded_size, tuple(f.shape[-2:]))
            project(level, f, mask_in.to(f.device))
        x, mask_in = features[-1], masks[self.num_backbone_levels - 1]
        for level in range(self.num_backbone_levels, len(self.convs)):
            x = project(level, x, mask_in)
            mask_in = masks[-1]
        return maps, masks


def level_padding_mask(
    image_sizes: Sequence[Tuple[int, int]],
    padded_size: Tuple[int, int],
    level_size: Tuple[int, int],
) -> Tensor:
    """Which cells of a feature level lie in the batch padding.

    Computed from the image sizes rather than by resampling the pixel mask, so that a level's valid
    region is exactly the cells the image's own (unpadded) forward pass would produce,
    ``ceil(size * level_size / padded_size)``.

    Args:
        image_sizes: (h, w) of each image before padding.
        padded_size: (H, W) of the padded batch.
        level_size: (H_l, W_l) of the feature level.

    Returns:
        (B, H_l, W_l) bool, True on padding.
    """
    # Python ints throughout: under tracing (tools/export_student.py) sizes may be 0-d tensors,
    # and ONNX's integer Div truncates where Python's // floors (a ceil by -(-a // b) breaks).
    (ph, pw), (lh, lw) = (int(s) for s in padded_size), (int(s) for s in level_size)
    rows = torch.arange(lh)
    cols = torch.arange(lw)
    masks = []
    for h, w in image_sizes:
        valid_h = min(lh, max(1, (int(h) * lh + ph - 1) // ph))
        valid_w = min(lw, max(1, (int(w) * lw + pw - 1) // pw))
        masks.append((rows[:, None] >= valid_h) | (cols[None, :] >= valid_w))
    return torch.stack(masks)
