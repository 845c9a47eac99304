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

The two directions share :class:`HeteroDistiller` (this module); each is a module of its own:

* :class:`~kd.meta_arch.hetero_detr_to_rcnn.DETRToRCNNDistiller`: DETR teacher, Faster R-CNN
  student. The points are the student's sampled ROI proposals (the boxes its own box head losses
  use this step) and optionally random boxes; the student's box head output at its proposals
  *is* its probe there, so distillation costs the student nothing extra.
* :class:`~kd.meta_arch.hetero_rcnn_to_detr.RCNNToDETRDistiller`: Faster R-CNN teacher, DETR
  student. The points are random boxes and the student's own detection anchors, decoded by the
  student as distillation queries (KD-DETR's general and specific points) and answered by the
  teacher's box head.

The DETR teacher may also be a Hugging Face one (``hf://``, :mod:`kd.families.hf_detr`), and its
classes may be mapped to the student's (``KD.TEACHER.CLASS_MAP``, :mod:`kd.class_map`; DETR ->
Faster R-CNN only): the class terms then compare the mapped classes only.

The student keeps all its own losses unchanged; the distillation terms are added as
``loss_kd_hetero_cls``, ``loss_kd_hetero_l1`` and ``loss_kd_hetero_giou`` (weights
``KD.HETERO.*``; a weight of 0 leaves its term out). Points are normalised boxes, so a
low-resolution student (``KD.STUDENT.INPUT_SCALE``) needs no extra mapping.
"""

from typing import Dict, Optional

from detectron2.config import CfgNode
from torch import Tensor

from kd.class_map import ClassMap
from kd.families.registry import family_name, num_classes_of
from kd.losses.class_space import BACKGROUND_MODES
from kd.losses.kd_detr import kd_detr_loss
from kd.meta_arch.base import Distiller
from kd.points.random import RANDOM_BOX_MODES
from kd.probes import (
    DETR_CONTENTS,
    DETR_ISOLATIONS,
)

__all__ = ["HeteroDistiller", "PREFIX", "CLASS_TARGETS", "check_choice"]

PREFIX = "loss_kd_hetero_"
TERMS = ("cls", "l1", "giou")
NORMALIZE_MODES = ("num_queries", "weight_sum")
CLASS_TARGETS = ("full", "foreground")


def check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")


class HeteroDistiller(Distiller):
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
        if family_name(self.teacher) != self.teacher_family or family_name(self.student) != (
            self.student_family
        ):
            raise ValueError(
                f"{type(self).__name__} distils a {self.teacher_family} teacher into a "
                f"{self.student_family} student; got a {family_name(self.teacher)} teacher "
                f"(KD.TEACHER.CONFIG_FILE) and a {family_name(self.student)} student "
                f"(KD.STUDENT.META_ARCHITECTURE / MODEL.*). For the other direction use "
                f"{self.config_name}; for a same-family pair use its homogeneous distiller"
            )
        if class_map is not None and not getattr(self, "accepts_class_map", False):
            raise ValueError(f"{type(self).__name__} compares classes index by index")
        self.class_map = class_map
        t_k, s_k = num_classes_of(self.teacher), num_classes_of(self.student)
        if class_map is None and t_k != s_k:
            raise ValueError(f"teacher predicts {t_k} classes, the student {s_k}")
        check_choice("KD.HETERO.BACKGROUND", background, BACKGROUND_MODES)
        check_choice("KD.HETERO.DETR_CONTENT", detr_content, DETR_CONTENTS)
        check_choice("KD.HETERO.RANDOM_BOXES", random_boxes, RANDOM_BOX_MODES)
        check_choice("KD.HETERO.*.NORMALIZE", normalize, NORMALIZE_MODES)
        check_choice("KD.HETERO.*.DETR_ISOLATION", detr_isolation, DETR_ISOLATIONS)
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
