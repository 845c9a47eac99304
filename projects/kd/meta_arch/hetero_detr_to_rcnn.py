"""A DETR teacher distilled into a Faster R-CNN student: heterogeneous distillation through shared
box points (:mod:`kd.meta_arch.hetero`)."""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList, Instances
from torch import Tensor

from kd.families.rcnn import rcnn_decoded_boxes, roi_step, rpn_step
from kd.losses.class_space import convert_class_logits
from kd.meta_arch.base import gt_instances_of
from kd.meta_arch.hetero import CLASS_TARGETS, HeteroDistiller, check_choice
from kd.modeling.detr import DETREncoded, normalize_boxes
from kd.points.batch import pad_points
from kd.points.random import random_points
from kd.probes import (
    ProbeAnswer,
    probe_detr,
    probe_rcnn,
)

__all__ = ["DETRToRCNNDistiller"]


@META_ARCH_REGISTRY.register()
class DETRToRCNNDistiller(HeteroDistiller):
    """A DETR teacher distilled into a Faster R-CNN student at the student's ROI proposals.

    The student's forward runs step by step (backbone, RPN, ROI sampling, box head), exactly as
    ``GeneralizedRCNN`` + ``StandardROIHeads`` train, so its own losses are unchanged. The
    teacher encodes the batch once and decodes the points as isolated anchor queries; its answer
    supervises the student's box classification (KL, weighted per point by the teacher's top
    class probability) and its box for the teacher's top class (L1 + GIoU on normalised boxes).
    The KL compares the class distributions among the K object classes by default
    (``CLASS_TARGET "foreground"``), or the teacher's sigmoids mapped to a (K + 1)-way softmax
    against the student's whole softmax (``"full"``, ``KD.HETERO.BACKGROUND``).
    """

    teacher_family = "DETR"
    student_family = "Faster R-CNN"
    config_name = "RCNNToDETRDistiller"
    # Compares the teacher's classes mapped to the student's (KD.TEACHER.CLASS_MAP).
    accepts_class_map = True

    @configurable
    def __init__(
        self,
        *,
        proposal_points: bool = True,
        num_random_points: int = 0,
        class_target: str = "foreground",
        **kwargs,
    ):
        """
        Args:
            proposal_points: distil at the student's sampled ROI proposals.
            num_random_points: random boxes per image, answered by both models in addition.
            class_target: "foreground": the KL over the K object classes only (the student's
                softmax without its background logit, the teacher's K logits), background left
                to the student's own loss; "full": the teacher's answer mapped to a (K + 1)-way
                distribution (``background``) against the student's whole softmax.
            kwargs: the shared keys (see :class:`_HeteroDistiller`) and :class:`Distiller`'s.
        """
        if "detr_isolation" not in kwargs:
            kwargs["detr_isolation"] = "group"
        super().__init__(**kwargs)
        if not proposal_points and num_random_points <= 0:
            raise ValueError(
                "KD.HETERO.RCNN_STUDENT: no distillation points; set PROPOSAL_POINTS True or "
                "NUM_RANDOM_POINTS > 0"
            )
        if num_random_points < 0:
            raise ValueError(f"NUM_RANDOM_POINTS must be >= 0, got {num_random_points}")
        check_choice("KD.HETERO.RCNN_STUDENT.CLASS_TARGET", class_target, CLASS_TARGETS)
        self.proposal_points = proposal_points
        self.num_random_points = num_random_points
        self.class_target = class_target

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        kwargs, info = cls.build_pair(cfg)
        r = cfg.KD.HETERO.RCNN_STUDENT
        kwargs.update(cls._common_config(cfg, r))
        kwargs.update(
            class_map=info.class_map,
            proposal_points=r.PROPOSAL_POINTS,
            num_random_points=r.NUM_RANDOM_POINTS,
            class_target=r.CLASS_TARGET,
        )
        return kwargs

    def _student_rpn(
        self, s_inputs: List[dict]
    ) -> Tuple[
        ImageList, Dict[str, Tensor], List[Instances], Optional[List[Instances]], Dict[str, Tensor]
    ]:
        """The student's training step up to its ROI heads: backbone and RPN.

        Args:
            s_inputs: the batch as the student sees it (:meth:`student_inputs`).

        Returns:
            (images, features, proposals, ground truth, RPN losses).
        """
        student = self.student
        images = student.preprocess_image(s_inputs)
        gt_instances = gt_instances_of(s_inputs, self.device)
        features = student.backbone(images.tensor)
        rpn = rpn_step(student, images, features, gt_instances)
        return images, features, rpn.proposals, gt_instances, rpn.losses

    def forward_train(self, batched_inputs: List[dict]) -> Dict[str, Tensor]:
        images, features, proposals, gt_instances, losses = self._student_rpn(
            self.student_inputs(batched_inputs)
        )
        roi = roi_step(self.student, features, proposals, gt_instances)
        losses.update(roi.losses)
        losses.update(
            self._distill(batched_inputs, images, features, roi.proposals, roi.scores, roi.deltas)
        )
        return losses

    def _points(
        self, sampled: List[Instances], sizes: List[Tuple[int, int]]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The distillation points of this step: the sampled proposals, then random boxes.

        Args:
            sampled: the student's sampled proposals, per image.
            sizes: the student's input image sizes.

        Returns:
            (points, valid, random): (B, M, 4) all points, (B, M) True on real ones (the
            proposals are padded per image), and the (B, R, 4) random points (the last R of
            ``points``) or None.
        """
        point_parts, valid_parts = [], []
        if self.proposal_points:
            boxes = [p.proposal_boxes.tensor for p in sampled]
            points, valid = pad_points(
                [normalize_boxes(b[None], [size])[0] for b, size in zip(boxes, sizes)]
            )
            point_parts.append(points)
            valid_parts.append(valid)
        random = None
        if self.num_random_points > 0:
            random = random_points(
                len(sizes), self.num_random_points, mode=self.random_boxes, device=self.device
            )
            point_parts.append(random)
            valid_parts.append(torch.ones(random.shape[:2], dtype=torch.bool, device=self.device))
        return torch.cat(point_parts, 1), torch.cat(valid_parts, 1), random

    def _student_answers(
        self,
        sizes: List[Tuple[int, int]],
        features: Dict[str, Tensor],
        sampled: List[Instances],
        scores: Tensor,
        deltas: Tensor,
        valid: Tensor,
        random: Optional[Tensor],
    ) -> ProbeAnswer:
        """The student's answers at the points of :meth:`_points` (same layout)."""
        parts: List[ProbeAnswer] = []
        if self.proposal_points:
            # The box head already ran on exactly these boxes: its outputs are the probe's answer,
            # laid out in the padded (B, M) grid (valid entries are image-major, like the rows).
            boxes = [p.proposal_boxes.tensor for p in sampled]
            valid = valid[:, : valid.shape[1] - (0 if random is None else random.shape[1])]
            b, m = valid.shape
            logits = scores.new_zeros(b, m, scores.shape[-1])
            at = valid.nonzero(as_tuple=True)  # once for both scatters
            logits[at] = scores
            decoded = rcnn_decoded_boxes(self.student, deltas, torch.cat(boxes))
            absolute = decoded.new_zeros(b, m, *decoded.shape[1:])
            absolute[at] = decoded
            r = decoded.shape[1]
            # normalize_boxes clips the corners to the image already.
            normed = normalize_boxes(absolute.view(b, m * r, 4), sizes).view(b, m, r, 4)
            parts.append(ProbeAnswer(logits[None], normed[None], "softmax"))
        if random is not None:
            parts.append(probe_rcnn(self.student, features, sizes, random))
        return ProbeAnswer(
            torch.cat([p.logits for p in parts], 2),
            torch.cat([p.boxes for p in parts], 2),
            "softmax",
        )

    @torch.no_grad()
    def _teacher_probe(self, encoded: DETREncoded, points: Tensor, valid: Tensor) -> ProbeAnswer:
        """The teacher's final-layer answers at the points: its decoding of them as anchors
        (``valid``: the real points; the padding of the proposals is hidden from them)."""
        return probe_detr(
            self.teacher,
            encoded,
            points,
            content=self.detr_content,
            isolation=self.detr_isolation,
            valid=valid,
        ).last()

    def _distill(
        self,
        batched_inputs: List[dict],
        images: ImageList,
        features: Dict[str, Tensor],
        sampled: List[Instances],
        scores: Tensor,
        deltas: Tensor,
    ) -> Dict[str, Tensor]:
        sizes = images.image_sizes
        points, valid, random = self._points(sampled, sizes)
        student = self._student_answers(sizes, features, sampled, scores, deltas, valid, random)
        with torch.no_grad():
            encoded = self.teacher.encode(self.teacher_inputs(batched_inputs))
        teacher = self._teacher_probe(encoded, points, valid)
        cmap = self.class_map
        if cmap is None:
            t_top = teacher.foreground_probs()[-1].argmax(dim=-1)
        else:
            # The teacher's top class among the classes both have, as a student class.
            t_top = cmap.student_class(
                cmap.teacher_columns(teacher.foreground_probs()[-1]).argmax(dim=-1)
            )
        # The mask made an index once: each boolean-mask gather would wait for the GPU.
        at = valid.nonzero(as_tuple=True)
        t_boxes = teacher.class_boxes()[-1][at]
        s_boxes = student.class_boxes(t_top)[-1][at]
        s_logits = student.logits[-1][at]
        t_logits = teacher.logits[-1][at]
        if cmap is not None:
            # Only the classes both have (kd.class_map); the student's background stays last.
            t_logits = cmap.teacher_columns(t_logits)
            s_logits = torch.cat([cmap.student_columns(s_logits), s_logits[:, -1:]], 1)
        if self.class_target == "full":
            t_logits = convert_class_logits(t_logits, "sigmoid", "softmax", self.background)
            terms = self._loss(s_logits, s_boxes, t_logits, t_boxes, "softmax", True)
        else:
            # KD-DETR's KL over the K object classes: the student's logits without background.
            terms = self._loss(s_logits[:, :-1], s_boxes, t_logits, t_boxes, "sigmoid", False)
        return self._named(terms)

    def prepare_point_decoding(
        self, batched_inputs: List[dict]
    ) -> Callable[[], Tuple[Tensor, Tensor, ProbeAnswer, Optional[ProbeAnswer]]]:
        """The extra decoding of a KD step, ready to be timed alone (``tools/benchmark_kd.py``).

        Done here, untimed and without any graph, is what a student training step and a teacher
        inference forward already do: the student's backbone, RPN and ROI sampling (in training
        mode, as the KD step runs them), the points, and the teacher's encoding.

        The student's box head at its sampled proposals is part of its own training step (its box
        losses use the very outputs the distillation reads), so at the proposal points only the
        teacher's decoding is extra; at random points (``NUM_RANDOM_POINTS``) the student's box
        head runs in addition.

        Args:
            batched_inputs: the batch as the distiller receives it.

        Returns:
            A closure, callable any number of times, that decodes the points as the KD step does,
            without any loss, and returns (points (B, M, 4), valid (B, M), the teacher's final
            answer at them, the student's answer at the random points or None).
        """
        with torch.no_grad():
            images, features, proposals, gt_instances, _ = self._student_rpn(
                self.student_inputs(batched_inputs)
            )
            sampled = self.student.roi_heads.label_and_sample_proposals(proposals, gt_instances)
            points, valid, random = self._points(sampled, images.image_sizes)
            encoded = self.teacher.encode(self.teacher_inputs(batched_inputs))
        for feature in features.values():  # for a timed backward of the random-point probe
            feature.requires_grad_(True)

        def decode() -> Tuple[Tensor, Tensor, ProbeAnswer, Optional[ProbeAnswer]]:
            teacher = self._teacher_probe(encoded, points, valid)
            student = None
            if random is not None:
                student = probe_rcnn(self.student, features, images.image_sizes, random)
            return points, valid, teacher, student

        return decode
