"""The distiller base class: a trainable student and a frozen teacher, behind one ``forward``."""

import copy
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from kd.config import student_config
from kd.schedule import KDLossSchedule, current_iteration
from kd.teacher import TeacherInfo, build_teacher

__all__ = ["Distiller", "student_config"]


class Distiller(nn.Module):
    """Owns a student (trained) and a teacher (frozen); subclasses add the distillation losses.

    The teacher is deliberately *not* a registered submodule: it is not in ``state_dict`` (so
    checkpoints hold the student and the adapters only), not in the optimizer, not wrapped by DDP,
    and ``model.train()`` cannot reach it. ``_apply`` moves it along with the distiller
    (``.to(device)``, ``.half()``). In eval mode a distiller is exactly its student.

    Optional hook, for ``tools/benchmark_kd.py``: a distiller whose points need extra decoding by
    the models (query groups, probes) may offer ``prepare_point_decoding(batched_inputs)``, which
    does untimed what a student training step and a teacher inference forward already pay for
    (encodings, points) and returns a closure doing only that extra decoding, by both models.
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        teacher_input_format: str,
        student_input_format: str,
        student_input_scale: float = 1.0,
        loss_schedule: Optional[KDLossSchedule] = None,
    ):
        """
        Args:
            student: the detector being trained.
            teacher: the frozen teacher (see :func:`kd.teacher.freeze`).
            teacher_input_format: the teacher's ``INPUT.FORMAT`` ("BGR" or "RGB").
            student_input_format: the student's ``INPUT.FORMAT``; images arrive in this format.
            student_input_scale: the low-resolution factor of the student's input (1 = same size).
            loss_schedule: the factor of the ``loss_kd_*`` terms per iteration
                (``KD.LOSS_SCHEDULE``); None: 1 throughout.
        """
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        self._flip_channels_for_teacher = teacher_input_format != student_input_format
        if not 0 < student_input_scale <= 1:
            raise ValueError(f"KD.STUDENT.INPUT_SCALE must be in (0, 1], got {student_input_scale}")
        self.student_input_scale = student_input_scale
        self.loss_schedule = loss_schedule

    @classmethod
    def build_pair(cls, cfg: CfgNode) -> "tuple[dict, TeacherInfo]":
        """Build the student and the teacher of a KD config.

        The teacher may come from a yacs or a LazyConfig file: what the distillers need of it
        (input format, classes) is in its :class:`~kd.teacher_config.TeacherInfo`, the rest they
        read from the built modules, never from the teacher's config keys.

        Args:
            cfg: the KD config.

        Returns:
            (kwargs, teacher_info): this class's ``__init__`` arguments and the teacher's
            description.
        """
        scfg = student_config(cfg)
        # The student is built first, so that a seed gives the same initial student with or
        # without distillation.
        student = META_ARCH_REGISTRY.get(scfg.MODEL.META_ARCHITECTURE)(scfg)
        student.to(torch.device(cfg.MODEL.DEVICE))
        teacher, info = build_teacher(cfg, scfg.MODEL.META_ARCHITECTURE)
        kwargs = {
            "student": student,
            "teacher": teacher,
            "teacher_input_format": info.input_format,
            "student_input_format": cfg.INPUT.FORMAT,
            "student_input_scale": cfg.KD.STUDENT.INPUT_SCALE,
            "loss_schedule": KDLossSchedule(cfg),
        }
        return kwargs, info

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.student.device

    # ------------------------------------------------------------------ inputs
    def teacher_inputs(self, batched_inputs: List[dict]) -> List[dict]:
        """The batch as the teacher expects it (its own channel order; full resolution).

        The channels are flipped on the models' device (the image is moved there first, as the
        teacher's ``preprocess_image`` would move it), not on the CPU in the training process.
        """
        if not self._flip_channels_for_teacher:
            return batched_inputs
        device = self.device
        return [dict(x, image=x["image"].to(device).flip(0)) for x in batched_inputs]

    def student_inputs(self, batched_inputs: List[dict]) -> List[dict]:
        """The batch as the student sees it: resized by ``student_input_scale`` (boxes too).

        ``height``/``width`` (the output resolution) are kept, so predictions are still reported
        in the original image's coordinates. The resize is antialiased, as PIL's bilinear resize
        in detectron2's data loader is: the pixels equal (to rounding) what the student gets when
        it is deployed alone at the smaller size, where plain bilinear sampling would alias.
        """
        s = self.student_input_scale
        if s == 1.0:
            return batched_inputs
        out, device = [], self.device
        for x in batched_inputs:
            # Resized on the models' device (where preprocess_image would move it anyway).
            img = x["image"].to(device)
            h, w = img.shape[-2:]
            size = (max(1, round(h * s)), max(1, round(w * s)))
            small = F.interpolate(
                img[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
            )[0]
            y = dict(
                x,
                image=(
                    small.to(img.dtype)
                    if img.dtype.is_floating_point
                    else small.round().clamp(0, 255).to(img.dtype)
                ),
            )
            if "instances" in x:
                y["instances"] = _rescale_instances(x["instances"], size, size[0] / h, size[1] / w)
            out.append(y)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: detectron2's list of dicts ("image", "instances", "height", "width").

        Returns:
            In training, the student's losses plus ``loss_kd_*`` terms; in eval mode, the student's
            predictions (exactly what the student alone returns).
        """
        if not self.training:
            return self.student(self.student_inputs(batched_inputs))
        return self.scheduled(self.forward_train(batched_inputs))

    def scheduled(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``losses`` with every ``loss_kd_*`` term multiplied by the schedule's factor at the
        trainer's iteration (logged as ``kd/loss_factor``); unchanged for a constant schedule or
        outside a trainer. The terms stay in the graph at factor 0, so that DDP finds every
        adapter used."""
        schedule = self.loss_schedule
        iteration = None if schedule is None or schedule.constant else current_iteration()
        if iteration is None:
            return losses
        factor = schedule(iteration)
        get_event_storage().put_scalar("kd/loss_factor", factor, smoothing_hint=False)
        return {k: v * factor if k.startswith("loss_kd_") else v for k, v in losses.items()}

    def forward_train(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ inspection hooks
    # What tools/visualize_points.py draws. A method overrides them where it has points or
    # answers of its own to show; None says it has none (its points are then the student's own
    # samples of the step, which the tool draws through a registered function).
    def distillation_points(self, batched_inputs: List[dict]) -> Optional[List[Dict[str, Boxes]]]:
        """Per image, the named sets of boxes this distiller compares teacher and student at, in
        the (resized) input image's coordinates; None where the method has no points of its own.
        """
        return None

    def distillation_answers(self, batched_inputs: List[dict]) -> Optional[List[Dict[str, dict]]]:
        """Per image and point set, what teacher and student answer at the points (boxes,
        scores, labels); None where the method does not expose them."""
        return None

    @torch.no_grad()
    def teacher_images(self, batched_inputs: List[dict]) -> ImageList:
        return self.teacher.preprocess_image(self.teacher_inputs(batched_inputs))


def _rescale_instances(inst: Instances, size: tuple, sy: float, sx: float) -> Instances:
    out = Instances(size)
    for k, v in inst.get_fields().items():
        if k == "gt_boxes":
            v = copy.deepcopy(v)
            v.scale(sx, sy)
            v.clip(size)
        out.set(k, v)
    return out


def gt_instances_of(batched_inputs: List[dict], device: torch.device) -> Optional[List[Instances]]:
    """The ground-truth ``Instances`` of a batch, on ``device``."""
    if "instances" not in batched_inputs[0]:
        return None
    return [x["instances"].to(device) for x in batched_inputs]
