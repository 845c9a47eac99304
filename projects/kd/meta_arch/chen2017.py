"""Chen et al. 2017, "Learning Efficient Object Detection Models with Knowledge Distillation".

Faster R-CNN student and teacher (METHODS.md section 1). The student's forward is run step by step
(backbone, RPN, ROI sampling, box head) so that the distillation points are exactly the ones its
own losses use: the RPN's sampled anchors and the ROI head's sampled proposals. The teacher is
asked about those same points: its RPN head at the same anchors, its box head (ROIAlign on its own
features) at the student's sampled proposals.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances

from kd.adapters import HintAdapters
from kd.families.boxes import deltas_in_student_space
from kd.families.dense import dense_layout_problems
from kd.families.rcnn import (
    RPNStep,
    check_faster_rcnn,
    rcnn_box_predictions,
    roi_step,
    rpn_head_outputs,
    rpn_step,
)
from kd.losses.chen2017 import (
    hint_loss,
    objectness_soft_cross_entropy,
    teacher_bounded_regression,
    weighted_soft_cross_entropy,
)
from kd.meta_arch.base import Distiller, gt_instances_of

__all__ = ["Chen2017Distiller", "Chen2017Steps"]

PREFIX = "loss_kd_chen2017_"


class Chen2017Steps(NamedTuple):
    """Intermediate results of :meth:`Chen2017Distiller._forward_steps` (a subclass reads them to
    add its own terms)."""

    images: ImageList  # the student's
    gt_instances: Optional[List[Instances]]
    features: Dict[str, torch.Tensor]  # the student's backbone outputs
    t_features: Dict[str, torch.Tensor]  # the teacher's (no graph)
    rpn: RPNStep  # the student's RPN step
    # The teacher's RPN head at the same anchors, per level (no graph), when it was run.
    t_rpn_logits: Optional[List[torch.Tensor]] = None
    t_rpn_deltas: Optional[List[torch.Tensor]] = None


@META_ARCH_REGISTRY.register()
class Chen2017Distiller(Distiller):
    """Faster R-CNN distillation with weighted soft CE, bounded regression and hints.

    Losses (each its own entry): ``loss_kd_chen2017_rpn_soft_cls``, ``..._rpn_bounded_reg``,
    ``..._rcn_soft_cls``, ``..._rcn_bounded_reg``, ``..._hint``. With a soft term on, the student's
    own hard classification loss (``loss_rpn_cls`` / ``loss_cls``) is scaled by mu, so that
    ``L_cls = mu * L_hard + (1 - mu) * L_soft`` as in the paper.
    """

    @configurable
    def __init__(
        self,
        *,
        hard_weight: float = 0.5,
        temperature: float = 1.0,
        background_weight: float = 1.5,
        bound_weight: float = 0.5,
        bound_margin: float = 0.0,
        rpn_soft_cls: bool = True,
        rpn_bounded_reg: bool = True,
        rcn_soft_cls: bool = True,
        rcn_bounded_reg: bool = True,
        hint_features: Tuple[str, ...] = (),
        hint_teacher_features: Tuple[str, ...] = (),
        hint_weight: float = 0.5,
        hint_norm: str = "l2",
        **kwargs,
    ):
        """
        Args:
            hard_weight: mu; the student's hard CE is scaled by it when a soft term is on.
            temperature: T of the softened class distributions.
            background_weight: w of the background class in the soft CE (others 1).
            bound_weight: nu, weight of the teacher-bounded regression.
            bound_margin: m, margin of the bound.
            rpn_soft_cls, rpn_bounded_reg, rcn_soft_cls, rcn_bounded_reg: switch each term.
            hint_features: features to hint (empty: no hint loss).
            hint_teacher_features: the teacher's feature each of ``hint_features`` is compared
                with, in the same order (empty: the same names).
            hint_weight: gamma, weight of the hint loss.
            hint_norm: "l2" or "l1".
            kwargs: :class:`Distiller` arguments.
        """
        super().__init__(**kwargs)
        self.hard_weight = hard_weight
        self.temperature = temperature
        self.background_weight = background_weight
        self.bound_weight = bound_weight
        self.bound_margin = bound_margin
        self.rpn_soft_cls = rpn_soft_cls
        self.rpn_bounded_reg = rpn_bounded_reg
        self.rcn_soft_cls = rcn_soft_cls
        self.rcn_bounded_reg = rcn_bounded_reg
        self.hint_weight = hint_weight
        self.hint_norm = hint_norm
        if hint_teacher_features and len(hint_teacher_features) != len(hint_features):
            raise ValueError(
                f"KD.CHEN2017.HINT.TEACHER_FEATURES {list(hint_teacher_features)} must name one "
                f"teacher feature per KD.CHEN2017.HINT.FEATURES {list(hint_features)} (or be "
                "empty: the same names)"
            )
        # student feature -> the teacher feature it is compared with
        self.hint_pairs = dict(zip(hint_features, hint_teacher_features or hint_features))
        self._check_compatible(self.hint_pairs)
        self.hint_adapters = None
        if self.hint_pairs:
            s_shapes = self.student.backbone.output_shape()
            t_shapes = self.teacher.backbone.output_shape()
            self.hint_adapters = HintAdapters(
                list(self.hint_pairs),
                {k: s_shapes[k].channels for k in self.hint_pairs},
                {k: t_shapes[t].channels for k, t in self.hint_pairs.items()},
            ).to(self.student.device)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        kwargs, _ = cls.build_pair(cfg)
        c = cfg.KD.CHEN2017
        kwargs.update(
            hard_weight=c.HARD_WEIGHT,
            temperature=c.TEMPERATURE,
            background_weight=c.BACKGROUND_WEIGHT,
            bound_weight=c.BOUND_WEIGHT,
            bound_margin=c.BOUND_MARGIN,
            rpn_soft_cls=c.RPN_SOFT_CLS,
            rpn_bounded_reg=c.RPN_BOUNDED_REG,
            rcn_soft_cls=c.RCN_SOFT_CLS,
            rcn_bounded_reg=c.RCN_BOUNDED_REG,
            hint_features=tuple(c.HINT.FEATURES) if c.HINT.ENABLED else (),
            hint_teacher_features=tuple(c.HINT.TEACHER_FEATURES) if c.HINT.ENABLED else (),
            hint_weight=c.HINT.WEIGHT,
            hint_norm=c.HINT.NORM,
        )
        return kwargs

    # ------------------------------------------------------------------ checks
    def _check_compatible(self, hint_pairs: Dict[str, str]) -> None:
        s, t = self.student, self.teacher
        for who, m in (("student", s), ("teacher", t)):
            check_faster_rcnn(m, who, "Chen2017Distiller")
        if self.rpn_soft_cls or self.rpn_bounded_reg:
            if self.student_input_scale != 1.0:
                raise ValueError(
                    "KD.CHEN2017.RPN_SOFT_CLS / RPN_BOUNDED_REG compare teacher and student anchor "
                    "by anchor, which needs both at the same input size: set them to False when "
                    "KD.STUDENT.INPUT_SCALE != 1"
                )
            # Anchor i must be the same box for both: the same cells on the same grids.
            differ = dense_layout_problems(s, t, lambda m: m.proposal_generator.anchor_generator)
            if differ:
                raise ValueError(
                    "KD.CHEN2017.RPN_SOFT_CLS / RPN_BOUNDED_REG compare teacher and student anchor "
                    f"by anchor, but their anchor layouts differ in {'; '.join(differ)}. Align "
                    "them or switch the RPN terms off"
                )
        s_shapes, t_shapes = s.backbone.output_shape(), t.backbone.output_shape()
        missing = [f for f in hint_pairs if f not in s_shapes] + [
            t for t in hint_pairs.values() if t not in t_shapes
        ]
        if missing:
            raise ValueError(
                f"KD.CHEN2017.HINT.FEATURES / TEACHER_FEATURES {sorted(set(missing))} are not "
                f"outputs of the backbones (student: {sorted(s_shapes)}, teacher: "
                f"{sorted(t_shapes)})"
            )
        if s.roi_heads.num_classes != t.roi_heads.num_classes:
            raise ValueError("teacher and student ROI heads predict different class counts")

    # ------------------------------------------------------------------ training
    def forward_train(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        return self._forward_steps(batched_inputs)[0]

    def _forward_steps(
        self, batched_inputs: List[dict], teacher_rpn: bool = False
    ) -> Tuple[Dict[str, torch.Tensor], "Chen2017Steps"]:
        """The training step, also returning its intermediate results for a subclass's terms.

        Args:
            batched_inputs: as :meth:`forward`.
            teacher_rpn: run the teacher's RPN head even when no RPN term here needs it.

        Returns:
            (losses, steps): the loss dict and the step's intermediate results.
        """
        student = self.student
        with torch.no_grad():
            # The teacher computes only what the enabled terms need. Its backbone runs first, so
            # that its transient activations are freed before the student's graph is built (the
            # student's forward then reuses that memory; see the dense GID distillers).
            t_features = self.teacher.backbone(self.teacher_images(batched_inputs).tensor)
        s_inputs = self.student_inputs(batched_inputs)
        images = student.preprocess_image(s_inputs)
        gt_instances = gt_instances_of(s_inputs, self.device)
        features = student.backbone(images.tensor)
        need_rpn = self.rpn_soft_cls or self.rpn_bounded_reg
        need_rcn = self.rcn_soft_cls or self.rcn_bounded_reg

        step = rpn_step(student, images, features, gt_instances)
        losses = dict(step.losses)
        t_logits = t_deltas = None
        if need_rpn or teacher_rpn:
            with torch.no_grad():
                t_logits, t_deltas = rpn_head_outputs(self.teacher, t_features)
        if need_rpn:
            losses.update(self._rpn(step, t_logits, t_deltas))
        losses.update(self._rcn(features, step.proposals, gt_instances, t_features, need_rcn))
        if self.hint_pairs:
            losses[PREFIX + "hint"] = self.hint_weight * self._hint(features, t_features)
        steps = Chen2017Steps(images, gt_instances, features, t_features, step, t_logits, t_deltas)
        return losses, steps

    def _rpn(
        self, step: RPNStep, t_logits: List[torch.Tensor], t_deltas: List[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """The RPN terms at the student's sampled anchors; the hard objectness term reweighted."""
        rpn, t_rpn = self.student.proposal_generator, self.teacher.proposal_generator
        losses = {}
        gt_labels = torch.stack(step.gt_labels)  # (N, A) 1 = object, 0 = background, -1 = ignored
        normalizer = rpn.batch_size_per_image * gt_labels.shape[0]  # M, as in the RPN's own loss
        if self.rpn_soft_cls:
            # Boolean masks made index tensors once: each masked gather would wait for the GPU.
            sampled = (gt_labels >= 0).nonzero(as_tuple=True)
            soft = objectness_soft_cross_entropy(
                cat(step.logits, dim=1)[sampled],
                cat(t_logits, dim=1)[sampled],
                background_weight=self.background_weight,
                temperature=self.temperature,
            )
            losses["loss_rpn_cls"] = step.losses["loss_rpn_cls"] * self.hard_weight
            losses[PREFIX + "rpn_soft_cls"] = (
                (1 - self.hard_weight)
                * rpn.loss_weight.get("loss_rpn_cls", 1.0)
                * soft.sum()
                / normalizer
            )
        if self.rpn_bounded_reg:
            positive = (gt_labels == 1).nonzero(as_tuple=True)  # (images, anchors)
            anchor_boxes = type(step.anchors[0]).cat(step.anchors).tensor
            pos_anchors = anchor_boxes[positive[1]]
            targets = rpn.box2box_transform.get_deltas(
                pos_anchors, torch.stack(step.gt_boxes)[positive]
            )
            t_pos = deltas_in_student_space(
                cat(t_deltas, dim=1)[positive],
                pos_anchors,
                student=rpn.box2box_transform,
                teacher=t_rpn.box2box_transform,
            )
            bound = teacher_bounded_regression(
                cat(step.deltas, dim=1)[positive], t_pos, targets, margin=self.bound_margin
            )
            losses[PREFIX + "rpn_bounded_reg"] = (
                self.bound_weight
                * rpn.loss_weight.get("loss_rpn_loc", 1.0)
                * bound.sum()
                / normalizer
            )
        return losses

    def _rcn(
        self,
        features,
        proposals: List[Instances],
        gt_instances: List[Instances],
        t_features,
        distill: bool,
    ) -> Dict[str, torch.Tensor]:
        roi = self.student.roi_heads
        proposals, scores, deltas, losses = roi_step(
            self.student, features, proposals, gt_instances
        )
        if not distill:
            return losses
        boxes = [p.proposal_boxes for p in proposals]
        # The teacher's box head at the student's sampled proposals, mapped to its input size.
        t_roi = self.teacher.roi_heads
        scale = 1.0 / self.student_input_scale
        with torch.no_grad():
            t_boxes = [Boxes(b.tensor * scale) for b in boxes]
            t_scores, t_deltas = rcnn_box_predictions(self.teacher, t_features, t_boxes)
        gt_classes = cat([p.gt_classes for p in proposals])
        num_sampled = max(gt_classes.numel(), 1)  # N, as in the box head's own losses
        # The soft and bounded terms are parts of L_cls and L_reg [paper], so they take the
        # weights detectron2 gives the hard terms they join (BBOX_REG_LOSS_WEIGHT), as on the RPN.
        loss_weight = roi.box_predictor.loss_weight
        if self.rcn_soft_cls:
            weights = torch.ones(scores.shape[1], device=scores.device)
            weights[-1] = self.background_weight  # detectron2 puts background last
            soft = weighted_soft_cross_entropy(
                scores, t_scores, weights, temperature=self.temperature
            )
            losses["loss_cls"] = losses["loss_cls"] * self.hard_weight
            losses[PREFIX + "rcn_soft_cls"] = (
                (1 - self.hard_weight) * loss_weight.get("loss_cls", 1.0) * soft.sum() / num_sampled
            )
        if self.rcn_bounded_reg:
            num_classes = scores.shape[1] - 1
            fg = ((gt_classes >= 0) & (gt_classes < num_classes)).nonzero().squeeze(1)
            proposal_boxes = cat([b.tensor for b in boxes])[fg]
            # An image without ground truth gets no gt_boxes field; detectron2's box losses stand
            # in its proposals (all background, so none is selected here).
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals]
            )[fg]
            targets = roi.box_predictor.box2box_transform.get_deltas(proposal_boxes, gt_boxes)
            s_fg = _class_deltas(deltas[fg], gt_classes[fg])
            t_fg = deltas_in_student_space(
                _class_deltas(t_deltas[fg], gt_classes[fg]),
                proposal_boxes,
                student=roi.box_predictor.box2box_transform,
                teacher=t_roi.box_predictor.box2box_transform,
            )
            bound = teacher_bounded_regression(s_fg, t_fg, targets, margin=self.bound_margin)
            losses[PREFIX + "rcn_bounded_reg"] = (
                self.bound_weight * loss_weight.get("loss_box_reg", 1.0) * bound.sum() / num_sampled
            )
        return losses

    def _hint(self, features, t_features) -> torch.Tensor:
        terms = [
            hint_loss(
                self.hint_adapters(name, features[name], t_features[t_name]),
                t_features[t_name],
                norm=self.hint_norm,
            )
            for name, t_name in self.hint_pairs.items()
        ]
        return torch.stack(terms).mean()  # mean over the hinted levels


def _class_deltas(deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The 4 deltas of each row's class (class-agnostic heads have only 4)."""
    if deltas.shape[1] == 4:
        return deltas
    # unflatten, not view(N, -1, 4): with no rows (no foreground) the -1 would be ambiguous.
    return deltas.unflatten(1, (-1, 4))[torch.arange(len(classes)), classes]
