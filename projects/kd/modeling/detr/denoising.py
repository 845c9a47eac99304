"""Contrastive denoising queries (DINO, Zhang et al. 2022) and the mask that hides them.

In training, noised copies of the GT boxes are decoded next to the detection queries. Each
denoising group holds one positive (small noise: reconstruct the GT) and one negative (larger
noise: predict "no object") per GT box. Queries of a group see only their own group (and the
detection queries); the detection queries never see any denoising query, so at test time, without
them, the detection path computes exactly what it was trained to compute.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["DenoisingMeta", "DenoisingQueries"]


@dataclass
class DenoisingMeta:
    """Layout of the denoising queries, which come before the detection queries.

    Query ``g * group_size + j`` is the positive and ``g * group_size + max_gt + j`` the negative
    of GT ``j`` in group ``g``. Slots beyond an image's own GT count are padding.
    """

    num_groups: int
    max_gt: int
    gt_counts: List[int]

    @property
    def group_size(self) -> int:
        return 2 * self.max_gt

    @property
    def num_queries(self) -> int:
        return self.num_groups * self.group_size

    def positive_indices(self) -> List[Tuple[Tensor, Tensor]]:
        """Per image ``(query_indices, gt_indices)`` of the positive queries, like a matcher."""
        out = []
        for n in self.gt_counts:
            gt = torch.arange(n, dtype=torch.int64)
            groups = torch.arange(self.num_groups, dtype=torch.int64)[:, None]
            out.append(((groups * self.group_size + gt).flatten(), gt.repeat(self.num_groups)))
        return out


class DenoisingQueries(nn.Module):
    """Builds the denoising queries of a batch and the decoder's self-attention mask."""

    def __init__(
        self,
        *,
        num_classes: int,
        d_model: int,
        nheads: int,
        max_queries: int,
        label_noise_ratio: float,
        box_noise_scale: float,
    ):
        """
        Args:
            num_classes: K; noised labels are drawn from it.
            d_model: width of the label embedding that forms the queries' content.
            nheads: decoder heads (the mask is per image and head).
            max_queries: upper bound on the denoising queries per image.
            label_noise_ratio: a label is replaced by a random class with half this probability.
            box_noise_scale: corner noise scale relative to half the box size.
        """
        super().__init__()
        self.num_classes = num_classes
        self.nheads = nheads
        self.max_queries = max_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_embed = nn.Embedding(num_classes, d_model)

    def _noised(self, labels: Tensor, boxes: Tensor, negative: Tensor) -> Tuple[Tensor, Tensor]:
        if self.label_noise_ratio > 0:
            flip = torch.rand(labels.shape, device=labels.device) < self.label_noise_ratio * 0.5
            random_labels = torch.randint_like(labels, 0, self.num_classes)
            labels = torch.where(flip, random_labels, labels)
        if self.box_noise_scale > 0:
            half = boxes[:, 2:] / 2
            diff = torch.cat([half, half], dim=1)
            sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
            magnitude = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
            xyxy = box_cxcywh_to_xyxy(boxes) + sign * magnitude * diff * self.box_noise_scale
            boxes = box_xyxy_to_cxcywh(xyxy.clamp(0.0, 1.0))
        return labels, boxes

    def forward(
        self, targets: List[Dict[str, Tensor]]
    ) -> Optional[Tuple[Tensor, Tensor, Tensor, DenoisingMeta]]:
        """
        Args:
            targets: per image ``{"labels": (T,), "boxes": (T, 4) cxcywh normalised}``.

        Returns:
            None when the batch has no GT box; else ``(content (B, P, D), anchors (B, P, 4),
            valid (B, P) bool, meta)``.
        """
        counts = [len(t["labels"]) for t in targets]
        max_gt = max(counts, default=0)
        if max_gt == 0:
            return None
        groups = max(1, self.max_queries // (2 * max_gt))
        meta = DenoisingMeta(num_groups=groups, max_gt=max_gt, gt_counts=counts)
        weight = self.label_embed.weight
        batch, size = len(targets), meta.num_queries
        content = weight.new_zeros(batch, size, weight.shape[1])
        # Padding slots get a harmless box; the mask hides them from every other query.
        anchors = weight.new_full((batch, size, 4), 0.5)
        valid = torch.zeros(batch, size, dtype=torch.bool, device=weight.device)
        for b, (target, n) in enumerate(zip(targets, counts)):
            if n == 0:
                continue
            # Slot layout (group, positive/negative, gt), flattened in this order.
            g = torch.arange(groups, device=weight.device)[:, None, None]
            s = torch.arange(2, device=weight.device)[None, :, None]
            j = torch.arange(n, device=weight.device)[None, None, :]
            slots = (g * meta.group_size + s * max_gt + j).flatten()
            negative = (s == 1).expand(groups, 2, n).flatten()
            labels, boxes = self._noised(
                target["labels"].repeat(2 * groups), target["boxes"].repeat(2 * groups, 1), negative
            )
            content[b, slots] = self.label_embed(labels)
            anchors[b, slots] = boxes.to(anchors.dtype)
            valid[b, slots] = True
        return content, anchors, valid, meta

    def attention_mask(self, meta: DenoisingMeta, valid: Tensor, num_matching: int) -> Tensor:
        """Self-attention mask of ``[denoising queries, detection queries]``.

        Args:
            meta: the layout from :meth:`forward`.
            valid: (B, P) which denoising slots hold a real query.
            num_matching: detection queries after the denoising ones.

        Returns:
            (B * nheads, P + N, P + N) bool, True where attention is blocked.
        """
        size, gsize = meta.num_queries, meta.group_size
        total = size + num_matching
        group = torch.arange(size, device=valid.device) // gsize
        mask = torch.zeros(total, total, dtype=torch.bool, device=valid.device)
        mask[:size, :size] = group[:, None] != group[None, :]
        mask[size:, :size] = True
        mask = mask[None].repeat(valid.shape[0], 1, 1)
        # Padding slots are hidden from every query but themselves (a row needs one visible key).
        mask[:, :, :size] |= ~valid[:, None, :]
        idx = torch.arange(size, device=valid.device)
        mask[:, idx, idx] = False
        return mask.repeat_interleave(self.nheads, dim=0)
