"""General Instance Distillation (Dai et al., CVPR 2021): its terms, on two models' dense views
(:class:`kd.families.dense.DenseView`), for its distillers (:mod:`kd.meta_arch.gid`, and with
Chen et al.'s terms :mod:`kd.meta_arch.gid_rcnn`).

METHODS.md section 2. Every iteration, per image and without gradients, the general instance
selection module (GISM) compares the teacher's and the student's dense class scores (the RPN's
objectness for Faster R-CNN) prediction by prediction, takes at each prediction the box of the more
confident model (each model decodes its own deltas on the shared anchors / points), and keeps the
top K after NMS. Those GI boxes are the distillation points of three losses:

* feature: ROIAlign of each GI box on the FPN level its size selects (detectron2's
  :class:`ROIPooler`), the student's instance feature adapted to the teacher's channels by a
  trained 1x1 convolution, L2 (:func:`kd.losses.gid.gi_feature_loss`);
* relation: within each image, the normalised pairwise distances of the instance features
  (:func:`kd.losses.gid.gi_relation_losses`);
* response: the detector's own label assignment applied to the GI boxes masks the dense outputs,
  then BCE against the teacher's sigmoid scores and L1 on the deltas
  (:func:`kd.losses.gid.gi_response_loss`).

Teacher and student must share the dense layout (anchors / points, classes), checked when the
distiller is built (:func:`check_dense_layout`).

Losses: ``loss_kd_gid_feature``, ``loss_kd_gid_relation``, ``loss_kd_gid_response_cls`` and
``loss_kd_gid_response_reg`` (weights ``KD.GID.*``; a weight of 0 removes the term).
"""

from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from detectron2.structures.boxes import pairwise_point_box_distance
from torch import nn

from kd.adapters import conv1x1_adapter
from kd.events import training_storage
from kd.families.boxes import deltas_in_student_space
from kd.families.dense import DenseOutputs, DenseView, decode_at, dense_layout_problems
from kd.losses.gid import (
    gi_feature_loss,
    gi_relation_loss,
    gi_relation_losses,
    gi_response_loss,
)
from kd.points.gism import GeneralInstanceSelector
from kd.roi_align import pool_levels, with_fast_roi_align_grad

__all__ = ["GeneralInstanceDistillation", "check_dense_layout", "log_counts"]

PREFIX = "loss_kd_gid_"


