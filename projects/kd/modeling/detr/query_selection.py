"""Encoder query selection ("two-stage"): the best encoder proposals become the decoder's anchors.

Every valid token proposes a box around its cell (size ``0.05 * 2**level`` of the image, as in
Deformable DETR), refined by a box head and scored by a class head; the top ``num_queries`` per
image, by their best class score, become the detection queries' anchors (DINO's mixed query
selection: the anchors come from the encoder, the content queries stay learned).
"""

import torch
from torch import nn

from kd.modeling.detr.box_ops import inverse_sigmoid
from kd.modeling.detr.layers import MLP, prior_bias
from kd.modeling.detr.ms_deform_attn import level_shapes
from kd.modeling.detr.structures import DETREncoded

__all__ = ["encoder_proposals", "QuerySelection"]


def encoder_proposals(tokens: DETREncoded):
    """One anchor box per token, relative to the image's valid region.

    Returns:
        boxes: (B, S, 4) cxcywh.
        valid: (B, S) bool: the token is image and its box lies well inside (0.01, 0.99).
    """
    boxes = []
    ratios = tokens.valid_ratios
    for level, (h, w) in enumerate(level_shapes(tokens.spatial_shapes)):
        ys = torch.arange(h, dtype=ratios.dtype, device=ratios.device) + 0.5
        xs = torch.arange(w, dtype=ratios.dtype, device=ratios.device) + 0.5
        y = (ys[None, :, None] / (ratios[:, level, 1, None, None] * h)).expand(-1, h, w)
        x = (xs[None, None, :] / (ratios[:, level, 0, None, None] * w)).expand(-1, h, w)
        size = torch.full_like(x, 0.05 * 2.0**level)
        boxes.append(torch.stack([x, y, size, size], dim=-1).flatten(1, 2))
    boxes = torch.cat(boxes, 1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~tokens.padding_mask
    return boxes, valid


class QuerySelection(nn.Module):
    """Scores and refines the encoder proposals and keeps the top ones per image."""

    def __init__(self, d_model: int, num_classes: int, num_queries: int):
        """
        Args:
            d_model: token width.
            num_classes: K (class-specific scores, as in DINO).
            num_queries: proposals kept per image.
        """
        super().__init__()
        self.num_queries = num_queries
        self.output = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_head = MLP(d_model, d_model, 4, 3)
        nn.init.constant_(self.class_head.bias, prior_bias(0.01))
        nn.init.constant_(self.box_head.layers[-1].weight, 0.0)
        nn.init.constant_(self.box_head.layers[-1].bias, 0.0)

    def forward(self, tokens: DETREncoded) -> DETREncoded:
        """
        Returns:
            ``tokens`` with ``anchors`` (detached), ``proposal_logits`` and ``proposal_boxes`` set.
        """
        proposals, valid = encoder_proposals(tokens)
        memory = tokens.memory.masked_fill(~valid[..., None], 0.0)
        memory = self.norm(self.output(memory))
        logits = self.class_head(memory)
        # Invalid tokens are never selected while enough valid ones exist (score -inf).
        scores = logits.max(-1).values.masked_fill(~valid, float("-inf"))
        if scores.shape[1] < self.num_queries:
            raise ValueError(
                f"two-stage query selection keeps NUM_QUERIES={self.num_queries} proposals per "
                f"image but the feature levels have only {scores.shape[1]} tokens; use larger "
                "images, more levels or fewer queries"
            )
        index = scores.topk(self.num_queries, dim=1).indices
        selected_memory = memory.gather(1, index[..., None].expand(-1, -1, memory.shape[-1]))
        selected_proposals = proposals.gather(1, index[..., None].expand(-1, -1, 4))
        # Heads run on the selected tokens only: the same numbers, far less work than all S.
        boxes = (self.box_head(selected_memory) + inverse_sigmoid(selected_proposals)).sigmoid()
        selected_logits = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        return tokens.replace(
            anchors=boxes.detach(), proposal_logits=selected_logits, proposal_boxes=boxes
        )
