"""The anchor-box query decoder (DAB-DETR) with iterative box refinement and per-layer heads."""

from typing import Optional

import torch
from torch import Tensor, nn

from kd.modeling.detr.attention import build_memory_attention
from kd.modeling.detr.box_ops import inverse_sigmoid
from kd.modeling.detr.layers import MLP, FeedForward, prior_bias
from kd.modeling.detr.position_encoding import box_sine_embedding
from kd.modeling.detr.structures import DecoderOutput, DETREncoded

__all__ = ["DecoderLayer", "AnchorDecoder"]


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, attention to the tokens, FFN."""

    def __init__(
        self,
        cross_attn: nn.Module,
        d_model: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = cross_attn
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference: Tensor,
        tokens: DETREncoded,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            tgt: (B, N, D) content queries.
            query_pos: (B, N, D) positional queries (from the anchors).
            reference: (B, N, 4) anchors, cxcywh in [0, 1] of each image.
            tokens: the encoder memory.
            attn_mask: (N, N) or (B * heads, N, N) bool, True where self-attention is blocked.
        """
        q = tgt + query_pos
        out, _ = self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm1(tgt + self.dropout1(out))
        out = self.cross_attn(tgt + query_pos, reference, tokens)
        tgt = self.norm2(tgt + self.dropout2(out))
        return self.ffn(tgt)


class AnchorDecoder(nn.Module):
    """Decodes (content, anchor box) queries; each layer re-embeds and refines the boxes.

    Every layer ``l``:
      1. positional query = MLP(sine(anchor_l)) — :meth:`anchors_to_queries`;
      2. the layer updates the content;
      3. its own heads predict class logits and a box delta in logit space,
         ``box_l = sigmoid(delta_l + logit(anchor_l))``;
      4. ``anchor_{l+1} = box_l.detach()`` (each layer is trained to refine, not to move the
         previous layer's prediction).
    """

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
        num_classes: int,
    ):
        """
        Args:
            num_layers: decoder layers, each with its own class and box heads.
            d_model, nheads, dim_feedforward, dropout: transformer sizes.
            attention: "standard" or "deformable" attention to the tokens.
            num_levels, n_points: deformable attention layout.
            num_classes: K, the class logits per query.
        """
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            DecoderLayer(
                build_memory_attention(attention, d_model, nheads, dropout, num_levels, n_points),
                d_model,
                nheads,
                dim_feedforward,
                dropout,
            )
            for _ in range(num_layers)
        )
        self.anchor_encoder = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model)
        self.class_heads = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_layers))
        for head in self.class_heads:
            nn.init.constant_(head.bias, prior_bias(0.01))
        for head in self.box_heads:
            # Zero deltas: every layer starts by predicting its anchor unchanged.
            nn.init.constant_(head.layers[-1].weight, 0.0)
            nn.init.constant_(head.layers[-1].bias, 0.0)

    def anchors_to_queries(self, anchors: Tensor) -> Tensor:
        """Positional queries of anchor boxes: sine embedding of (cy, cx, w, h), then an MLP.

        Args:
            anchors: (..., 4) cxcywh boxes in [0, 1] of each image.

        Returns:
            (..., D).
        """
        return self.anchor_encoder(box_sine_embedding(anchors, self.d_model // 2))

    def forward(
        self,
        content: Tensor,
        anchors: Tensor,
        tokens: DETREncoded,
        attn_mask: Optional[Tensor] = None,
    ) -> DecoderOutput:
        """
        Args:
            content: (B, N, D) initial content queries.
            anchors: (B, N, 4) initial anchors, cxcywh in [0, 1] of each image. Not detached:
                learned anchors get gradients through the first layer.
            tokens: the encoder memory.
            attn_mask: self-attention mask, True where blocked (see :class:`DecoderLayer`).
        """
        tgt, reference = content, anchors
        logits, boxes, hidden = [], [], []
        for layer, class_head, box_head in zip(self.layers, self.class_heads, self.box_heads):
            tgt = layer(tgt, self.anchors_to_queries(reference), reference, tokens, attn_mask)
            h = self.norm(tgt)
            new_boxes = (box_head(h) + inverse_sigmoid(reference)).sigmoid()
            logits.append(class_head(h))
            boxes.append(new_boxes)
            hidden.append(h)
            reference = new_boxes.detach()
        return DecoderOutput(torch.stack(logits), torch.stack(boxes), torch.stack(hidden))
