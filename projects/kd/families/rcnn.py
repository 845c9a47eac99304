"""The R-CNN family (detectron2's ``GeneralizedRCNN`` with ``StandardROIHeads``): its training
step run step by step, so that a distiller reads what the student's own losses use (the RPN's
sampled anchors, the ROI head's sampled proposals), and its box head asked at given boxes.

The step is detectron2's own, split where distillers need to look in: :func:`rpn_step` is
``RPN.forward`` in training and :func:`roi_step` ``StandardROIHeads.forward`` in training (same
calls, same order, so the same random sampling and the same losses). Every R-CNN distiller (Chen
et al., GID on Faster R-CNN, DETR -> Faster R-CNN) runs the student through these two, and the
probes (:mod:`kd.probes`) ask a teacher's or student's box head through
:func:`rcnn_box_predictions`.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from detectron2.layers import cat
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from kd.families.dense import DenseOutputs, DenseView, matcher_foreground
from kd.families.registry import FAMILY_REGISTRY
from kd.roi_align import pool_levels

__all__ = [
    "FasterRCNNFamily",
    "RPNView",
    "RPNStep",
    "ROIStep",
    "is_faster_rcnn",
    "check_faster_rcnn",
    "rpn_dense_outputs",
    "flatten_rpn_outputs",
    "rpn_head_outputs",
    "rpn_step",
    "roi_step",
    "rcnn_box_predictions",
    "rcnn_decoded_boxes",
]


def is_faster_rcnn(model: nn.Module) -> bool:
    """A two-stage detector with one box head: ``StandardROIHeads``, not a cascade."""
    roi = getattr(model, "roi_heads", None)
    return isinstance(roi, StandardROIHeads) and not isinstance(roi, CascadeROIHeads)


def check_faster_rcnn(model: nn.Module, who: str, what: str) -> None:
    """Refuse a model that is not a Faster R-CNN, in one line.

    Args:
        model: the teacher or the student.
        who: "teacher" or "student".
        what: the distiller's name, for the message.
    """
    if not is_faster_rcnn(model):
        raise ValueError(
            f"{what} needs Faster R-CNN models (GeneralizedRCNN with StandardROIHeads); the {who} "
            f"is {type(model).__name__} with {type(getattr(model, 'roi_heads', None)).__name__}"
        )


class RPNView(DenseView):
    """A Faster R-CNN's dense part, its RPN: anchors, objectness (one class) and deltas, labels
    assigned by the RPN's ``anchor_matcher``. Its training step is the whole model's (RPN and
    ROI heads: :func:`rpn_step`, :func:`roi_step`)."""

    def __init__(self, model: nn.Module):
        rpn = getattr(model, "proposal_generator", None)
        if rpn is None or not hasattr(rpn, "anchor_generator"):
            raise ValueError(
                f"{type(model).__name__} has no RPN (MODEL.PROPOSAL_GENERATOR.NAME 'RPN'): its "
                "dense predictions are the RPN's"
            )
        super().__init__(model, rpn)
        self.rpn = rpn

    @property
    def head_in_features(self) -> List[str]:
        return list(self.rpn.in_features)

    @property
    def instance_features(self) -> List[str]:
        return list(self.model.roi_heads.box_in_features)

    def outputs(self, features: Dict[str, Tensor], anchors: bool = False) -> DenseOutputs:
        logits, deltas = rpn_head_outputs(self.model, features)
        boxes = None
        if anchors:
            boxes = self.rpn.anchor_generator([features[f] for f in self.rpn.in_features])
        return DenseOutputs(cat(logits, dim=1)[..., None], cat(deltas, dim=1), boxes)

    def train_step(self, images, features, gt_instances):
        step = rpn_step(self.model, images, features, gt_instances)
        losses = dict(step.losses)
        losses.update(roi_step(self.model, features, step.proposals, gt_instances).losses)
        return losses, rpn_dense_outputs(step)

    def foreground(self, boxes, anchors, image_sizes):
        return matcher_foreground(self.rpn.anchor_matcher, boxes, Boxes.cat(anchors))


@FAMILY_REGISTRY.register()
class FasterRCNNFamily:
    """Faster R-CNN: detectron2's ``GeneralizedRCNN`` with ``StandardROIHeads``."""

    name = "Faster R-CNN"
    matches = staticmethod(is_faster_rcnn)
    dense_view = RPNView

    @staticmethod
    def num_classes(model: nn.Module) -> int:
        return model.roi_heads.num_classes


# ------------------------------------------------------------------------------------- RPN


class RPNStep(NamedTuple):
    """The RPN's part of a training step, its dense outputs flattened per level as its own losses
    take them."""

    anchors: List[Boxes]  # per level
    logits: List[Tensor]  # per level (N, Hi*Wi*A)
    deltas: List[Tensor]  # per level (N, Hi*Wi*A, B)
    gt_labels: List[Tensor]  # per image (A,): 1 object, 0 background, -1 not sampled
    gt_boxes: List[Tensor]  # per image (A, B): each anchor's matched ground truth box
    proposals: List[Instances]  # per image, for the ROI heads (no graph)
    losses: Dict[str, Tensor]


