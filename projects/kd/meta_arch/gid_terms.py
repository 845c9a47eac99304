"""General Instance Distillation (Dai et al., CVPR 2021): the method, shared by its distillers for
RetinaNet and FCOS (:mod:`kd.meta_arch.gid_dense`) and Faster R-CNN (:mod:`kd.meta_arch.gid_rcnn`).

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
distiller is built. The student's forward is run step by step, so its dense predictions are
computed once and serve both its own losses and GID; the teacher computes, under ``no_grad``, its
backbone and its dense head once each, and only when a GID term is on.

Losses: ``loss_kd_gid_feature``, ``loss_kd_gid_relation``, ``loss_kd_gid_response_cls`` and
``loss_kd_gid_response_reg`` (weights ``KD.GID.*``; a weight of 0 removes the term).
"""

from typing import Callable, Dict, List, Optional, Union

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import nn

from kd.adapters import conv1x1_adapter
from kd.events import training_storage
from kd.families.dense import dense_layout_problems
from kd.losses.gid import (
    gi_feature_loss,
    gi_relation_loss,
    gi_relation_losses,
    gi_response_loss,
)
from kd.losses.precision import float32_loss
from kd.points.gism import gi_scores, select_general_instances_batched
from kd.roi_align import pool_levels, with_fast_roi_align_grad

__all__ = ["GeneralInstanceDistillation", "BoxesAt", "check_dense_layout", "log_counts"]

PREFIX = "loss_kd_gid_"
# Decoded boxes for GISM: (N, R, 4), or a function of (N, T) indices into R returning (N, T, 4).
BoxesAt = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class GeneralInstanceDistillation(nn.Module):
    """GISM and the three GID losses, shared by the distillers; owns the trained adapters.

    The adapter is applied to the *pooled* instance features: a 1x1 convolution commutes with
    ROIAlign's bilinear averaging (the GI boxes are clipped to the image, so every sample is
    inside the map and its weights sum to 1), so this equals adapting the whole pyramid and
    pooling after, for K x h x w pixels instead of every pixel of every level.
    """

    # The best-scoring predictions of each image GISM first selects among (:meth:`select`).
    candidates = 1000

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
        """
        super().__init__()
        if adapter not in ("shared", "per_level"):
            raise ValueError(f"KD.GID.ADAPTER must be 'shared' or 'per_level', got {adapter!r}")
        self.in_features = list(in_features)
        self.top_k = top_k
        self.nms_thresh = nms_thresh
        self.score_mode = score_mode
        self.score_thresh = score_thresh
        self.pre_nms_topk = pre_nms_topk
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

    # ------------------------------------------------------------------ GISM
    @torch.no_grad()
    def select(
        self,
        teacher_probs: torch.Tensor,
        student_probs: torch.Tensor,
        teacher_boxes: BoxesAt,
        student_boxes: BoxesAt,
        image_sizes: List[tuple],
    ) -> List[Boxes]:
        """The general instances of each image (GISM), without gradients.

        GISM keeps the first ``top_k`` survivors of a greedy NMS in GI-score order, and those
        depend only on the predictions scoring above the last of them. So the selection first runs
        on each image's ``candidates`` best-scoring predictions (in their original order, so that
        ties break as over all of them): when every image has ``top_k`` survivors there, each
        scoring above every prediction left out, they are the survivors over all predictions
        (else the selection reruns on four times as many, up to all). Only those candidates' boxes
        are decoded and compared: all R of them (61k over a BCCD RetinaNet batch) took 6-9 ms
        an iteration.

        Args:
            teacher_probs, student_probs: (N, R, C) scores at the R shared predictions.
            teacher_boxes, student_boxes: each model's decoded boxes, XYXY: (N, R, 4), or a function
                of (N, T) long indices into R that returns the (N, T, 4) boxes at those predictions.
            image_sizes: (h, w) of each image, before padding; boxes are clipped to it.

        Returns:
            N ``Boxes`` of at most ``top_k`` GI boxes each, by decreasing GI score.
        """
        r = teacher_probs.shape[1]
        num = self.candidates
        # KD.GID.PRE_NMS_TOPK counts the candidates left after dropping empty boxes, which only
        # the boxes of every prediction tell. The scores as select_general_instances_batched
        # computes them (float32 also under AMP).
        scores = (
            None
            if self.pre_nms_topk or num >= r
            else float32_loss(gi_scores)(teacher_probs, student_probs, mode=self.score_mode).float()
        )
        while scores is not None and num < r:
            best = scores.topk(num, dim=1)
            selected = self._select_at(
                best.indices.sort(dim=1).values,
                teacher_probs,
                student_probs,
                teacher_boxes,
                student_boxes,
                image_sizes,
            )
            # One comparison for the batch (a Python one per image would wait for the GPU each).
            if all(len(s) == self.top_k for _, s, _ in selected) and bool(
                (torch.stack([s[-1] for _, s, _ in selected]) > best.values[:, -1]).all()
            ):
                return [Boxes(boxes) for boxes, _, _ in selected]
            num *= 4
        selected = self._select_at(
            None, teacher_probs, student_probs, teacher_boxes, student_boxes, image_sizes
        )
        return [Boxes(boxes) for boxes, _, _ in selected]

    def _select_at(
        self,
        index: Optional[torch.Tensor],
        teacher_probs: torch.Tensor,
        student_probs: torch.Tensor,
        teacher_boxes: BoxesAt,
        student_boxes: BoxesAt,
        image_sizes: List[tuple],
    ) -> List[tuple]:
        """:func:`select_general_instances_batched` on the (N, T) predictions ``index`` (None: all
        of them), boxes clipped to each image; its (boxes, scores, from_teacher) per image."""

        def at(x: torch.Tensor) -> torch.Tensor:
            if index is None:
                return x
            return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

        def boxes_at(boxes: BoxesAt) -> torch.Tensor:
            if not callable(boxes):
                return at(boxes)
            if index is None:
                n, r = teacher_probs.shape[:2]
                return boxes(torch.arange(r, device=teacher_probs.device).expand(n, r))
            return boxes(index)

        teacher_boxes, student_boxes = boxes_at(teacher_boxes), boxes_at(student_boxes)
        # Clip every box to its own image: (N, 1, 4) upper bounds (w, h, w, h).
        hw = torch.as_tensor(image_sizes, dtype=teacher_boxes.dtype, device=teacher_boxes.device)
        upper = hw[:, [1, 0, 1, 0]][:, None]
        t_boxes = torch.min(teacher_boxes.clamp(min=0), upper)
        s_boxes = torch.min(student_boxes.clamp(min=0), upper)
        # A GI box clipped away entirely (predicted outside the image) is dropped by the selection.
        return select_general_instances_batched(
            at(teacher_probs),
            at(student_probs),
            t_boxes,
            s_boxes,
            top_k=self.top_k,
            nms_iou=self.nms_thresh,
            score_mode=self.score_mode,
            score_threshold=self.score_thresh,
            pre_nms_top_k=self.pre_nms_topk or None,
        )

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