class GeneralInstanceDistillation(nn.Module):
    """GISM and the three GID losses on two models' dense views, shared by the distillers; owns
    the trained adapters. Calling it gives the GID terms of a training step (:meth:`forward`).

    The adapter is applied to the *pooled* instance features: a 1x1 convolution commutes with
    ROIAlign's bilinear averaging (the GI boxes are clipped to the image, so every sample is
    inside the map and its weights sum to 1), so this equals adapting the whole pyramid and
    pooling after, for K x h x w pixels instead of every pixel of every level.
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        strides: List[int],
        student_channels: int,
        teacher_channels: int,
        top_k: int = 10,
        nms_thresh: float = 0.3,
        score_mode: str = "max_abs_diff",
        score_thresh: float = 0.0,
        pre_nms_topk: int = 0,
        pooler_resolution: int = 10,
        pooler_type: str = "ROIAlignV2",
        pooler_sampling_ratio: int = 0,
        canonical_box_size: float = 224,
        canonical_level: int = 4,
        adapter: str = "shared",
        feature_weight: float = 5e-3,
        relation_weight: float = 40.0,
        relation_min_instances: int = 3,
        response_cls_weight: float = 0.1,
        response_reg_weight: float = 0.1,
        fcos_score: str = "cls",
        fcos_assignment: str = "inside",
        fcos_centerness: bool = True,
    ):
        """
        Args:
            in_features: FPN features the GI boxes are pooled from (in both models).
            strides: their strides (powers of 2, consecutive levels).
            student_channels: channels of the student's features (equal on every level).
            teacher_channels: channels of the teacher's features.
            top_k: K, instances kept per image [paper: 10].
            nms_thresh: IoU threshold of the GI NMS [paper: 0.3].
            score_mode: "max_abs_diff" [paper] or "max_score_diff" [code], see
                :func:`kd.points.gism.gi_scores`.
            score_thresh: candidates below this GI score are dropped [open: 0].
            pre_nms_topk: best candidates kept before NMS, 0 = all [open].
            pooler_resolution: ROIAlign output size [code: 10].
            pooler_type, pooler_sampling_ratio: detectron2 ROIPooler settings [open].
            canonical_box_size, canonical_level: detectron2's FPN level assignment.
            adapter: "shared" (one 1x1 conv) or "per_level" (one per FPN level) [open].
            feature_weight: lambda_1 [code: 5e-3]; 0 switches the feature loss off.
            relation_weight: lambda_2 [code: 40]; 0 switches the relation loss off.
            relation_min_instances: images with fewer GIs are skipped [paper: 3].
            response_cls_weight, response_reg_weight: lambda_3 of the response loss's two parts
                [code: 0.1, 0.1]; 0 switches a part off.
            fcos_score, fcos_assignment, fcos_centerness: with anchor-free (FCOS) models, the
                score GISM compares ("cls" [paper], or FCOS's "cls_ctr"), the response mask
                ("inside" a GI box [paper], or FCOS's own assignment "fcos"), and whether the
                centerness logit is distilled as one more response column [open].
        """
        super().__init__()
        if adapter not in ("shared", "per_level"):
            raise ValueError(f"KD.GID.ADAPTER must be 'shared' or 'per_level', got {adapter!r}")
        if fcos_score not in ("cls", "cls_ctr"):
            raise ValueError(f"KD.GID.FCOS_SCORE must be 'cls' or 'cls_ctr', got {fcos_score!r}")
        if fcos_assignment not in ("inside", "fcos"):
            raise ValueError(
                f"KD.GID.FCOS_ASSIGNMENT must be 'inside' or 'fcos', got {fcos_assignment!r}"
            )
        self.in_features = list(in_features)
        self.selector = GeneralInstanceSelector(
            top_k, nms_thresh, score_mode, score_thresh, pre_nms_topk
        )
        self.fcos_score = fcos_score
        self.fcos_assignment = fcos_assignment
        self.fcos_centerness = fcos_centerness
        self.feature_weight = feature_weight
        self.relation_weight = relation_weight
        self.relation_min_instances = relation_min_instances
        self.response_cls_weight = response_cls_weight
        self.response_reg_weight = response_reg_weight

        self.pooler = ROIPooler(
            output_size=pooler_resolution,
            scales=[1.0 / s for s in strides],
            sampling_ratio=pooler_sampling_ratio,
            pooler_type=pooler_type,
            canonical_box_size=canonical_box_size,
            canonical_level=canonical_level,
        )
        # The same ROIAlign with a vectorised backward on CPU: torchvision's is a scalar loop
        # (10.5 ms an iteration on BCCD's RetinaNet, seven times its forward; kd.roi_align).
        self.pooler.level_poolers = with_fast_roi_align_grad(self.pooler.level_poolers)
        self.adapter_mode = adapter
        # No adapter at all when neither feature term is on: an unused trained parameter would
        # stop DDP (detectron2's trainer does not find unused parameters).
        num = 1 if adapter == "shared" else len(self.in_features)
        num = num if self.needs_features else 0
        self.adapters = nn.ModuleList()
        for _ in range(num):
            self.adapters.append(conv1x1_adapter(student_channels, teacher_channels))

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        in_features: List[str],
        student_shapes: Dict[str, ShapeSpec],
        teacher_shapes: Dict[str, ShapeSpec],
    ) -> dict:
        """
        Args:
            cfg: the KD config (``KD.GID.*``).
            in_features: the features to pool from when ``KD.GID.IN_FEATURES`` is empty.
            student_shapes, teacher_shapes: the two backbones' output shapes.
        """
        g = cfg.KD.GID
        in_features = list(g.IN_FEATURES) or list(in_features)
        missing = [f for f in in_features if f not in student_shapes or f not in teacher_shapes]
        if missing:
            raise ValueError(
                f"KD.GID.IN_FEATURES {missing} are not outputs of both backbones (student: "
                f"{sorted(student_shapes)}, teacher: {sorted(teacher_shapes)})"
            )
        for who, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            if len({shapes[f].channels for f in in_features}) != 1:
                raise ValueError(
                    f"KD.GID.IN_FEATURES {in_features} of the {who} have different channel "
                    "counts; GID pools them with one ROIPooler and needs FPN-like features"
                )
        s_strides = [student_shapes[f].stride for f in in_features]
        t_strides = [teacher_shapes[f].stride for f in in_features]
        if s_strides != t_strides:
            raise ValueError(
                f"KD.GID.IN_FEATURES {in_features} have strides {s_strides} in the student and "
                f"{t_strides} in the teacher; the GI boxes must pool the same levels in both"
            )
        return {
            "in_features": in_features,
            "strides": s_strides,
            "student_channels": student_shapes[in_features[0]].channels,
            "teacher_channels": teacher_shapes[in_features[0]].channels,
            "top_k": g.TOP_K,
            "nms_thresh": g.NMS_THRESH,
            "score_mode": g.SCORE_MODE,
            "score_thresh": g.SCORE_THRESH,
            "pre_nms_topk": g.PRE_NMS_TOPK,
            "pooler_resolution": g.POOLER_RESOLUTION,
            "pooler_type": g.POOLER_TYPE,
            "pooler_sampling_ratio": g.POOLER_SAMPLING_RATIO,
            "canonical_box_size": g.CANONICAL_BOX_SIZE,
            "canonical_level": g.CANONICAL_LEVEL,
            "adapter": g.ADAPTER,
            "feature_weight": g.FEATURE_WEIGHT,
            "relation_weight": g.RELATION_WEIGHT,
            "relation_min_instances": g.RELATION_MIN_INSTANCES,
            "response_cls_weight": g.RESPONSE_CLS_WEIGHT,
            "response_reg_weight": g.RESPONSE_REG_WEIGHT,
            "fcos_score": g.FCOS_SCORE,
            "fcos_assignment": g.FCOS_ASSIGNMENT,
            "fcos_centerness": g.FCOS_CENTERNESS,
        }

    # ------------------------------------------------------------------ switches
    @property
    def needs_features(self) -> bool:
        return self.feature_weight > 0 or self.relation_weight > 0

    @property
    def needs_response(self) -> bool:
        return self.response_cls_weight > 0 or self.response_reg_weight > 0

    @property
    def enabled(self) -> bool:
        return self.needs_features or self.needs_response

    # ------------------------------------------------------------------ one step
    def forward(
        self,
        views: Tuple[DenseView, DenseView],
        student: DenseOutputs,
        teacher: DenseOutputs,
        features: Dict[str, torch.Tensor],
        teacher_features: Dict[str, torch.Tensor],
        image_sizes: List[tuple],
    ) -> Dict[str, torch.Tensor]:
        """The enabled GID terms of one training step, on the GI boxes GISM selects.

        Args:
            views: the student's and the teacher's dense views.
            student: the student's dense outputs of this step, with anchors (shared by both).
            teacher: the teacher's, on the same inputs (no graph).
            features, teacher_features: the two backbones' outputs.
            image_sizes: (h, w) of each image before padding.
        """
        gi_boxes = self.select(views, student, teacher, image_sizes)
        losses = self.feature_losses(features, teacher_features, gi_boxes)
        mask = None
        if self.needs_response:
            mask = self.response_mask(views[0], student.anchors, gi_boxes, image_sizes)
            t_deltas = deltas_in_student_space(
                teacher.deltas,
                Boxes.cat(student.anchors).tensor,
                student=views[0].box2box_transform,
                teacher=views[1].box2box_transform,
            )
            losses.update(
                self.response_losses(
                    self.response_outputs(views[0], student),
                    self.response_outputs(views[1], teacher),
                    student.deltas,
                    t_deltas,
                    mask,
                )
            )
        log_counts(gi_boxes, mask)
        return losses

    @torch.no_grad()
    def select(
        self,
        views: Tuple[DenseView, DenseView],
        student: DenseOutputs,
        teacher: DenseOutputs,
        image_sizes: List[tuple],
    ) -> List[Boxes]:
        """The GI boxes of each image: GISM on the two models' scores, each model's boxes decoded
        by its own transform on the shared anchors (only where GISM looks)."""
        if student.cls.shape != teacher.cls.shape:
            raise ValueError(
                f"teacher and student dense outputs differ in shape ({tuple(teacher.cls.shape)}"
                f" vs {tuple(student.cls.shape)}): they must see the same (padded) input size"
            )
        anchors = Boxes.cat(student.anchors).tensor
        return self.selector.select(
            self.gi_probs(views[1], teacher),
            self.gi_probs(views[0], student),
            partial(decode_at, views[1].box2box_transform, teacher.deltas, anchors),
            partial(decode_at, views[0].box2box_transform, student.deltas, anchors),
            image_sizes,
        )

    def gi_probs(self, view: DenseView, outputs: DenseOutputs) -> torch.Tensor:
        """(N, R, C) scores GISM compares: the class probabilities (an RPN's objectness [paper]),
        or with ``fcos_score`` "cls_ctr" FCOS's own score sqrt(cls * centerness)."""
        if view.anchor_free and self.fcos_score == "cls_ctr":
            # FCOS's own inference score (eq. 4 of the FCOS journal version).
            return torch.sqrt(outputs.cls.sigmoid() * outputs.centerness.sigmoid())
        return outputs.cls.sigmoid()

    def response_outputs(self, view: DenseView, outputs: DenseOutputs) -> torch.Tensor:
        """(N, R, C') logits the response loss compares (FCOS: with its centerness column)."""
        if view.anchor_free and self.fcos_centerness:
            return torch.cat([outputs.cls, outputs.centerness], dim=-1)
        return outputs.cls

    def response_mask(
        self,
        view: DenseView,
        anchors: List[Boxes],
        gi_boxes: List[Boxes],
        image_sizes: List[tuple],
    ) -> torch.Tensor:
        """(N, R) bool: the predictions the GI boxes select for the response loss: the model's
        own label assignment with the GI boxes as ground truth (anchors [paper]), or for
        anchor-free models with ``fcos_assignment`` "inside" the points inside a GI box [paper].
        """
        if view.anchor_free and self.fcos_assignment == "inside":
            centers = Boxes.cat(anchors).get_centers()
            return torch.stack(
                [
                    (pairwise_point_box_distance(centers, boxes).min(dim=2).values > 0).any(dim=1)
                    for boxes in gi_boxes
                ]
            )
        return view.foreground(gi_boxes, anchors, image_sizes)

    # ------------------------------------------------------------------ feature + relation
    def levels_of(self, boxes: List[Boxes]) -> torch.Tensor:
        """Index into ``in_features`` of the level each box is pooled from (detectron2's rule)."""
        p = self.pooler
        return assign_boxes_to_levels(
            boxes, p.min_level, p.max_level, p.canonical_box_size, p.canonical_level
        )

    def adapt(self, student_rois: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Map pooled student features (M, Cs, h, w) to the teacher's channels (M, Ct, h, w)."""
        if self.adapter_mode == "shared":
            return self.adapters[0](student_rois)
        out = student_rois.new_zeros(
            (student_rois.shape[0], self.adapters[0].out_channels) + student_rois.shape[2:]
        )
        for level, adapter in enumerate(self.adapters):
            idx = torch.nonzero(levels == level).squeeze(1)
            # Every adapter enters the graph, also with no instance on its level this step, so
            # DDP sees the same set of used parameters on every process.
            out = out.index_put((idx,), adapter(student_rois[idx]))
        return out

    def feature_losses(
        self,
        student_features: Dict[str, torch.Tensor],
        teacher_features: Dict[str, torch.Tensor],
        gi_boxes: List[Boxes],
    ) -> Dict[str, torch.Tensor]:
        """``loss_kd_gid_feature`` and ``loss_kd_gid_relation`` (the enabled ones).

        Args:
            student_features, teacher_features: backbone outputs, containing ``in_features``.
            gi_boxes: the GI boxes of each image (:meth:`select`).
        """
        losses: Dict[str, torch.Tensor] = {}
        if not self.needs_features:
            return losses
        s_rois = pool_levels(self.pooler, [student_features[f] for f in self.in_features], gi_boxes)
        with torch.no_grad():
            t_rois = pool_levels(
                self.pooler, [teacher_features[f] for f in self.in_features], gi_boxes
            )
        s_rois = self.adapt(s_rois, self.levels_of(gi_boxes))
        if self.feature_weight > 0:
            # Averaged over the instances of the batch (= per image when every image has K).
            losses[PREFIX + "feature"] = self.feature_weight * gi_feature_loss(s_rois, t_rois)
        if self.relation_weight > 0:
            relation = self.relation_loss(s_rois, t_rois, [len(b) for b in gi_boxes])
            losses[PREFIX + "relation"] = self.relation_weight * relation
        return losses

    def relation_loss(
        self, student_rois: torch.Tensor, teacher_rois: torch.Tensor, counts: List[int]
    ) -> torch.Tensor:
        """Mean relation loss over the images with enough instances (unweighted).

        Args:
            student_rois, teacher_rois: (M, C, h, w) pooled features of every image's GIs, image
                after image.
            counts: the number of GIs of each image (summing to M).
        """
        minimum = max(self.relation_min_instances, 2)
        zero = student_rois.sum() * 0.0
        if len(set(counts)) == 1:
            # Nearly always: every image keeps K of its thousands of candidates. One batched
            # pass over the images (instances are still only compared within their image).
            if counts[0] < minimum:
                return zero
            n, k = len(counts), counts[0]
            return gi_relation_losses(
                student_rois.view(n, k, *student_rois.shape[1:]),
                teacher_rois.view(n, k, *teacher_rois.shape[1:]),
            ).mean()
        terms = [
            gi_relation_loss(s, t, min_instances=minimum)
            for s, t in zip(student_rois.split(counts), teacher_rois.split(counts))
            if len(s) >= minimum
        ]
        return torch.stack(terms).mean() if terms else zero

    # ------------------------------------------------------------------ response
    def response_losses(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        student_deltas: torch.Tensor,
        teacher_deltas: torch.Tensor,
        mask: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """``loss_kd_gid_response_cls`` / ``_reg``, normalised by the number of masked rows.

        Args:
            student_cls, teacher_cls: (N, R, C) logits.
            student_deltas, teacher_deltas: (N, R, 4) box deltas, in the student's encoding.
            mask: (N, R) bool, the rows the GI boxes select.
        """
        losses: Dict[str, torch.Tensor] = {}
        if not self.needs_response:
            return losses
        # Only the masked rows are evaluated; the normaliser is their count over the batch.
        # The mask made an index tensor once: each boolean-mask gather would wait for the GPU.
        rows = mask.nonzero(as_tuple=True)
        cls_loss, reg_loss = gi_response_loss(
            student_cls[rows],
            teacher_cls[rows],
            student_deltas[rows],
            teacher_deltas[rows],
            torch.ones(rows[0].shape[0], dtype=torch.bool, device=mask.device),
        )
        if self.response_cls_weight > 0:
            losses[PREFIX + "response_cls"] = self.response_cls_weight * cls_loss
        if self.response_reg_weight > 0:
            losses[PREFIX + "response_reg"] = self.response_reg_weight * reg_loss
        return losses


# ---------------------------------------------------------------------- helpers
def check_dense_layout(student: nn.Module, teacher: nn.Module, anchor_generator_of, what: str):
    """Refuse a pair whose dense predictions do not correspond one to one.

    Args:
        student, teacher: the two detectors.
        anchor_generator_of: returns a model's anchor generator.
        what: the distiller's name, for the message.
    """
    problems = dense_layout_problems(student, teacher, anchor_generator_of)
    if problems:
        raise ValueError(
            f"{what}: GID compares teacher and student prediction by prediction, so both need "
            f"the same dense layout; they differ in {'; '.join(problems)}. Give the teacher "
            "the student's head features, anchors and classes"
        )


def log_counts(gi_boxes: List[Boxes], mask: Optional[torch.Tensor]) -> None:
    storage = training_storage()
    if storage is None:
        return
    storage.put_scalar("kd_gid/num_instances", sum(len(b) for b in gi_boxes) / len(gi_boxes))
    if mask is not None:
        storage.put_scalar("kd_gid/response_rows", mask.sum().item() / len(gi_boxes))
