"""GID together with Chen et al.'s terms on Faster R-CNN teacher and student (the name configs
before :class:`kd.meta_arch.gid.GIDDistiller` used: with every ``KD.CHEN2017`` term off, the same
numbers as ``GIDDistiller``)."""

from typing import Dict, List

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes

from kd.families.rcnn import RPNView, rpn_dense_outputs
from kd.meta_arch.chen2017 import Chen2017Distiller
from kd.meta_arch.gid import check_same_dense_heads
from kd.meta_arch.gid_terms import GeneralInstanceDistillation, check_dense_layout

__all__ = ["GIDFasterRCNNDistiller"]


@META_ARCH_REGISTRY.register()
class GIDFasterRCNNDistiller(Chen2017Distiller):
    """GID with Faster R-CNN teacher and student, combined with Chen et al.'s terms.

    The GID terms are :class:`kd.meta_arch.gid.GIDDistiller`'s on the RPN (GISM and the response
    loss; the feature terms pool the ROI heads' levels), added to Chen et al.'s step; every
    ``KD.CHEN2017`` term stays available (switch them off for GID alone, or use
    ``GIDDistiller``).
    """

    @configurable
    def __init__(self, *, gid: GeneralInstanceDistillation, **kwargs):
        """
        Args:
            gid: the GID terms (selection, losses, adapters).
            kwargs: :class:`Chen2017Distiller` arguments.
        """
        super().__init__(**kwargs)
        name = type(self).__name__
        if self.student_input_scale != 1.0:
            raise ValueError(
                f"{name}: GID compares RPN outputs anchor by anchor, which needs teacher and "
                "student at the same input size: set KD.STUDENT.INPUT_SCALE 1.0"
            )
        self.views = (RPNView(self.student), RPNView(self.teacher))
        check_dense_layout(
            self.student, self.teacher, lambda m: m.proposal_generator.anchor_generator, name
        )
        check_same_dense_heads(*self.views, name)
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
        dense = rpn_dense_outputs(steps.rpn)
        t_dense = dense._replace(
            cls=cat(steps.t_rpn_logits, dim=1)[..., None],
            deltas=cat(steps.t_rpn_deltas, dim=1),
            anchors=None,
        )
        losses.update(
            self.gid(
                self.views,
                dense,
                t_dense,
                steps.features,
                steps.t_features,
                steps.images.image_sizes,
            )
        )
        return losses

    def response_mask(self, anchors: List[Boxes], gi_boxes: List[Boxes]) -> torch.Tensor:
        """(N, R) bool: the anchors the RPN's own matcher labels foreground for the GI boxes."""
        return self.gid.response_mask(self.views[0], anchors, gi_boxes, [])

    @torch.no_grad()
    def general_instances(self, batched_inputs: List[dict]) -> List[Boxes]:
        """The GI boxes GISM selects for a batch, in the (resized) input image's coordinates."""
        outs = []
        for view, inputs in zip(self.views, (batched_inputs, self.teacher_inputs(batched_inputs))):
            images = view.model.preprocess_image(inputs)
            outs.append((view.outputs(view.model.backbone(images.tensor), anchors=True), images))
        (dense, images), (t_dense, _) = outs
        return self.gid.select(self.views, dense, t_dense, images.image_sizes)

    def distillation_points(self, batched_inputs: List[dict]) -> List[Dict[str, Boxes]]:
        """Per image, the named sets of boxes this distiller compares teacher and student at."""
        return [{"general instances": b} for b in self.general_instances(batched_inputs)]
