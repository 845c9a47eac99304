"""Heterogeneous distillation through shared box points: DETR <-> Faster R-CNN.

DESIGN.md section 2: a teacher and a student of different families are compared at boxes both can
be asked about (:mod:`kd.probes`). An R-CNN answers at a box with its box head (ROIAlign on its
own FPN features), a DETR by decoding the box as an anchor query isolated from its detection
queries. The teacher's answer is brought into the student's class space
(:mod:`kd.losses.class_space`), then compared with the student's answer at the same box by the
KD-DETR loss (:func:`kd.losses.kd_detr.kd_detr_loss`: KL of the class distributions, L1 and GIoU
of the refined boxes, each point weighted by the teacher's top class probability). For an R-CNN
student the KL compares, by default, only the distributions among the K object classes: a
focal-loss DETR's sigmoids are low even on objects, and mapped to a (K + 1)-way softmax they call
objects mostly background (measured in docs/methods.md "Heterogeneous distillation").

* :class:`DETRToRCNNDistiller`: DETR teacher, Faster R-CNN student. The points are the student's
  sampled ROI proposals (the boxes its own box head losses use this step) and optionally random
  boxes; the student's box head output at its proposals *is* its probe there, so distillation
  costs the student nothing extra.
* :class:`RCNNToDETRDistiller`: Faster R-CNN teacher, DETR student. The points are random boxes
  and the student's own detection anchors, decoded by the student as distillation queries
  (KD-DETR's general and specific points) and answered by the teacher's box head.

The DETR teacher may also be a Hugging Face one (``hf://``, :mod:`kd.families.hf_detr`), and its
classes may be mapped to the student's (``KD.TEACHER.CLASS_MAP``, :mod:`kd.class_map`; DETR ->
Faster R-CNN only): the class terms then compare the mapped classes only.

The student keeps all its own losses unchanged; the distillation terms are added as
``loss_kd_hetero_cls``, ``loss_kd_hetero_l1`` and ``loss_kd_hetero_giou`` (weights
``KD.HETERO.*``; a weight of 0 leaves its term out). Points are normalised boxes, so a
low-resolution student (``KD.STUDENT.INPUT_SCALE``) needs no extra mapping.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from kd.class_map import ClassMap
from kd.families.hf_detr import HFDETRTeacher
from kd.families.rcnn import is_faster_rcnn, rcnn_decoded_boxes, roi_step, rpn_step
from kd.losses.class_space import BACKGROUND_MODES, convert_class_logits
from kd.losses.kd_detr import kd_detr_loss
from kd.meta_arch.base import Distiller, gt_instances_of
from kd.modeling.detr import DETR, DETREncoded, normalize_boxes
from kd.points.batch import clip_points, pad_points
from kd.points.random import RANDOM_BOX_MODES, random_points
from kd.probes import (
    DETR_CONTENTS,
    DETR_ISOLATIONS,
    ProbeAnswer,
    probe_detr,
    probe_rcnn,
)

__all__ = ["DETRToRCNNDistiller", "RCNNToDETRDistiller"]

PREFIX = "loss_kd_hetero_"
TERMS = ("cls", "l1", "giou")
NORMALIZE_MODES = ("num_queries", "weight_sum")
CLASS_TARGETS = ("full", "foreground")


def _family(model: nn.Module) -> str:
    if isinstance(model, (DETR, HFDETRTeacher)):
        return "DETR"
    if is_faster_rcnn(model):
        return "Faster R-CNN"
    return type(model).__name__


def _num_classes(model: nn.Module) -> int:
    if isinstance(model, (DETR, HFDETRTeacher)):
        return model.num_classes
    return model.roi_heads.num_classes


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")


class _HeteroDistiller(Distiller):
    """The part both directions share: the loss weights, the class mapping and the loss call."""

    # None: the same classes, compared index by index (KD.TEACHER.CLASS_MAP).
    class_map: Optional[ClassMap] = None
    # Set by the subclasses: the families they accept, for the error message.
    teacher_family = ""
    student_family = ""
    config_name = ""

    def __init__(
        self,
        *,
        background: str = "max",
        detr_content: str = "zeros",
        random_boxes: str = "sigmoid_normal",
        foreground_weight: bool = True,
        cls_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        temperature: float = 1.0,
        normalize: str = "num_queries",
        detr_isolation: str = "point",
        class_map: Optional[ClassMap] = None,
        **kwargs,
    ):
        """
        Args:
            background: sigmoid -> softmax background mode (``KD.HETERO.BACKGROUND``).
            detr_content: content of the points a DETR decodes, "zeros" or "anchor".
            random_boxes: how random points are drawn, "sigmoid_normal" or "uniform".
            foreground_weight: weight each point by the teacher's top class probability.
            cls_weight, l1_weight, giou_weight: lambda of each loss term; 0 removes the term.
            temperature: T of the KL.
            normalize: "num_queries" or "weight_sum", the divisor of the sums over points.
            detr_isolation: "point" or "group", how the DETR of the pair decodes the points.
            class_map: the teacher's classes mapped to the student's (for the distillers whose
                ``accepts_class_map``); None: the same classes.
            kwargs: :class:`Distiller` arguments.
        """
        super().__init__(**kwargs)
        if _family(self.teacher) != self.teacher_family or _family(self.student) != (
            self.student_family
        ):
            raise ValueError(
                f"{type(self).__name__} distils a {self.teacher_family} teacher into a "
                f"{self.student_family} student; got a {_family(self.teacher)} teacher "
                f"(KD.TEACHER.CONFIG_FILE) and a {_family(self.student)} student "
                f"(KD.STUDENT.META_ARCHITECTURE / MODEL.*). For the other direction use "
                f"{self.config_name}; for a same-family pair use its homogeneous distiller"
            )
        if class_map is not None and not getattr(self, "accepts_class_map", False):
            raise ValueError(f"{type(self).__name__} compares classes index by index")
        self.class_map = class_map
        t_k, s_k = _num_classes(self.teacher), _num_classes(self.student)
        if class_map is None and t_k != s_k:
            raise ValueError(f"teacher predicts {t_k} classes, the student {s_k}")
        _check_choice("KD.HETERO.BACKGROUND", background, BACKGROUND_MODES)
        _check_choice("KD.HETERO.DETR_CONTENT", detr_content, DETR_CONTENTS)
        _check_choice("KD.HETERO.RANDOM_BOXES", random_boxes, RANDOM_BOX_MODES)
        _check_choice("KD.HETERO.*.NORMALIZE", normalize, NORMALIZE_MODES)
        _check_choice("KD.HETERO.*.DETR_ISOLATION", detr_isolation, DETR_ISOLATIONS)
        if temperature <= 0:
            raise ValueError(f"KD.HETERO.*.TEMPERATURE must be > 0, got {temperature}")
        self.background = background
        self.detr_content = detr_content
        self.random_boxes = random_boxes
        self.foreground_weight = foreground_weight
        self.weights = {"cls": cls_weight, "l1": l1_weight, "giou": giou_weight}
        self.temperature = temperature
        self.normalize = normalize
        self.detr_isolation = detr_isolation

    @staticmethod
    def _common_config(cfg: CfgNode, direction: CfgNode) -> dict:
        h = cfg.KD.HETERO
        return dict(
            background=h.BACKGROUND,
            detr_content=h.DETR_CONTENT,
            random_boxes=h.RANDOM_BOXES,
            foreground_weight=h.FOREGROUND_WEIGHT,
            cls_weight=h.CLS_WEIGHT,
            l1_weight=h.L1_WEIGHT,
            giou_weight=h.GIOU_WEIGHT,
            temperature=direction.TEMPERATURE,
            normalize=direction.NORMALIZE,
            detr_isolation=direction.DETR_ISOLATION,
        )

    def _loss(
        self,
        s_logits: Tensor,
        s_boxes: Tensor,
        t_logits: Tensor,
        t_boxes: Tensor,
        teacher_activation: str,
        no_object_class: bool,
    ) -> Dict[str, Tensor]:
        """:func:`kd_detr_loss` with this distiller's weights, on (1, N, .) tensors."""
        return kd_detr_loss(
            s_logits[None],
            s_boxes[None],
            t_logits[None],
            t_boxes[None],
            temperature=self.temperature,
            cls_weight=self.weights["cls"],
            l1_weight=self.weights["l1"],
            giou_weight=self.weights["giou"],
            foreground_weight=self.foreground_weight,
            teacher_probs_activation=teacher_activation,
            no_object_class=no_object_class,
            normalize=self.normalize,
        )

    def _named(self, terms: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {PREFIX + k: v for k, v in terms.items() if self.weights[k] != 0}


@META_ARCH_REGISTRY.register()
class DETRToRCNNDistiller(_HeteroDistiller):
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
        _check_choice("KD.HETERO.RCNN_STUDENT.CLASS_TARGET", class_target, CLASS_TARGETS)
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


@META_ARCH_REGISTRY.register()
class RCNNToDETRDistiller(_HeteroDistiller):
    """A Faster R-CNN teacher distilled into a DETR student at the student's distillation queries.

    The student encodes the batch once; its detection (and denoising) queries give its usual
    losses (``forward_encoded``). Its distillation points, random boxes and its own detection
    anchors, are decoded as isolated anchor queries (one set after the other) and answered by the
    teacher's box head at the same boxes. The teacher's softmax is mapped to K sigmoids (``p_k =
    softmax_k``) and the KD-DETR loss compares every distilled student decoder layer with it;
    each point set is averaged over its points, the sets and layers are summed (as KD-DETR).
    """

    teacher_family = "Faster R-CNN"
    student_family = "DETR"
    config_name = "DETRToRCNNDistiller"

    @configurable
    def __init__(
        self,
        *,
        num_random_points: int = 100,
        anchor_points: bool = True,
        all_layers: bool = True,
        **kwargs,
    ):
        """
        Args:
            num_random_points: random boxes per image, redrawn every iteration.
            anchor_points: also distil at the student's own detection anchors (its per-image
                selected proposals for two-stage models, its learned anchors otherwise).
            all_layers: every student decoder layer against the teacher's answer (KD-DETR
                [code]); False: the last layer only.
            kwargs: the shared keys (see :class:`_HeteroDistiller`) and :class:`Distiller`'s.
        """
        kwargs.setdefault("temperature", 10.0)
        super().__init__(**kwargs)
        if num_random_points < 0:
            raise ValueError(f"NUM_RANDOM_POINTS must be >= 0, got {num_random_points}")
        if num_random_points == 0 and not anchor_points:
            raise ValueError(
                "KD.HETERO.DETR_STUDENT: no distillation points; set NUM_RANDOM_POINTS > 0 or "
                "ANCHOR_POINTS True"
            )
        self.num_random_points = num_random_points
        self.anchor_points = anchor_points
        self.all_layers = all_layers

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        kwargs, _ = cls.build_pair(cfg)
        d = cfg.KD.HETERO.DETR_STUDENT
        kwargs.update(cls._common_config(cfg, d))
        kwargs.update(
            num_random_points=d.NUM_RANDOM_POINTS,
            anchor_points=d.ANCHOR_POINTS,
            all_layers=d.ALL_LAYERS,
        )
        return kwargs

    def point_sets(self, encoded) -> List[Tensor]:
        """The distillation points of this step: [(B, M_g, 4) random, (B, N, 4) anchors]."""
        sets = []
        if self.num_random_points > 0:
            sets.append(
                random_points(
                    encoded.batch_size,
                    self.num_random_points,
                    mode=self.random_boxes,
                    device=self.device,
                )
            )
        if self.anchor_points:
            sets.append(clip_points(self.student.detection_anchors(encoded).detach()))
        return sets

    def _student_probes(self, encoded: DETREncoded, sets: List[Tensor]) -> List[ProbeAnswer]:
        """The student's answers at each point set (every decoder layer), one pass per set."""
        return [
            probe_detr(
                self.student, encoded, p, content=self.detr_content, isolation=self.detr_isolation
            )
            for p in sets
        ]

    @torch.no_grad()
    def _teacher_features(self, batched_inputs: List[dict]) -> Tuple[ImageList, Dict[str, Tensor]]:
        """The teacher's images and backbone features (its inference forward computes them too)."""
        images = self.teacher_images(batched_inputs)
        return images, self.teacher.backbone(images.tensor)

    @torch.no_grad()
    def _teacher_probe(
        self, images: ImageList, features: Dict[str, Tensor], sets: List[Tensor]
    ) -> ProbeAnswer:
        """The teacher's box head at all the point sets, concatenated along the points."""
        return probe_rcnn(self.teacher, features, images.image_sizes, torch.cat(sets, 1))

    def forward_train(self, batched_inputs: List[dict]) -> Dict[str, Tensor]:
        student = self.student
        s_inputs = self.student_inputs(batched_inputs)
        encoded = student.encode(s_inputs)
        losses = student.forward_encoded(encoded, s_inputs)
        sets = self.point_sets(encoded)
        answers = self._student_probes(encoded, sets)
        teacher = self._teacher_probe(*self._teacher_features(batched_inputs), sets)
        with torch.no_grad():
            # The teacher's box for its own top class; its softmax as K sigmoids.
            t_boxes = teacher.class_boxes()[-1]
            t_logits = convert_class_logits(teacher.logits[-1], "softmax", "sigmoid")
        layers = range(answers[0].num_layers) if self.all_layers else [-1]
        totals: Dict[str, Tensor] = {}
        start = 0
        for points, answer in zip(sets, answers):
            end = start + points.shape[1]
            for layer in layers:
                terms = self._loss(
                    answer.logits[layer].flatten(0, 1),
                    answer.boxes[layer, ..., 0, :].flatten(0, 1),
                    t_logits[:, start:end].flatten(0, 1),
                    t_boxes[:, start:end].flatten(0, 1),
                    "sigmoid",
                    False,
                )
                for k, v in terms.items():
                    totals[k] = totals[k] + v if k in totals else v
            start = end
        losses.update(self._named(totals))
        return losses

    def prepare_point_decoding(
        self, batched_inputs: List[dict]
    ) -> Callable[[], Tuple[List[Tensor], ProbeAnswer, List[ProbeAnswer]]]:
        """The extra decoding of a KD step, ready to be timed alone (``tools/benchmark_kd.py``).

        Done here, untimed and without any graph, is what a student training step and a teacher
        inference forward already do: the student's encoding (in its current mode), the points,
        and the teacher's backbone features. The student's detection queries are decoded in their
        own pass, so its decoding of the point sets is all extra, as is the teacher's box head at
        the points (its inference forward runs the box head at its own proposals instead).

        Args:
            batched_inputs: the batch as the distiller receives it.

        Returns:
            A closure, callable any number of times, that decodes the points as the KD step does,
            without any loss, and returns (the point sets, the teacher's answer at all of them
            concatenated, the student's answers per set).
        """
        with torch.no_grad():
            encoded = self.student.encode(self.student_inputs(batched_inputs))
            sets = self.point_sets(encoded)
        # Timed with gradients, the decoding's backward then reaches the memory, as in the KD step.
        encoded.memory.requires_grad_(True)
        images, features = self._teacher_features(batched_inputs)

        def decode() -> Tuple[List[Tensor], ProbeAnswer, List[ProbeAnswer]]:
            return (
                sets,
                self._teacher_probe(images, features, sets),
                self._student_probes(encoded, sets),
            )

        return decode
