"""Attention from queries to the flattened multi-level feature tokens, in two interchangeable kinds.

Both take the same arguments, so the encoder and decoder layers do not know which one they hold:
``attn(query, reference, tokens)`` where ``query`` already includes its positional part,
``reference`` holds boxes or points relative to each image's unpadded size, and ``tokens`` is a
:class:`~kd.modeling.detr.structures.DETREncoded` whose ``memory`` holds the keys/values.
"""

from torch import Tensor, nn

from kd.modeling.detr.ms_deform_attn import MSDeformAttn
from kd.modeling.detr.structures import DETREncoded

__all__ = ["StandardAttention", "DeformableAttention", "build_memory_attention"]


class StandardAttention(nn.Module):
    """Multi-head attention over every token (DETR / DAB-DETR); ``reference`` is unused.

    The keys carry the tokens' sine position embedding, which shares its code with the queries'
    anchor embedding, so the attention can prefer the cells inside a query's box.
    """

    def __init__(self, d_model: int, nheads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)

    def forward(self, query: Tensor, reference: Tensor, tokens: DETREncoded) -> Tensor:
        keys = tokens.memory + tokens.pos
        out, _ = self.attn(
            query, keys, tokens.memory, key_padding_mask=tokens.padding_mask, need_weights=False
        )
        return out


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention around each query's reference point or box."""

    def __init__(self, d_model: int, nheads: int, n_levels: int, n_points: int):
        super().__init__()
        self.attn = MSDeformAttn(d_model, n_levels, nheads, n_points)

    def forward(self, query: Tensor, reference: Tensor, tokens: DETREncoded) -> Tensor:
        # Image-relative references become coordinates of each level's padded map; a box's size
        # scales the same way as its centre.
        ratios = tokens.valid_ratios[:, None]  # (B, 1, L, 2)
        if reference.shape[-1] == 4:
            ratios = ratios.repeat(1, 1, 1, 2)
        reference = reference[:, :, None] * ratios
        return self.attn(
            query,
            reference,
            tokens.memory,
            tokens.spatial_shapes,
            tokens.level_start_index,
            tokens.padding_mask,
        )


def build_memory_attention(
    kind: str, d_model: int, nheads: int, dropout: float, n_levels: int, n_points: int
) -> nn.Module:
    """
    Args:
        kind: ``MODEL.DETR.ATTENTION``: "standard" or "deformable".
        d_model, nheads: width and heads.
        dropout: attention dropout (standard attention only, as in the papers).
        n_levels, n_points: levels and points per head and level (deformable only).
    """
    if kind == "standard":
        return StandardAttention(d_model, nheads, dropout)
    if kind == "deformable":
        return DeformableAttention(d_model, nheads, n_levels, n_points)
    raise ValueError(f"MODEL.DETR.ATTENTION must be 'standard' or 'deformable', got {kind!r}")
