"""One-to-one assignment of predictions to ground truth by minimum total cost (Hungarian)."""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """``cost = w_class * focal_cost + w_bbox * L1 + w_giou * (-GIoU)`` (Deformable DETR / DINO)."""

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            cost_class: weight of the classification cost.
            cost_bbox: weight of the L1 distance of normalised cxcywh boxes.
            cost_giou: weight of the negative GIoU.
            focal_alpha, focal_gamma: of the focal-style classification cost, the difference of
                the focal loss of "positive" and "negative" for the target class.
        """
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(
        self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor
    ) -> Tensor:
        """
        Args:
            logits: (N, K) one image's class logits.
            boxes: (N, 4) its predicted boxes (cxcywh, normalised).
            labels: (T,) GT classes.
            target_boxes: (T, 4) GT boxes (cxcywh, normalised).

        Returns:
            (N, T) cost of assigning prediction i to target j.
        """
        prob = logits.sigmoid()[:, labels]
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob**g * -(1 - prob + 1e-8).log()
        pos = a * (1 - prob) ** g * -(prob + 1e-8).log()
        cost_bbox = torch.cdist(boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes)
        )
        return (
            self.cost_class * (pos - neg) + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        )

    @torch.no_grad()
    def forward(
        self, logits: Tensor, boxes: Tensor, targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            logits: (B, N, K) class logits.
            boxes: (B, N, 4) boxes, cxcywh normalised.
            targets: per image ``{"labels": (T,) long, "boxes": (T, 4) cxcywh normalised}``.

        Returns:
            Per image ``(prediction_indices, target_indices)``, int64 tensors of length
            ``min(N, T)``, sorted by prediction index.
        """
        out = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(
                logits[b].float(), boxes[b].float(), target["labels"], target["boxes"].float()
            )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return out
