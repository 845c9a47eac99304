"""KD-DETR (Wang et al., CVPR 2024): distillation at consistent distillation points.

METHODS.md section 3. Teacher and student, both :class:`~kd.modeling.detr.DETR`, answer the same
*distillation queries*, decoded in groups isolated from each other and from the detection and
denoising queries (:meth:`DETR.decode_groups`):

* general points: ``M_g`` random boxes per image, redrawn every iteration, never learned;
* specific points: the teacher's own query anchors (its learned anchors, or for a two-stage
  teacher the encoder proposals it selected for this image).

Every point is a query with zero content for the student (its own content queries mean nothing at
the teacher's anchors). The teacher decodes the general points with zero content too, and the
specific points with zero content (both models answer the identical query, the default) or its own
learned content (``KD.KD_DETR.SPECIFIC_TEACHER_CONTENT``).

The teacher may also be a Hugging Face DETR (``KD.TEACHER.CONFIG_FILE "hf://..."``: RT-DETR, D-FINE,
DAB-DETR, two-stage Deformable DETR; :mod:`kd.families.hf_detr`), which answers the same
questions, and its classes may be mapped to the student's (``KD.TEACHER.CLASS_MAP``,
:mod:`kd.class_map`): the class terms then compare the mapped columns only.

The student's detection queries keep their own detection loss and run in their own decoder pass, so
the distillation queries change nothing about detection; the distillation queries get only the
distillation loss (:func:`kd.losses.kd_detr.kd_detr_loss`), each distilled student decoder layer
against the teacher's final layer. The teacher encodes and decodes under ``inference_mode``.

Losses: ``loss_kd_kd_detr_cls``, ``loss_kd_kd_detr_l1``, ``loss_kd_kd_detr_giou``, each summed over
the point sets (each set a mean over its points, by default weighted by the foreground weights:
``KD.KD_DETR.NORMALIZE``) and the distilled student layers.
"""

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes
from torch import Tensor

from kd.class_map import ClassMap
from kd.events import training_storage
from kd.families.hf_detr import HFDETRTeacher
from kd.losses.kd_detr import kd_detr_loss
from kd.meta_arch.base import Distiller
from kd.modeling.detr import DETR, DecoderOutput, DETREncoded, QueryGroup, denormalize_boxes
from kd.points.random import RANDOM_BOX_MODES, random_points

__all__ = ["KDDETRDistiller", "GENERAL", "SPECIFIC"]

PREFIX = "loss_kd_kd_detr_"
TERMS = ("cls", "l1", "giou")
# The point sets, in the order they are decoded.
GENERAL, SPECIFIC = "general", "specific"
TEACHER_CONTENTS = ("zeros", "learned")

logger = logging.getLogger(__name__)

# (points, teacher answers, student answers), each by set name: what a point decoding returns.
PointDecoding = Tuple[Dict[str, Tensor], Dict[str, DecoderOutput], Dict[str, DecoderOutput]]


