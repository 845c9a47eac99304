"""Set-prediction losses of the DETR family: sigmoid focal classification, L1 and GIoU."""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor, nn

from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from kd.modeling.detr.matcher import HungarianMatcher
from kd.modeling.detr.structures import DecoderOutput, DETRDetections

__all__ = ["num_boxes_across_ranks", "SetCriterion"]

Indices = List[Tuple[Tensor, Tensor]]


def num_boxes_across_ranks(targets: List[Dict[str, Tensor]], device: torch.device) -> float:
    """The mean number of GT boxes per rank (at least 1), the loss normaliser.

    Averaging over ranks gives every GPU the same normaliser, so the summed gradients equal those
    of one large batch.
    """
    count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = comm.get_world_size()
    if world > 1:
        dist.all_reduce(count)
    return max(count.item() / world, 1.0)


class SetCriterion(nn.Module):
    """Matches each set of predictions to the GT and computes its weighted losses.

    Loss names: ``loss_{class,bbox,giou}`` for the last decoder layer, with the suffix ``_{i}`` for
    decoder layer i < last, ``_enc`` for the two-stage proposals and ``_dn`` / ``_dn_{i}`` for the
    denoising queries. Every value is already multiplied by its weight.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            num_classes: K.
            matcher: assigns predictions to GT boxes.
            class_weight, bbox_weight, giou_weight: loss weights.
            focal_alpha, focal_gamma: of the sigmoid focal loss.
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def set_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: List[Dict[str, Tensor]],
        indices: Indices,
        num_boxes: float,
    ) -> Dict[str, Tensor]:
        """Losses of one set of predictions under a given assignment.

        Args:
            logits: (B, N, K); boxes: (B, N, 4) cxcywh normalised.
            targets: per image ``{"labels", "boxes"}``.
            indices: per image ``(prediction_indices, target_indices)``.
            num_boxes: the normaliser.

        Returns:
            ``{"loss_class", "loss_bbox", "loss_giou"}``, weighted. Unmatched predictions count as
            background in the class loss only.
        """
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
        target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
        batch_idx, src_idx = batch_idx.to(logits.device), src_idx.to(logits.device)

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, labels] = 1.0
        loss_class = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        matched = boxes[batch_idx, src_idx]
        loss_bbox = (matched - target_boxes).abs().sum()
        giou = generalized_box_iou(box_cxcywh_to_xyxy(matched), box_cxcywh_to_xyxy(target_boxes))
        loss_giou = (1 - torch.diag(giou)).sum()
        return {
            "loss_class": self.class_weight * loss_class / num_boxes,
            "loss_bbox": self.bbox_weight * loss_bbox / num_boxes,
            "loss_giou": self.giou_weight * loss_giou / num_boxes,
        }

    def _per_layer(
        self,
        outputs: DecoderOutput,
        targets: List[Dict[str, Tensor]],
        num_boxes: float,
        suffix: str,
        indices: Optional[Indices] = None,
    ) -> Dict[str, Tensor]:
        losses = {}
        last = outputs.num_layers - 1
        for layer in range(outputs.num_layers):
            logits, boxes = outputs.logits[layer], outputs.boxes[layer]
            layer_indices = indices
            if layer_indices is None:
                layer_indices = self.matcher(logits, boxes, targets)
            name = suffix + ("" if layer == last else f"_{layer}")
            for k, v in self.set_losses(logits, boxes, targets, layer_indices, num_boxes).items():
                losses[k + name] = v
        return losses

    def forward(
        self, detections: DETRDetections, targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """
        Args:
            detections: the detection path's outputs.
            targets: per image ``{"labels": (T,) long, "boxes": (T, 4) cxcywh normalised}``.
        """
        num_boxes = num_boxes_across_ranks(targets, detections.queries.logits.device)
        losses = self._per_layer(detections.queries, targets, num_boxes, "")
        if detections.proposal_logits is not None:
            logits, boxes = detections.proposal_logits, detections.proposal_boxes
            indices = self.matcher(logits, boxes, targets)
            for k, v in self.set_losses(logits, boxes, targets, indices, num_boxes).items():
                losses[k + "_enc"] = v
        if detections.denoising is not None:
            meta = detections.denoising_meta
            losses.update(
                self._per_layer(
                    detections.denoising,
                    targets,
                    num_boxes * meta.num_groups,
                    "_dn",
                    indices=meta.positive_indices(),
                )
            )
        return losses
