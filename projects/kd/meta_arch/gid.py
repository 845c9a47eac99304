"""General Instance Distillation (Dai et al., CVPR 2021), one distiller for every detector family
with a dense view (:class:`kd.families.dense.DenseView`: RetinaNet, FCOS, Faster R-CNN's RPN).

METHODS.md section 2. Each step reads as the method does: the student's own training step (its
family's, losses unchanged) keeping its dense outputs; the teacher's dense outputs and features
without gradients; GISM's general instances as the points; the feature, relation and response
terms there (:class:`kd.meta_arch.gid_terms.GeneralInstanceDistillation`).

``GIDRetinaNetDistiller`` and ``GIDFCOSDistiller`` are this class pinned to one family (the names
of earlier configs); ``GIDFasterRCNNDistiller`` (:mod:`kd.meta_arch.gid_rcnn`) is GID together
with Chen et al.'s terms.
"""

from typing import Dict, List, Optional, Type

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes

from kd.families.dense import DenseView, FCOSFamily, RetinaNetFamily
from kd.families.registry import dense_view_of, family_name
from kd.meta_arch.base import Distiller, gt_instances_of
from kd.meta_arch.gid_terms import GeneralInstanceDistillation, check_dense_layout

__all__ = ["GIDDistiller", "GIDRetinaNetDistiller", "GIDFCOSDistiller", "check_same_dense_heads"]


def check_same_dense_heads(student: DenseView, teacher: DenseView, what: str) -> None:
    """Refuse a pair whose dense heads read features of other strides (other grids)."""
    s_shapes = student.model.backbone.output_shape()
    t_shapes = teacher.model.backbone.output_shape()
    s_strides = [s_shapes[f].stride for f in student.head_in_features]
    t_strides = [t_shapes[f].stride for f in teacher.head_in_features]
    if s_strides != t_strides:
        raise ValueError(
            f"{what}: the dense heads run on strides {s_strides} (student) and {t_strides} "
            "(teacher); GID needs the same dense layout: use the same head features"
        )


@META_ARCH_REGISTRY.register()
class GIDDistiller(Distiller):
    """GID with a teacher and a student of one family that has a dense view.

    The response mask is the family's own label assignment with the GI boxes as ground truth
    (RetinaNet's and the RPN's ``anchor_matcher``), or for anchor-free FCOS the points inside a
    GI box (``KD.GID.FCOS_ASSIGNMENT``). On Faster R-CNN, GISM and the response loss are on the
    RPN and the feature terms pool the ROI heads' levels.
    """

    # The family a registered alias pins (None: any family with a dense view).
    family: Optional[Type] = None

    @configurable
    def __init__(self, *, gid: GeneralInstanceDistillation, **kwargs):
        """
        Args:
            gid: the GID terms (selection, losses, adapters).
            kwargs: :class:`Distiller` arguments.
        """
        super().__init__(**kwargs)
        name = type(self).__name__
        if self.family is not None:
            for who, model in (("student", self.student), ("teacher", self.teacher)):
                if not self.family.matches(model):
                    raise ValueError(
                        f"{name} needs a {self.family.name} {who}; got {family_name(model)}"
                    )
        if family_name(self.student) != family_name(self.teacher):
            raise ValueError(
                f"{name}: GID compares teacher and student prediction by prediction, which needs "
                f"one family; got a {family_name(self.student)} student and a "
                f"{family_name(self.teacher)} teacher"
            )
        if self.student_input_scale != 1.0:
            raise ValueError(
                f"{name}: GID compares dense predictions location by location, which needs "
                "teacher and student at the same input size: set KD.STUDENT.INPUT_SCALE 1.0"
            )
        self.views = (
            dense_view_of(self.student, "student", name),
            dense_view_of(self.teacher, "teacher", name),
        )
        check_dense_layout(
            self.student,
            self.teacher,
            lambda m: self.views[0 if m is self.student else 1].anchor_generator,
            name,
        )
        check_same_dense_heads(*self.views, name)
        self.gid = gid.to(self.student.device)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        kwargs, _ = cls.build_pair(cfg)
        student, teacher = kwargs["student"], kwargs["teacher"]
        kwargs["gid"] = GeneralInstanceDistillation(
            cfg,
            in_features=dense_view_of(student, "student", cls.__name__).instance_features,
            student_shapes=student.backbone.output_shape(),
            teacher_shapes=teacher.backbone.output_shape(),
        )
        return kwargs

    @torch.no_grad()
    def _teacher_trace(self, batched_inputs: List[dict]):
        """The teacher's backbone features and dense outputs (without anchors: shared)."""
        features = self.teacher.backbone(self.teacher_images(batched_inputs).tensor)
        return features, self.views[1].outputs(features)

    def forward_train(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        student = self.student
        # The teacher first: its transient activations are freed before the student's graph is
        # built, whose forward then reuses that memory. Run after the student, the same teacher
        # work took about 60 ms more per iteration (RetinaNet, CPU: 370 ms vs 305 ms alone).
        trace = self._teacher_trace(batched_inputs) if self.gid.enabled else None
        images = student.preprocess_image(batched_inputs)
        gt_instances = gt_instances_of(batched_inputs, self.device)
        features = student.backbone(images.tensor)
        losses, dense = self.views[0].train_step(images, features, gt_instances)
        if trace is None:
            return losses
        t_features, t_dense = trace
        losses.update(
            self.gid(self.views, dense, t_dense, features, t_features, images.image_sizes)
        )
        return losses

    def response_mask(
        self, anchors: List[Boxes], gi_boxes: List[Boxes], image_sizes: List[tuple]
    ) -> torch.Tensor:
        """(N, R) bool: the student's predictions the GI boxes select for the response loss."""
        return self.gid.response_mask(self.views[0], anchors, gi_boxes, image_sizes)

    @torch.no_grad()
    def general_instances(self, batched_inputs: List[dict]) -> List[Boxes]:
        """The GI boxes GISM selects for a batch, in the (resized) input image's coordinates.

        Runs in the current mode (training: batch statistics, as during distillation).
        """
        images = self.student.preprocess_image(batched_inputs)
        dense = self.views[0].outputs(self.student.backbone(images.tensor), anchors=True)
        _, t_dense = self._teacher_trace(batched_inputs)
        return self.gid.select(self.views, dense, t_dense, images.image_sizes)

    def distillation_points(self, batched_inputs: List[dict]) -> List[Dict[str, Boxes]]:
        """Per image, the named sets of boxes this distiller compares teacher and student at."""
        return [{"general instances": b} for b in self.general_instances(batched_inputs)]


@META_ARCH_REGISTRY.register()
class GIDRetinaNetDistiller(GIDDistiller):
    """:class:`GIDDistiller` for RetinaNet teacher and student (the name earlier configs use)."""

    family = RetinaNetFamily


@META_ARCH_REGISTRY.register()
class GIDFCOSDistiller(GIDDistiller):
    """:class:`GIDDistiller` for FCOS teacher and student (the name earlier configs use)."""

    family = FCOSFamily
