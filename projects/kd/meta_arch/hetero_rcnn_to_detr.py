"""A Faster R-CNN teacher distilled into a DETR student: heterogeneous distillation through shared
box points (:mod:`kd.meta_arch.hetero`)."""

from typing import Callable, Dict, List, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import Tensor

from kd.losses.class_space import convert_class_logits
from kd.meta_arch.hetero import HeteroDistiller
from kd.modeling.detr import DETREncoded
from kd.points.batch import clip_points
from kd.points.random import random_points
from kd.probes import (
    ProbeAnswer,
    probe_detr,
    probe_rcnn,
)

__all__ = ["RCNNToDETRDistiller"]


@META_ARCH_REGISTRY.register()
class RCNNToDETRDistiller(HeteroDistiller):
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
