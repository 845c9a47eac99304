"""GID for Faster R-CNN teacher and student, combinable with Chen et al.'s terms (the method in
:mod:`kd.meta_arch.gid`; the student's step in :mod:`kd.families.rcnn`)."""

from functools import partial
from typing import Dict, List

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList

from kd.families.boxes import deltas_in_student_space
from kd.families.dense import decode_at, matcher_foreground
from kd.families.rcnn import rpn_head_outputs
from kd.meta_arch.chen2017 import Chen2017Distiller
from kd.meta_arch.gid import GeneralInstanceDistillation, check_dense_layout, log_counts

__all__ = ["GIDFasterRCNNDistiller"]


@META_ARCH_REGISTRY.register()
class GIDFasterRCNNDistiller(Chen2017Distiller):
    """GID with Faster R-CNN teacher and student, combinable with Chen et al.'s terms.

    GISM compares the RPN's objectness (sigmoid) anchor by anchor and decodes each model's RPN
    deltas; the feature and relation losses pool the ROI heads' FPN levels; the response loss is
    on the RPN outputs only, masked by the RPN's own ``anchor_matcher`` applied to the GI boxes.
    Every ``KD.CHEN2017`` term stays available (switch them off for GID alone).
    """

    @configurable
    def __init__(self, *, gid: GeneralInstanceDistillation, **kwargs):
        """
        Args:
            gid: the GID module (selection, losses, adapters).
            kwargs: :class:`Chen2017Distiller` arguments.
        """
        super().__init__(**kwargs)
        name = type(self).__name__
        if self.student_input_scale != 1.0:
            raise ValueError(
                f"{name}: GID compares RPN outputs anchor by anchor, which needs teacher and "
                "student at the same input size: set KD.STUDENT.INPUT_SCALE 1.0"
            )
        for who, model in (("student", self.student), ("teacher", self.teacher)):
            if getattr(model, "proposal_generator", None) is None or not hasattr(
                model.proposal_generator, "anchor_generator"
            ):
                raise ValueError(f"{name} needs an RPN in the {who}")
        check_dense_layout(
            self.student, self.teacher, lambda m: m.proposal_generator.anchor_generator, name
        )
        s_rpn, t_rpn = self.student.proposal_generator, self.teacher.proposal_generator
        s_shapes, t_shapes = (
            self.student.backbone.output_shape(),
            self.teacher.backbone.output_shape(),
        )
        if [s_shapes[f].stride for f in s_rpn.in_features] != [
            t_shapes[f].stride for f in t_rpn.in_features
        ]:
            raise ValueError(
                f"{name}: the RPNs run on features {s_rpn.in_features} (student) and "
                f"{t_rpn.in_features} (teacher) of different strides; GID needs the same layout"
            )
        self.gid = gid.to(self.student.device)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        kwargs = super().from_config(cfg)
        student, teacher = kwargs["student"], kwargs["teacher"]
        kwargs["gid"] = GeneralInstanceDistillation(
            cfg,
            in_features=student.roi_heads.box_in_features,
            student_shapes=student.backbone.output_shape(),
            teacher_shapes=teacher.backbone.output_shape(),
        )
        return kwargs

    def forward_train(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        losses, steps = self._forward_steps(batched_inputs, teacher_rpn=self.gid.enabled)
        if not self.gid.enabled:
            return losses
        rpn = steps.rpn
        logits, t_logits = cat(rpn.logits, dim=1), cat(steps.t_rpn_logits, dim=1)
        deltas, t_deltas = cat(rpn.deltas, dim=1), cat(steps.t_rpn_deltas, dim=1)
        gi_boxes = self._select(
            logits, t_logits, deltas, t_deltas, rpn.anchors, steps.images.image_sizes
        )
        losses.update(self.gid.feature_losses(steps.features, steps.t_features, gi_boxes))
        mask = None
        if self.gid.needs_response:
            mask = self.response_mask(rpn.anchors, gi_boxes)
            t_deltas = deltas_in_student_space(
                t_deltas,
                Boxes.cat(rpn.anchors).tensor,
                student=self.student.proposal_generator.box2box_transform,
                teacher=self.teacher.proposal_generator.box2box_transform,
            )
            losses.update(
                self.gid.response_losses(
                    logits[..., None], t_logits[..., None], deltas, t_deltas, mask
                )
            )
        log_counts(gi_boxes, mask)
        return losses

    @torch.no_grad()
    def _select(
        self, logits, t_logits, deltas, t_deltas, anchors: List[Boxes], image_sizes
    ) -> List[Boxes]:
        anchors = Boxes.cat(anchors).tensor
        s_transform = self.student.proposal_generator.box2box_transform
        t_transform = self.teacher.proposal_generator.box2box_transform
        # The RPN's objectness is the single "class" score of a two-stage detector [paper].
        return self.gid.select(
            t_logits.sigmoid()[..., None],
            logits.sigmoid()[..., None],
            partial(decode_at, t_transform, t_deltas, anchors),
            partial(decode_at, s_transform, deltas, anchors),
            image_sizes,
        )

    def response_mask(self, anchors: List[Boxes], gi_boxes: List[Boxes]) -> torch.Tensor:
        """(N, R) bool: the anchors the RPN's own matcher labels foreground for the GI boxes."""
        matcher = self.student.proposal_generator.anchor_matcher
        return matcher_foreground(matcher, gi_boxes, Boxes.cat(anchors))

    @torch.no_grad()
    def general_instances(self, batched_inputs: List[dict]) -> List[Boxes]:
        """The GI boxes GISM selects for a batch, in the (resized) input image's coordinates."""
        outs = []
        for model, inputs in (
            (self.student, batched_inputs),
            (self.teacher, self.teacher_inputs(batched_inputs)),
        ):
            rpn = model.proposal_generator
            images: ImageList = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            logits, deltas = rpn_head_outputs(model, features)
            outs.append(
                (
                    cat(logits, dim=1),
                    cat(deltas, dim=1),
                    rpn.anchor_generator([features[f] for f in rpn.in_features]),
                    images.image_sizes,
                )
            )
        (logits, deltas, anchors, sizes), (t_logits, t_deltas, _, _) = outs
        return self._select(logits, t_logits, deltas, t_deltas, anchors, sizes)

    def distillation_points(self, batched_inputs: List[dict]) -> List[Dict[str, Boxes]]:
        """Per image, the named sets of boxes this distiller compares teacher and student at."""
        return [{"general instances": b} for b in self.general_instances(batched_inputs)]
