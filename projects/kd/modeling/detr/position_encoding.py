"""Sine position encodings of feature-map cells and of anchor boxes.

Both encode coordinates normalised to the image's own (unpadded) size with the same sine code, so
that a box's positional query and the positions of the cells it covers live in one space.
"""

import math

import torch
from torch import Tensor

__all__ = ["sine_encode", "mask_sine_embedding", "box_sine_embedding"]


def sine_encode(coords: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Transformer sine code of each coordinate, the codes concatenated.

    Args:
        coords: (..., n) coordinates, normalised so that [0, 1] spans the image.
        num_feats: code length per coordinate (even).
        temperature: the longest wavelength, in units of ``2 * pi`` image sizes.

    Returns:
        (..., n * num_feats): for each coordinate, interleaved ``sin`` / ``cos`` of
        ``2 * pi * coord / temperature ** (2 * (i // 2) / num_feats)``.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = coords.float()[..., None] * (2 * math.pi) / dim_t
    code = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1)
    return code.flatten(-2).flatten(-2).to(coords.dtype)


def mask_sine_embedding(mask: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Position embedding of a padded feature map (DETR's normalised ``PositionEmbeddingSine``).

    Args:
        mask: (B, H, W) bool, True on padding.
        num_feats: code length per axis; the embedding has ``2 * num_feats`` channels.
        temperature: see :func:`sine_encode`.

    Returns:
        (B, 2 * num_feats, H, W): the code of (y, x), the cell centre divided by the image's valid
        extent on that level, so a cell's embedding does not depend on how much padding follows.
    """
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6)
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6)
    code = sine_encode(torch.stack([y, x], dim=-1), num_feats, temperature)
    return code.permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """DAB-DETR's sine embedding of anchor boxes.

    Args:
        boxes: (..., 4) cxcywh boxes normalised to [0, 1].
        num_feats: code length per coordinate (the model uses ``D / 2``).
        temperature: see :func:`sine_encode`.

    Returns:
        (..., 4 * num_feats): codes of (cy, cx, w, h), the centre in the same (y, x) order as
        :func:`mask_sine_embedding`.
    """
    cx, cy, w, h = boxes.unbind(-1)
    return sine_encode(torch.stack([cy, cx, w, h], dim=-1), num_feats, temperature)
