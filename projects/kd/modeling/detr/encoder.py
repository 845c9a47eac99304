"""The transformer encoder: flatten the feature levels into tokens and refine them."""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from kd.modeling.detr.attention import build_memory_attention
from kd.modeling.detr.layers import FeedForward
from kd.modeling.detr.ms_deform_attn import level_shapes, with_level_shapes
from kd.modeling.detr.position_encoding import mask_sine_embedding
from kd.modeling.detr.structures import DETREncoded

__all__ = ["flatten_levels", "encoder_reference_points", "EncoderLayer", "DETREncoder"]


def flatten_levels(
    maps: List[Tensor],
    masks: List[Tensor],
    level_embed: Optional[Tensor],
    image_sizes: List[Tuple[int, int]],
    temperature: float,
) -> DETREncoded:
    """Flatten the level maps into one token sequence with positions, masks and level layout.

    Args:
        maps: (B, D, H_l, W_l) per level.
        masks: (B, H_l, W_l) bool per level, True on padding.
        level_embed: (L, D) learned embedding added to each level's positions, or None.
        image_sizes: (h, w) of each image before padding.
        temperature: of the sine position embedding.

    Returns:
        A :class:`DETREncoded` whose ``memory`` holds the (not yet encoded) tokens.
    """
    dim = maps[0].shape[1]
    tokens, pos, pads, shapes, ratios = [], [], [], [], []
    for level, (x, mask) in enumerate(zip(maps, masks)):
        h, w = x.shape[-2:]
        shapes.append((h, w))
        tokens.append(x.flatten(2).transpose(1, 2))
        p = mask_sine_embedding(mask, dim // 2, temperature).to(x.dtype)
        p = p.flatten(2).transpose(1, 2)
        pos.append(p if level_embed is None else p + level_embed[level])
        pads.append(mask.flatten(1))
        valid_h = (~mask[:, :, 0]).sum(1).to(x.dtype) / h
        valid_w = (~mask[:, 0, :]).sum(1).to(x.dtype) / w
        ratios.append(torch.stack([valid_w, valid_h], dim=-1))
    device = maps[0].device
    spatial_shapes = with_level_shapes(shapes, device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return DETREncoded(
        memory=torch.cat(tokens, 1),
        pos=torch.cat(pos, 1),
        padding_mask=torch.cat(pads, 1),
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        valid_ratios=torch.stack(ratios, 1),
        image_sizes=list(image_sizes),
    )


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Cell centres as reference points, relative to each image's valid region.

    Args:
        spatial_shapes: (L, 2) (height, width) per level.
        valid_ratios: (B, L, 2) (w, h) fraction of each level that is image.

    Returns:
        (B, S, 2) (x, y); values above 1 fall in the padding.
    """
    refs = []
    for level, (h, w) in enumerate(level_shapes(spatial_shapes)):
        ys = torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
        xs = torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
        y = ys[None, :, None] / (valid_ratios[:, level, 1, None, None] * h)
        x = xs[None, None, :] / (valid_ratios[:, level, 0, None, None] * w)
        refs.append(torch.stack(torch.broadcast_tensors(x, y), dim=-1).flatten(1, 2))
    return torch.cat(refs, 1)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: token self-attention (standard or deformable), then FFN."""

    def __init__(self, attention: nn.Module, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = attention
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)

    def forward(self, tokens: DETREncoded, reference: Tensor) -> Tensor:
        x = tokens.memory
        x = self.norm(x + self.dropout(self.self_attn(x + tokens.pos, reference, tokens)))
        return self.ffn(x)


class DETREncoder(nn.Module):
    """Flattens the level maps (adding position and level embeddings) and encodes the tokens."""

    def __init__(
        self,
        *,
        num_layers: int,
        d_model: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
        attention: str,
        num_levels: int,
        n_points: int,
        pe_temperature: float,
    ):
        """
        Args:
            num_layers: encoder layers (0: the tokens pass through unchanged).
            d_model, nheads, dim_feedforward, dropout: transformer sizes.
            attention: "standard" or "deformable".
            num_levels: feature levels.
            n_points: deformable sampling points per head and level.
            pe_temperature: temperature of the tokens' sine position embedding.
        """
        super().__init__()
        # Without encoder layers, deformable attention never reads the positions: no level
        # embedding then, so that no parameter goes unused (DDP refuses those).
        if num_layers > 0 or attention == "standard":
            self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
            nn.init.normal_(self.level_embed)
        else:
            self.register_parameter("level_embed", None)
        self.pe_temperature = pe_temperature
        self.layers = nn.ModuleList(
            EncoderLayer(
                build_memory_attention(attention, d_model, nheads, dropout, num_levels, n_points),
                d_model,
                dim_feedforward,
                dropout,
            )
            for _ in range(num_layers)
        )

    def forward(
        self, maps: List[Tensor], masks: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> DETREncoded:
        """
        Args:
            maps: (B, D, H_l, W_l) per level.
            masks: (B, H_l, W_l) bool per level, True on padding.
            image_sizes: (h, w) of each image before padding.
        """
        tokens = flatten_levels(maps, masks, self.level_embed, image_sizes, self.pe_temperature)
        if not self.layers:
            return tokens
        reference = encoder_reference_points(tokens.spatial_shapes, tokens.valid_ratios)
        for layer in self.layers:
            tokens = tokens.replace(memory=layer(tokens, reference))
        return tokens
