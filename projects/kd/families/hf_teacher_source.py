"""The ``hf://`` teacher source: ``KD.TEACHER.CONFIG_FILE "hf://<folder or hub id>"`` built as a
:class:`kd.families.hf_detr.HFDETRTeacher`, registered in :data:`kd.teacher.TEACHER_SOURCES` when
this module is imported (by ``kd/families/__init__.py``)."""

import os
from typing import Tuple

import torch

from kd.families.hf_detr import HFDETRTeacher
from kd.families.hf_source import HF_PREFIX, HFTeacherError
from kd.teacher import TEACHER_SOURCES, TeacherInfo

__all__ = ["build_hf_teacher"]


def build_hf_teacher(cfg) -> Tuple[HFDETRTeacher, TeacherInfo]:
    """The teacher named by ``KD.TEACHER.CONFIG_FILE "hf://<folder or hub id>"``: loaded and
    verified from that folder, on ``MODEL.DEVICE``, not yet frozen (:func:`kd.teacher.
    build_teacher` freezes it and maps its classes).

    Args:
        cfg: the KD config.
    """
    t = cfg.KD.TEACHER
    source = t.CONFIG_FILE[len(HF_PREFIX) :]
    if t.WEIGHTS and os.path.abspath(t.WEIGHTS) != os.path.abspath(source):
        raise HFTeacherError(
            f"KD.TEACHER.WEIGHTS '{t.WEIGHTS}': a Hugging Face teacher's weights come from its "
            f"folder ({source}); leave KD.TEACHER.WEIGHTS empty"
        )
    if t.OPTS:
        raise HFTeacherError(
            f"KD.TEACHER.OPTS {list(t.OPTS)}: a Hugging Face teacher takes no config overrides "
            "(its config.json is the trained model's); leave them empty"
        )
    teacher = HFDETRTeacher.from_source(source).to(torch.device(cfg.MODEL.DEVICE))
    info = TeacherInfo(
        config=teacher.config,
        input_format="RGB",
        num_classes=teacher.num_classes,
        train_datasets=(),
        config_file=t.CONFIG_FILE,
        class_names=tuple(teacher.class_names),
    )
    return teacher, info


TEACHER_SOURCES[HF_PREFIX] = build_hf_teacher