def rpn_dense_outputs(step: RPNStep) -> DenseOutputs:
    """The RPN's outputs of a training step as :class:`DenseOutputs` (all levels in a row)."""
    return DenseOutputs(cat(step.logits, dim=1)[..., None], cat(step.deltas, dim=1), step.anchors)


def flatten_rpn_outputs(rpn: nn.Module, logits: List[Tensor], deltas: List[Tensor]):
    """The RPN head's outputs as (N, Hi*Wi*A) and (N, Hi*Wi*A, B), the RPN's own layout."""
    logits = [score.permute(0, 2, 3, 1).flatten(1) for score in logits]
    box_dim = rpn.anchor_generator.box_dim
    deltas = [
        x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
        .permute(0, 3, 4, 1, 2)
        .flatten(1, -2)
        for x in deltas
    ]
    return logits, deltas


def rpn_head_outputs(
    model: nn.Module, features: Dict[str, Tensor]
) -> Tuple[List[Tensor], List[Tensor]]:
    """The model's RPN head on its features, flattened (:func:`flatten_rpn_outputs`)."""
    rpn = model.proposal_generator
    return flatten_rpn_outputs(rpn, *rpn.rpn_head([features[f] for f in rpn.in_features]))


def rpn_step(
    model: nn.Module,
    images: ImageList,
    features: Dict[str, Tensor],
    gt_instances: Optional[List[Instances]],
) -> RPNStep:
    """detectron2's ``RPN.forward`` in training, keeping what it computes on the way.

    Args:
        model: a GeneralizedRCNN in training mode.
        images: its preprocessed batch.
        features: its backbone outputs.
        gt_instances: per image, the ground truth in the input's coordinates.
    """
    rpn = model.proposal_generator
    feats = [features[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(feats)
    logits, deltas = flatten_rpn_outputs(rpn, *rpn.rpn_head(feats))
    gt_labels, gt_boxes = rpn.label_and_sample_anchors(anchors, gt_instances)
    losses = rpn.losses(anchors, logits, gt_labels, deltas, gt_boxes)
    with torch.no_grad():
        proposals = rpn.predict_proposals(anchors, logits, deltas, images.image_sizes)
    return RPNStep(anchors, logits, deltas, gt_labels, gt_boxes, proposals, losses)


# ------------------------------------------------------------------------------------- ROI


class ROIStep(NamedTuple):
    """The ROI heads' part of a training step."""

    proposals: List[Instances]  # per image, the sampled proposals with their gt fields
    scores: Tensor  # (P, K + 1) the box predictor's logits at them, all images in order
    deltas: Tensor  # (P, R * 4)
    losses: Dict[str, Tensor]  # the box (and mask / keypoint) losses


def roi_step(
    model: nn.Module,
    features: Dict[str, Tensor],
    proposals: List[Instances],
    gt_instances: Optional[List[Instances]],
) -> ROIStep:
    """detectron2's ``StandardROIHeads.forward`` in training, keeping the sampled proposals and
    the box predictor's outputs at them (a distiller's points and the student's answers there).

    Args:
        model: a GeneralizedRCNN in training mode.
        features: its backbone outputs.
        proposals: the RPN's proposals (:attr:`RPNStep.proposals`).
        gt_instances: per image, the ground truth.
    """
    roi = model.roi_heads
    sampled = roi.label_and_sample_proposals(proposals, gt_instances)
    scores, deltas = rcnn_box_predictions(model, features, [p.proposal_boxes for p in sampled])
    losses = roi.box_predictor.losses((scores, deltas), sampled)
    losses.update(roi._forward_mask(features, sampled))
    losses.update(roi._forward_keypoint(features, sampled))
    return ROIStep(sampled, scores, deltas, losses)


def rcnn_box_predictions(
    model: nn.Module, features: Dict[str, Tensor], boxes: List[Boxes]
) -> Tuple[Tensor, Tensor]:
    """The R-CNN box head at absolute boxes, as ``StandardROIHeads._forward_box`` runs it.

    Args:
        model: a GeneralizedRCNN with StandardROIHeads.
        features: its backbone outputs.
        boxes: per image, xyxy boxes in pixels of the model's input image.

    Returns:
        (scores, deltas): (N, K + 1) class logits and (N, R * 4) box deltas, N = all boxes of
        all images in order.
    """
    roi = model.roi_heads
    pooled = pool_levels(roi.box_pooler, [features[f] for f in roi.box_in_features], boxes)
    return roi.box_predictor(roi.box_head(pooled))


def rcnn_decoded_boxes(model: nn.Module, deltas: Tensor, boxes: Tensor) -> Tensor:
    """Decode box deltas with the model's own transform (its ``BBOX_REG_WEIGHTS``).

    Args:
        model: the R-CNN the deltas come from.
        deltas: (N, R * 4).
        boxes: (N, 4) the absolute xyxy boxes the deltas refine.

    Returns:
        (N, R, 4) absolute xyxy boxes, not clipped.
    """
    transform = model.roi_heads.box_predictor.box2box_transform
    decoded = transform.apply_deltas(deltas, boxes)
    # unflatten, not view(N, -1, 4): with no boxes the -1 would be ambiguous.
    return decoded.unflatten(1, (-1, 4))