@META_ARCH_REGISTRY.register()
class KDDETRDistiller(Distiller):
    """KD-DETR for a DETR teacher (this project's, or a Hugging Face one) and a DETR student (any
    backbone, depth, width or number of detection queries; the same classes, or mapped ones)."""

    # Compares the teacher's classes mapped to the student's (KD.TEACHER.CLASS_MAP).
    accepts_class_map = True
    # None: the same classes, compared index by index.
    class_map: Optional[ClassMap] = None

    @configurable
    def __init__(
        self,
        *,
        num_general_points: int = 300,
        general_distribution: str = "uniform",
        specific_points: bool = True,
        specific_teacher_content: str = "zeros",
        foreground_weight: bool = True,
        temperature: float = 10.0,
        cls_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        normalize: str = "weight_sum",
        student_layers: Sequence[int] = (),
        teacher_layer: int = -1,
        class_map: Optional[ClassMap] = None,
        **kwargs,
    ):
        """
        Args:
            num_general_points: M_g, random boxes per image and iteration; 0: no general points.
            general_distribution: "uniform" or "sigmoid_normal"
                (:func:`kd.points.random.random_points`).
            specific_points: distil at the teacher's own query anchors.
            specific_teacher_content: "zeros" or "learned": the content query the teacher decodes
                its anchors with (the student always uses zeros).
            foreground_weight: weight each point by the teacher's top class probability.
            temperature, cls_weight, l1_weight, giou_weight, normalize: of
                :func:`kd.losses.kd_detr.kd_detr_loss`.
            student_layers: student decoder layers distilled (negative from the end); empty: all.
            teacher_layer: the teacher decoder layer whose answers are the targets.
            class_map: the teacher's classes mapped to the student's; None: the same classes.
            kwargs: :class:`Distiller` arguments.
        """
        super().__init__(**kwargs)
        for who, model in (("student", self.student), ("teacher", self.teacher)):
            if not isinstance(model, DETR) and not (
                who == "teacher" and isinstance(model, HFDETRTeacher)
            ):
                raise ValueError(
                    f"KDDETRDistiller needs a DETR {who} (MODEL.META_ARCHITECTURE 'DETR'; for "
                    f"other pairs see the heterogeneous distillers); got {type(model).__name__}"
                )
        self.class_map = class_map
        if class_map is None and self.student.num_classes != self.teacher.num_classes:
            raise ValueError(
                f"teacher and student predict {self.teacher.num_classes} and "
                f"{self.student.num_classes} classes; KD-DETR compares class scores one to one"
            )
        if num_general_points < 0:
            raise ValueError(
                f"KD.KD_DETR.NUM_GENERAL_POINTS must be >= 0, got {num_general_points}"
            )
        if general_distribution not in RANDOM_BOX_MODES:
            raise ValueError(
                f"KD.KD_DETR.GENERAL_DISTRIBUTION must be one of {RANDOM_BOX_MODES}, got "
                f"{general_distribution!r}"
            )
        if specific_teacher_content not in TEACHER_CONTENTS:
            raise ValueError(
                f"KD.KD_DETR.SPECIFIC_TEACHER_CONTENT must be one of {TEACHER_CONTENTS}, got "
                f"{specific_teacher_content!r}"
            )
        self.num_general_points = num_general_points
        self.general_distribution = general_distribution
        self.specific_points = specific_points
        self.specific_teacher_content = specific_teacher_content
        self.loss_kwargs = dict(
            temperature=temperature,
            cls_weight=cls_weight,
            l1_weight=l1_weight,
            giou_weight=giou_weight,
            foreground_weight=foreground_weight,
            normalize=normalize,
        )
        self.student_layers = _resolve_layers(
            student_layers, self.student.num_decoder_layers, "KD.KD_DETR.STUDENT_LAYERS", "student"
        )
        self.teacher_layer = _resolve_layers(
            [teacher_layer], self.teacher.num_decoder_layers, "KD.KD_DETR.TEACHER_LAYER", "teacher"
        )[0]

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        kwargs, info = cls.build_pair(cfg)
        k = cfg.KD.KD_DETR
        kwargs.update(
            class_map=info.class_map,
            num_general_points=k.NUM_GENERAL_POINTS,
            general_distribution=k.GENERAL_DISTRIBUTION,
            specific_points=k.SPECIFIC_POINTS,
            specific_teacher_content=k.SPECIFIC_TEACHER_CONTENT,
            foreground_weight=k.FOREGROUND_WEIGHT,
            temperature=k.TEMPERATURE,
            cls_weight=k.CLS_WEIGHT,
            l1_weight=k.L1_WEIGHT,
            giou_weight=k.GIOU_WEIGHT,
            normalize=k.NORMALIZE,
            student_layers=tuple(k.STUDENT_LAYERS),
            teacher_layer=k.TEACHER_LAYER,
        )
        return kwargs

    @property
    def point_sets(self) -> Tuple[str, ...]:
        """The enabled point sets, in decoding order."""
        sets = []
        if self.num_general_points > 0:
            sets.append(GENERAL)
        if self.specific_points:
            sets.append(SPECIFIC)
        return tuple(sets)

    # ------------------------------------------------------------------ points and answers
    def sample_points(self, t_encoded: DETREncoded) -> Dict[str, Tensor]:
        """The distillation points of a batch: set name -> (B, M, 4) cxcywh anchors in [0, 1].

        Args:
            t_encoded: the teacher's encoding of the batch (specific points come from it).
        """
        points = {}
        if self.num_general_points > 0:
            # Not clipped, as in KD-DETR's code: a DETR decodes any anchor in [0, 1].
            points[GENERAL] = random_points(
                t_encoded.batch_size,
                self.num_general_points,
                mode=self.general_distribution,
                clip=False,
                device=t_encoded.memory.device,
                dtype=t_encoded.memory.dtype,
            )
        if self.specific_points:
            # Learned anchors for DAB-style teachers, the selected encoder proposals for
            # two-stage ones: whatever the teacher's own detection queries start from.
            points[SPECIFIC] = self.teacher.detection_anchors(t_encoded)
        return points

    def teacher_encode(self, batched_inputs: List[dict]) -> DETREncoded:
        """The teacher's encoding of the batch, without any graph (inference tensors).

        Draws no random numbers (the teacher is in eval mode), so it can run at any point of a
        step. Only what decoding and the points need is kept: not the images and backbone maps.

        Args:
            batched_inputs: the batch as the distiller receives it.
        """
        # inference_mode is cheaper than no_grad; its tensors cannot enter autograd, so
        # everything leaving it for the student's graph is cloned.
        with torch.inference_mode():
            t_encoded = self.teacher.encode(self.teacher_inputs(batched_inputs))
        return t_encoded.replace(images=None, features=None)

    def teacher_points(self, batched_inputs: List[dict]) -> Tuple[DETREncoded, Dict[str, Tensor]]:
        """The teacher's encoding of the batch and the distillation points, without any graph.

        Args:
            batched_inputs: the batch as the distiller receives it.

        Returns:
            (t_encoded, points): the teacher's :class:`DETREncoded` (:meth:`teacher_encode`), and
            set name -> (B, M, 4) anchors (:meth:`points_of`).
        """
        t_encoded = self.teacher_encode(batched_inputs)
        return t_encoded, self.points_of(t_encoded)

    def points_of(self, t_encoded: DETREncoded) -> Dict[str, Tensor]:
        """The distillation points as ordinary tensors (usable with autograd), drawn now.

        Args:
            t_encoded: from :meth:`teacher_encode`.

        Returns:
            Set name -> (B, M, 4) anchors.
        """
        # Drawn outside inference_mode, from the global RNG (see kd.points.random).
        return {k: v.clone() for k, v in self.sample_points(t_encoded).items()}

    def teacher_groups(
        self, points: Dict[str, Tensor], t_encoded: Optional[DETREncoded] = None
    ) -> List[QueryGroup]:
        """The query groups the teacher decodes the points as, one per set.

        Args:
            points: set name -> (B, M, 4) anchors.
            t_encoded: the teacher's encoding (a Hugging Face teacher's own content queries are
                per image).
        """
        groups = []
        for name, anchors in points.items():
            content = None
            if name == SPECIFIC and self.specific_teacher_content == "learned":
                if isinstance(self.teacher, HFDETRTeacher):
                    content = self.teacher.detection_content(t_encoded)
                else:
                    content = self.teacher.query_content.weight[None].expand(
                        anchors.shape[0], -1, -1
                    )
            groups.append(QueryGroup(anchors=anchors, content=content))
        return groups

    def teacher_decode(
        self, t_encoded: DETREncoded, points: Dict[str, Tensor]
    ) -> Dict[str, DecoderOutput]:
        """The teacher's answers at the points, without any graph.

        Args:
            t_encoded: from :meth:`teacher_points`.
            points: set name -> (B, M, 4) anchors.

        Returns:
            set name -> the teacher's :class:`DecoderOutput` (all its decoder layers); ``hidden``
            is left an inference tensor (read-only, outside autograd).
        """
        with torch.inference_mode():
            outputs = self.teacher.decode_groups(t_encoded, self.teacher_groups(points, t_encoded))
        # Ordinary tensors for the loss; the hidden states are not compared, so not copied.
        return {
            name: DecoderOutput(out.logits.clone(), out.boxes.clone(), out.hidden)
            for name, out in zip(points, outputs)
        }

    def teacher_answers(
        self, batched_inputs: List[dict]
    ) -> Tuple[Dict[str, Tensor], Dict[str, DecoderOutput]]:
        """The teacher's encoding, the points, and its answers at them, without any graph.

        Args:
            batched_inputs: the batch as the distiller receives it.

        Returns:
            (points, answers): set name -> (B, M, 4) anchors, and set name -> the teacher's
            :class:`DecoderOutput` (all its decoder layers).
        """
        t_encoded, points = self.teacher_points(batched_inputs)
        return points, self.teacher_decode(t_encoded, points)

    def student_answers(
        self, encoded: DETREncoded, points: Dict[str, Tensor]
    ) -> Dict[str, DecoderOutput]:
        """The student's answers at the points: zero content, isolated groups.

        Args:
            encoded: the student's encoding of the batch.
            points: set name -> (B, M, 4) anchors.
        """
        outputs = self.student.decode_groups(
            encoded, [QueryGroup(anchors=a) for a in points.values()]
        )
        return dict(zip(points, outputs))

    # ------------------------------------------------------------------ training
    def forward_train(self, batched_inputs: List[dict]) -> Dict[str, Tensor]:
        student = self.student
        if not self.point_sets:
            return student(self.student_inputs(batched_inputs))
        # The teacher encodes first, before the student's graph holds memory: its activations
        # (which grow with the image) then reuse freed memory instead of coming on top of that
        # graph (a step's peak 121 MB lower at 256 px on kd_shapes; docs/cost.md). It draws no
        # random numbers, so the results are those of the student-first order (tested).
        t_encoded = self.teacher_encode(batched_inputs)
        s_inputs = self.student_inputs(batched_inputs)
        encoded = student.encode(s_inputs)
        # The detection (and denoising) queries first, in their own decoder pass: exactly the
        # student's own training step, its random draws (denoising noise) included; the general
        # points are drawn after them.
        losses = student.forward_encoded(encoded, s_inputs)
        points = self.points_of(t_encoded)
        t_answers = self.teacher_decode(t_encoded, points)
        s_answers = self.student_answers(encoded, points)
        losses.update(self.distillation_losses(s_answers, t_answers))
        return losses

    def prepare_point_decoding(self, batched_inputs: List[dict]) -> Callable[[], PointDecoding]:
        """The extra decoding of a KD step, ready to be timed alone (``tools/benchmark_kd.py``).

        Everything the decoding needs that a student training step and a teacher inference
        forward already do is done here, untimed and without any graph: both models' encodings
        (the student's in its current mode) and the points. The student's detection queries are
        decoded in their own pass in :meth:`forward_train`, so the point groups are entirely
        extra decoding, for both models.

        Args:
            batched_inputs: the batch as the distiller receives it.

        Returns:
            A closure, callable any number of times, that decodes the points as
            :meth:`forward_train` does, teacher then student, without any loss, and returns
            (points, teacher answers, student answers), each by set name. The student's answers
            have a graph when it is called with gradients enabled.
        """
        with torch.no_grad():
            encoded = self.student.encode(self.student_inputs(batched_inputs))
        # A leaf that wants a gradient: timed with gradients, the decoding's backward then goes
        # into the memory as in the KD step (where it joins the encoder's backward there).
        encoded.memory.requires_grad_(True)
        t_encoded, points = self.teacher_points(batched_inputs)

        def decode() -> PointDecoding:
            return (
                points,
                self.teacher_decode(t_encoded, points),
                self.student_answers(encoded, points),
            )

        return decode

    def distillation_losses(
        self, student: Dict[str, DecoderOutput], teacher: Dict[str, DecoderOutput]
    ) -> Dict[str, Tensor]:
        """The KD-DETR loss over the point sets and the distilled student layers.

        Args:
            student: set name -> the student's answers (every decoder layer).
            teacher: set name -> the teacher's answers at the same points.

        Returns:
            ``loss_kd_kd_detr_{cls,l1,giou}``: per set, the (weighted) mean over its points (the
            loss's ``normalize``), summed over the sets and the distilled student layers.
        """
        totals: Dict[str, Tensor] = {}
        cmap = self.class_map
        for name, s_out in student.items():
            t_logits = teacher[name].logits[self.teacher_layer]
            t_boxes = teacher[name].boxes[self.teacher_layer]
            if cmap is not None:
                # Only the classes both have (kd.class_map): the others are in no class term.
                t_logits = cmap.teacher_columns(t_logits)
            for layer in self.student_layers:
                s_logits = s_out.logits[layer]
                if cmap is not None:
                    s_logits = cmap.student_columns(s_logits)
                terms = kd_detr_loss(
                    s_logits, s_out.boxes[layer], t_logits, t_boxes, **self.loss_kwargs
                )
                for term, value in terms.items():
                    totals[term] = totals[term] + value if term in totals else value
            _log_foreground_weight(name, t_logits)
        return {PREFIX + term: totals[term] for term in TERMS}

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def distillation_answers(self, batched_inputs: List[dict]) -> List[Dict[str, dict]]:
        """Per image, each point set with the teacher's and the student's final answers at it.

        Runs in the current mode (the student in eval mode uses its BatchNorm statistics). Boxes
        are absolute xyxy in the coordinates of ``batched_inputs``' images.

        Returns:
            Per image, set name -> {"points", "teacher_boxes", "student_boxes": :class:`Boxes`;
            "teacher_scores", "student_scores": (M,) top sigmoid class probability;
            "teacher_classes", "student_classes": (M,) its class}.
        """
        encoded = self.student.encode(self.student_inputs(batched_inputs))
        points, t_answers = self.teacher_answers(batched_inputs)
        s_answers = self.student_answers(encoded, points)
        sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        results: List[Dict[str, dict]] = [{} for _ in batched_inputs]
        for name, anchors in points.items():
            t_out, s_out = t_answers[name], s_answers[name]
            t_logits = t_out.logits[self.teacher_layer]
            if self.class_map is not None:
                t_logits = self.class_map.teacher_columns(t_logits)
            t_scores, t_classes = t_logits.sigmoid().max(-1)
            if self.class_map is not None:
                t_classes = self.class_map.student_class(t_classes)
            s_scores, s_classes = s_out.pred_logits.sigmoid().max(-1)
            boxes = {
                "points": denormalize_boxes(anchors.clamp(0, 1), sizes),
                "teacher_boxes": denormalize_boxes(t_out.boxes[self.teacher_layer], sizes),
                "student_boxes": denormalize_boxes(s_out.pred_boxes, sizes),
            }
            for i in range(len(batched_inputs)):
                entry = {k: Boxes(v[i]) for k, v in boxes.items()}
                entry.update(
                    teacher_scores=t_scores[i],
                    teacher_classes=t_classes[i],
                    student_scores=s_scores[i],
                    student_classes=s_classes[i],
                )
                results[i][name] = entry
        return results

    def distillation_points(self, batched_inputs: List[dict]) -> List[Dict[str, Boxes]]:
        """Per image, the named sets of boxes this distiller compares teacher and student at."""
        return [
            {f"{name} points": entry["points"] for name, entry in image.items()}
            for image in self.distillation_answers(batched_inputs)
        ]


def _resolve_layers(layers: Sequence[int], num_layers: int, key: str, who: str) -> List[int]:
    """Layer indices (negative from the end; empty: all) as sorted non-negative indices."""
    if not layers:
        return list(range(num_layers))
    resolved = set()
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"{key}: layer {layer} does not exist; the {who} has {num_layers} decoder layers "
                f"(indices 0..{num_layers - 1}, or negative from the end)"
            )
        resolved.add(layer % num_layers)
    return sorted(resolved)


def _log_foreground_weight(name: str, t_logits: Tensor) -> None:
    # The mean teacher confidence at each set: how much of the set the foreground weight keeps.
    storage = training_storage()
    if storage is None:
        return
    storage.put_scalar(
        f"kd_detr/{name}_foreground_weight", t_logits.sigmoid().max(-1).values.mean().item()
    )
