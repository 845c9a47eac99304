"""General Instance Distillation (Dai et al., CVPR 2021) for RetinaNet, FCOS and Faster R-CNN.

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

from functools import partial
from typing import Callable, Dict, List, Optional, Union

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.structures.boxes import pairwise_point_box_distance
from detectron2.utils.events import get_event_storage
from torch import nn

from kd.losses.gid import (
    gi_feature_loss,
    gi_relation_loss,
    gi_relation_losses,
    gi_response_loss,
    gi_scores,
    select_general_instances_batched,
)
from kd.losses.precision import float32_loss
from kd.meta_arch.base import Distiller, gt_instances_of
from kd.meta_arch.chen2017 import Chen2017Distiller, _flatten_rpn_outputs
from kd.roi_align import pool_levels, with_fast_roi_align_grad

__all__ = [
    "GeneralInstanceDistillation",
    "GIDRetinaNetDistiller",
    "GIDFCOSDistiller",
    "GIDFasterRCNNDistiller",
    "check_dense_layout",
    "matcher_foreground",
]

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
                :func:`kd.losses.gid.gi_scores`.
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
            conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
            self.adapters.append(conv)

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
    sa, ta = anchor_generator_of(student), anchor_generator_of(teacher)
    problems = []
    if list(sa.strides) != list(ta.strides):
        problems.append(f"strides {list(sa.strides)} vs {list(ta.strides)}")
    if list(sa.num_cell_anchors) != list(ta.num_cell_anchors) or not all(
        torch.allclose(a.cpu(), b.cpu()) for a, b in zip(sa.cell_anchors, ta.cell_anchors)
    ):
        problems.append("different anchors per location (MODEL.ANCHOR_GENERATOR)")
    if sa.offset != ta.offset:
        problems.append(f"anchor offsets {sa.offset} vs {ta.offset}")
    s_div, t_div = student.backbone.size_divisibility, teacher.backbone.size_divisibility
    if s_div != t_div:
        problems.append(f"size_divisibility {s_div} vs {t_div} (padded inputs differ)")
    s_cls, t_cls = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if s_cls != t_cls:
        problems.append(f"{s_cls} vs {t_cls} classes")
    if problems:
        raise ValueError(
            f"{what}: GID compares teacher and student prediction by prediction, so both need "
            f"the same dense layout (student vs teacher): {'; '.join(problems)}. Give the teacher "
            "the student's head features, anchors and classes"
        )


def _same_transform(a, b) -> bool:
    return type(a) is type(b) and vars(a) == vars(b)


def matcher_foreground(matcher: Matcher, gi_boxes: List[Boxes], anchors: Boxes) -> torch.Tensor:
    """(N, R) bool: the anchors ``matcher`` labels foreground (1) in each image, GI boxes as its
    ground truth; detectron2's :class:`Matcher` (thresholds, labels, low-quality matches with ties)
    for every image of the batch at once instead of one call per image.

    Args:
        matcher: the detector's own anchor matcher.
        gi_boxes: N ``Boxes``, the GI boxes of each image (any number, also none).
        anchors: the R anchors shared by the batch.
    """
    n, r = len(gi_boxes), len(anchors)
    m = max((len(b) for b in gi_boxes), default=0)
    a = anchors.tensor
    if m == 0:  # no ground truth anywhere: every anchor gets the first label, as in Matcher
        return torch.full((n, r), matcher.labels[0] == 1, dtype=torch.bool, device=a.device)
    gt = a.new_zeros((n, m, 4))
    valid = torch.zeros((n, m), dtype=torch.bool, device=a.device)
    for i, b in enumerate(gi_boxes):
        gt[i, : len(b)] = b.tensor
        valid[i, : len(b)] = True
    # detectron2's pairwise_iou, one GI box of every image at a time: (N, R) planes that stay in
    # cache, instead of an (N, M, R) tensor whose every temporary is fresh memory (5x slower per
    # operation on CPU). Its ``where(inter > 0, inter / union, 0)`` is left out: an anchor has an
    # area, so union > 0 and inter / union is already exactly 0 where inter is.
    ax1, ay1, ax2, ay2 = (c.contiguous() for c in a.unbind(dim=1))
    area = anchors.area()
    best = torch.full((n, r), float("-inf"), dtype=a.dtype, device=a.device)
    low_quality = torch.zeros((n, r), dtype=torch.bool, device=a.device)
    for j in range(m):
        gx1, gy1, gx2, gy2 = (c[:, None] for c in gt[:, j].unbind(dim=-1))  # (N, 1) each
        inter = torch.min(gx2, ax2).sub_(torch.max(gx1, ax1)).clamp_(min=0)
        inter.mul_(torch.min(gy2, ay2).sub_(torch.max(gy1, ay1)).clamp_(min=0))
        iou = inter.div_(((gx2 - gx1) * (gy2 - gy1) + area).sub_(inter))
        # A padding row (an image with fewer boxes) takes part in nothing.
        iou.masked_fill_(~valid[:, j, None], float("-inf"))
        torch.max(best, iou, out=best)
        if matcher.allow_low_quality_matches:
            # Each GI box's best anchors, ties included, become foreground.
            low_quality |= (iou == iou.max(dim=1, keepdim=True).values) & valid[:, j, None]
    # An image without boxes keeps -inf: the lowest bin, as Matcher labels an empty ground truth.
    labels = torch.ones((n, r), dtype=torch.int8, device=a.device)
    # masked_fill_, not labels[mask] = ...: the same values without waiting for the GPU.
    for label, low, high in zip(matcher.labels, matcher.thresholds[:-1], matcher.thresholds[1:]):
        labels.masked_fill_((best >= low) & (best < high), label)
    if matcher.allow_low_quality_matches:
        labels.masked_fill_(low_quality, 1)
    return labels == 1


def _deltas_in_student_space(t_deltas, anchors, s_transform, t_transform) -> torch.Tensor:
    """The teacher's deltas (N, R, 4) re-encoded with the student's box transform."""
    if _same_transform(s_transform, t_transform):
        return t_deltas
    n = t_deltas.shape[0]
    rep = anchors.repeat(n, 1)
    boxes = t_transform.apply_deltas(t_deltas.reshape(-1, 4), rep)
    return s_transform.get_deltas(rep, boxes).view_as(t_deltas)


def _decode(
    transform, deltas: torch.Tensor, anchors: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """(N, T, 4) boxes: the (N, R, 4) deltas decoded on the (R, 4) anchors shared by the batch,
    at the (N, T) predictions ``index`` only (decoding is row by row: the same values as decoding
    all and picking them)."""
    deltas = deltas.gather(1, index[..., None].expand(-1, -1, 4))
    boxes = transform.apply_deltas(deltas.reshape(-1, 4), anchors[index].reshape(-1, 4))
    return boxes.view_as(deltas)


def _log_counts(gi_boxes: List[Boxes], mask: Optional[torch.Tensor]) -> None:
    try:
        storage = get_event_storage()
    except AssertionError:  # called outside a trainer (tests, tools)
        return
    storage.put_scalar("kd_gid/num_instances", sum(len(b) for b in gi_boxes) / len(gi_boxes))
    if mask is not None:
        storage.put_scalar("kd_gid/response_rows", mask.sum().item() / len(gi_boxes))


class _DenseGIDDistiller(Distiller):
    """GID for one-stage dense detectors (detectron2's :class:`DenseDetector` family).

    Subclasses say which model family they take and how to read its dense outputs
    (:meth:`_gi_probs`, :meth:`_response_outputs`, :meth:`response_mask`).
    """

    family = nn.Module
    dense_names = ("cls", "deltas")

    @configurable
    def __init__(self, *, gid: GeneralInstanceDistillation, **kwargs):
        """
        Args:
            gid: the GID module (selection, losses, adapters).
            kwargs: :class:`Distiller` arguments.
        """
        super().__init__(**kwargs)
        name = type(self).__name__
        for who, model in (("student", self.student), ("teacher", self.teacher)):
            if not isinstance(model, self.family):
                raise ValueError(
                    f"{name} needs a {self.family.__name__} {who}; got {type(model).__name__}"
                )
        if self.student_input_scale != 1.0:
            raise ValueError(
                f"{name}: GID compares dense predictions location by location, which needs "
                "teacher and student at the same input size: set KD.STUDENT.INPUT_SCALE 1.0"
            )
        check_dense_layout(self.student, self.teacher, lambda m: m.anchor_generator, name)
        s_strides = [
            self.student.backbone.output_shape()[f].stride for f in self.student.head_in_features
        ]
        t_strides = [
            self.teacher.backbone.output_shape()[f].stride for f in self.teacher.head_in_features
        ]
        if s_strides != t_strides:
            raise ValueError(
                f"{name}: the heads run on strides {s_strides} (student) and {t_strides} "
                "(teacher); GID needs the same dense layout: use the same head features"
            )
        self.gid = gid.to(self.student.device)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        kwargs, _ = cls.build_pair(cfg)
        student, teacher = kwargs["student"], kwargs["teacher"]
        kwargs["gid"] = GeneralInstanceDistillation(
            cfg,
            in_features=getattr(student, "head_in_features", []),
            student_shapes=student.backbone.output_shape(),
            teacher_shapes=teacher.backbone.output_shape(),
        )
        return kwargs

    # ------------------------------------------------------------------ family hooks
    def _dims(self, model: nn.Module) -> List[int]:
        return [model.num_classes, 4]

    def _gi_probs(self, dense: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, R, C) scores GISM compares."""
        return dense["cls"].sigmoid()

    def _response_outputs(self, dense: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, R, C') logits the response loss compares."""
        return dense["cls"]

    def response_mask(
        self, anchors: List[Boxes], gi_boxes: List[Boxes], image_sizes: List[tuple]
    ) -> torch.Tensor:
        """(N, R) bool: the dense predictions the GI boxes select for the response loss."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    def _dense(self, model: nn.Module, predictions) -> Dict[str, torch.Tensor]:
        """The head's per-level outputs as (N, R, K) tensors, R = every level's predictions."""
        per_level = model._transpose_dense_predictions(predictions, self._dims(model))
        return {name: cat(p, dim=1) for name, p in zip(self.dense_names, per_level)}

    @torch.no_grad()
    def _teacher_dense(self, batched_inputs: List[dict]):
        teacher = self.teacher
        t_features = teacher.backbone(self.teacher_images(batched_inputs).tensor)
        t_dense = self._dense(
            teacher, teacher.head([t_features[f] for f in teacher.head_in_features])
        )
        return t_features, t_dense

    @torch.no_grad()
    def _select(self, dense, t_dense, anchors: List[Boxes], image_sizes) -> List[Boxes]:
        if dense["cls"].shape != t_dense["cls"].shape:
            raise ValueError(
                f"teacher and student dense outputs differ in shape ({tuple(t_dense['cls'].shape)}"
                f" vs {tuple(dense['cls'].shape)}): they must see the same (padded) input size"
            )
        anchors = Boxes.cat(anchors).tensor
        return self.gid.select(
            self._gi_probs(t_dense),
            self._gi_probs(dense),
            partial(_decode, self.teacher.box2box_transform, t_dense["deltas"], anchors),
            partial(_decode, self.student.box2box_transform, dense["deltas"], anchors),
            image_sizes,
        )

    def forward_train(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        student = self.student
        # The teacher first: its transient activations are freed before the student's graph is
        # built, whose forward then reuses that memory. Run after the student, the same teacher
        # work took about 60 ms more per iteration (RetinaNet, CPU: 370 ms vs 305 ms alone).
        teacher_out = self._teacher_dense(batched_inputs) if self.gid.enabled else None
        images = student.preprocess_image(batched_inputs)
        gt_instances = gt_instances_of(batched_inputs, self.device)
        features = student.backbone(images.tensor)
        head_features = [features[f] for f in student.head_in_features]
        predictions = student.head(head_features)
        losses = student.forward_training(images, head_features, predictions, gt_instances)
        if not self.gid.enabled:
            return losses

        dense = self._dense(student, predictions)
        anchors = student.anchor_generator(head_features)
        t_features, t_dense = teacher_out
        gi_boxes = self._select(dense, t_dense, anchors, images.image_sizes)
        losses.update(self.gid.feature_losses(features, t_features, gi_boxes))
        mask = None
        if self.gid.needs_response:
            mask = self.response_mask(anchors, gi_boxes, images.image_sizes)
            t_deltas = _deltas_in_student_space(
                t_dense["deltas"],
                Boxes.cat(anchors).tensor,
                student.box2box_transform,
                self.teacher.box2box_transform,
            )
            losses.update(
                self.gid.response_losses(
                    self._response_outputs(dense),
                    self._response_outputs(t_dense),
                    dense["deltas"],
                    t_deltas,
                    mask,
                )
            )
        _log_counts(gi_boxes, mask)
        return losses

    @torch.no_grad()
    def general_instances(self, batched_inputs: List[dict]) -> List[Boxes]:
        """The GI boxes GISM selects for a batch, in the (resized) input image's coordinates.

        Runs in the current mode (training: batch statistics, as during distillation).
        """
        student = self.student
        images = student.preprocess_image(batched_inputs)
        features = student.backbone(images.tensor)
        head_features = [features[f] for f in student.head_in_features]
        dense = self._dense(student, student.head(head_features))
        anchors = student.anchor_generator(head_features)
        _, t_dense = self._teacher_dense(batched_inputs)
        return self._select(dense, t_dense, anchors, images.image_sizes)

    def distillation_points(self, batched_inputs: List[dict]) -> List[Dict[str, Boxes]]:
        """Per image, the named sets of boxes this distiller compares teacher and student at."""
        return [{"general instances": b} for b in self.general_instances(batched_inputs)]


@META_ARCH_REGISTRY.register()
class GIDRetinaNetDistiller(_DenseGIDDistiller):
    """GID with RetinaNet teacher and student.

    Response mask: the anchors the student's own ``anchor_matcher`` (``MODEL.RETINANET.
    IOU_THRESHOLDS``, with its low-quality matches) labels foreground when the GI boxes are the
    ground truth.
    """

    family = RetinaNet

    def response_mask(self, anchors, gi_boxes, image_sizes):
        return matcher_foreground(self.student.anchor_matcher, gi_boxes, Boxes.cat(anchors))


@META_ARCH_REGISTRY.register()
class GIDFCOSDistiller(_DenseGIDDistiller):
    """GID with FCOS teacher and student.

    GI score: the sigmoid class probabilities (``KD.GID.FCOS_SCORE "cls"``, the paper's "class
    scores"), or FCOS's own detection score ``sqrt(cls * centerness)`` ("cls_ctr"). Response mask
    (``KD.GID.FCOS_ASSIGNMENT``): the locations whose centre lies inside a GI box ("inside", the
    paper), or FCOS's own assignment with its centre sampling and scale ranges ("fcos"). With
    ``KD.GID.FCOS_CENTERNESS`` the centerness logit is distilled as one more BCE column.
    """

    family = FCOS
    dense_names = ("cls", "deltas", "ctr")

    @configurable
    def __init__(
        self, *, score: str = "cls", assignment: str = "inside", centerness: bool = True, **kwargs
    ):
        """
        Args:
            score: "cls" or "cls_ctr", the score GISM compares [open].
            assignment: "inside" [paper] or "fcos" [open], the response mask.
            centerness: also distil the centerness logit in the response loss [open].
            kwargs: :class:`_DenseGIDDistiller` arguments.
        """
        if score not in ("cls", "cls_ctr"):
            raise ValueError(f"KD.GID.FCOS_SCORE must be 'cls' or 'cls_ctr', got {score!r}")
        if assignment not in ("inside", "fcos"):
            raise ValueError(
                f"KD.GID.FCOS_ASSIGNMENT must be 'inside' or 'fcos', got {assignment!r}"
            )
        super().__init__(**kwargs)
        self.score = score
        self.assignment = assignment
        self.centerness = centerness

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        kwargs = super().from_config(cfg)
        kwargs.update(
            score=cfg.KD.GID.FCOS_SCORE,
            assignment=cfg.KD.GID.FCOS_ASSIGNMENT,
            centerness=cfg.KD.GID.FCOS_CENTERNESS,
        )
        return kwargs

    def _dims(self, model):
        return [model.num_classes, 4, 1]

    def _gi_probs(self, dense):
        if self.score == "cls":
            return dense["cls"].sigmoid()
        # FCOS's own inference score (eq. 4 of the FCOS journal version).
        return torch.sqrt(dense["cls"].sigmoid() * dense["ctr"].sigmoid())

    def _response_outputs(self, dense):
        if self.centerness:
            return torch.cat([dense["cls"], dense["ctr"]], dim=-1)
        return dense["cls"]

    def response_mask(self, anchors, gi_boxes, image_sizes):
        if self.assignment == "fcos":
            gts = []
            for boxes, size in zip(gi_boxes, image_sizes):
                inst = Instances(size)
                inst.gt_boxes = boxes
                gts.append(inst)
            num = sum(len(a) for a in anchors)
            # FCOS's match_anchors cannot take an image without boxes.
            return torch.stack(
                [
                    (
                        self.student.match_anchors(anchors, [g])[0] >= 0
                        if len(g)
                        else torch.zeros(num, dtype=torch.bool, device=g.gt_boxes.device)
                    )
                    for g in gts
                ]
            )
        centers = Boxes.cat(anchors).get_centers()
        return torch.stack(
            [
                (pairwise_point_box_distance(centers, boxes).min(dim=2).values > 0).any(dim=1)
                for boxes in gi_boxes
            ]
        )


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
        logits, t_logits = cat(rpn.logits, dim=1), cat(rpn.t_logits, dim=1)
        deltas, t_deltas = cat(rpn.deltas, dim=1), cat(rpn.t_deltas, dim=1)
        gi_boxes = self._select(
            logits, t_logits, deltas, t_deltas, rpn.anchors, steps.images.image_sizes
        )
        losses.update(self.gid.feature_losses(steps.features, steps.t_features, gi_boxes))
        mask = None
        if self.gid.needs_response:
            mask = self.response_mask(rpn.anchors, gi_boxes)
            t_deltas = _deltas_in_student_space(
                t_deltas,
                Boxes.cat(rpn.anchors).tensor,
                self.student.proposal_generator.box2box_transform,
                self.teacher.proposal_generator.box2box_transform,
            )
            losses.update(
                self.gid.response_losses(
                    logits[..., None], t_logits[..., None], deltas, t_deltas, mask
                )
            )
        _log_counts(gi_boxes, mask)
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
            partial(_decode, t_transform, t_deltas, anchors),
            partial(_decode, s_transform, deltas, anchors),
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
            feats = model.backbone(images.tensor)
            feats = [feats[f] for f in rpn.in_features]
            logits, deltas = _flatten_rpn_outputs(rpn, *rpn.rpn_head(feats))
            outs.append(
                (
                    cat(logits, dim=1),
                    cat(deltas, dim=1),
                    rpn.anchor_generator(feats),
                    images.image_sizes,
                )
            )
        (logits, deltas, anchors, sizes), (t_logits, t_deltas, _, _) = outs
        return self._select(logits, t_logits, deltas, t_deltas, anchors, sizes)

    def distillation_points(self, batched_inputs: List[dict]) -> List[Dict[str, Boxes]]:
        """Per image, the named sets of boxes this distiller compares teacher and student at."""
        return [{"general instances": b} for b in self.general_instances(batched_inputs)]
