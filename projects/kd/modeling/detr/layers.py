"""Small building blocks shared by the encoder, the decoder and the prediction heads."""

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "FeedForward", "prior_bias", "block_diagonal_mask"]


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's box head and DAB-DETR's anchor encoder)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class FeedForward(nn.Module):
    """The post-norm feed-forward block of a transformer layer: ``norm(x + ffn(x))``."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear2(self.dropout1(F.relu(self.linear1(x))))
        return self.norm(x + self.dropout2(y))


def prior_bias(prior_prob: float = 0.01) -> float:
    """Classifier bias that starts every sigmoid at ``prior_prob`` (RetinaNet's focal-loss init)."""
    return -math.log((1 - prior_prob) / prior_prob)


def block_diagonal_mask(sizes: List[int], device=None):
    """Self-attention mask that keeps consecutive query groups from seeing each other.

    Args:
        sizes: the number of queries of each group, in order.

    Returns:
        (N, N) bool, N = sum(sizes); True where attention is *blocked* (``nn.MultiheadAttention``).
    """
    total = sum(sizes)
    mask = torch.ones(total, total, dtype=torch.bool, device=device)
    start = 0
    for size in sizes:
        mask[start : start + size, start : start + size] = False
        start += size
    return mask
