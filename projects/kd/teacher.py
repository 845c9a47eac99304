"""The frozen teacher: built from its own config and weights, verified, locked in eval mode.

Silent teacher loading is the failure KD toolkits are known for (a teacher whose weights did not
load still "trains"). Everything here refuses to start, with a message that says what to fix,
rather than distil from a random network.
"""

import logging
import os
import types
from typing import Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from torch import nn

__all__ = ["TeacherError", "build_teacher", "load_teacher_config", "num_classes_of", "freeze"]

logger = logging.getLogger(__name__)


class TeacherError(ValueError):
    """The teacher cannot be used as configured; the message says how to fix it."""


def load_teacher_config(cfg: CfgNode) -> CfgNode:
    """Read the teacher's own config named by ``KD.TEACHER.CONFIG_FILE``.

    Args:
        cfg: the KD config.

    Returns:
        The teacher's frozen config, on the student's device, with ``KD.TEACHER.OPTS`` applied.
    """
    from kd.config import add_kd_config

    path = cfg.KD.TEACHER.CONFIG_FILE
    if not path:
        raise TeacherError(
            "KD.TEACHER.CONFIG_FILE is empty: set it to the teacher's detectron2 config, e.g. "
            "KD.TEACHER.CONFIG_FILE configs/kd_shapes/faster_rcnn_teacher.yaml"
        )
    if not os.path.isfile(path):
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}' does not exist (relative paths are taken from the "
            f"current directory, {os.getcwd()}): point it at the teacher's config file"
        )
    tcfg = get_cfg()
    add_kd_config(tcfg)
    tcfg.merge_from_file(path)
    tcfg.merge_from_list(list(cfg.KD.TEACHER.OPTS))
    # The teacher lives on the student's device whatever its own config says.
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.KD.TEACHER.WEIGHTS
    tcfg.freeze()
    return tcfg


def num_classes_of(cfg: CfgNode, meta_arch: Optional[str] = None) -> int:
    """The number of object classes a detector built from ``cfg`` predicts.

    Args:
        cfg: a detectron2 config.
        meta_arch: the meta-architecture to read it for (default: ``cfg.MODEL.META_ARCHITECTURE``).
    """
    arch = meta_arch or cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return cfg.MODEL.RETINANET.NUM_CLASSES
    if arch == "FCOS":
        return cfg.MODEL.FCOS.NUM_CLASSES
    if arch == "DETR":
        return cfg.MODEL.DETR.NUM_CLASSES
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def _thing_classes(cfg: CfgNode) -> Optional[list]:
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        return None
    try:
        return list(MetadataCatalog.get(names[0]).thing_classes)
    except AttributeError:  # dataset registered without class names yet
        return None


def check_class_agreement(cfg: CfgNode, teacher_cfg: CfgNode, student_arch: str) -> None:
    """Refuse a teacher whose classes differ from the student's.

    Args:
        cfg: the KD config (describes the student).
        teacher_cfg: the teacher's config.
        student_arch: the student's meta-architecture.
    """
    n_s = num_classes_of(cfg, student_arch)
    n_t = num_classes_of(teacher_cfg)
    if n_s != n_t:
        raise TeacherError(
            f"class-count mismatch: the teacher ({cfg.KD.TEACHER.CONFIG_FILE}) predicts {n_t} "
            f"classes, the student {n_s}. Distillation compares class scores one to one: train "
            "the teacher on the student's classes, or set the student's NUM_CLASSES to match"
        )
    c_s, c_t = _thing_classes(cfg), _thing_classes(teacher_cfg)
    if c_s is not None and c_t is not None and c_s != c_t:
        raise TeacherError(
            f"class mismatch: the teacher was configured with dataset "
            f"{teacher_cfg.DATASETS.TRAIN[0]} (classes {c_t}) and the student with "
            f"{cfg.DATASETS.TRAIN[0]} (classes {c_s}). Class scores are compared index by index, "
            "so both must use the same classes in the same order"
        )


def _load_verified(model: nn.Module, path: str, what: str) -> None:
    from kd.checkpoint import WeightsError, load_weights

    if not path:
        raise TeacherError(
            f"KD.TEACHER.WEIGHTS is empty: a {what} without trained weights would distil noise. "
            "Train the teacher first (python train_net.py --config-file <teacher config>) and set "
            "KD.TEACHER.WEIGHTS to its model_final.pth"
        )
    local = (
        DetectionCheckpointer(model).path_manager.get_local_path(path) if "://" in path else path
    )
    if not os.path.isfile(local):
        raise TeacherError(
            f"KD.TEACHER.WEIGHTS '{path}' does not exist: train the teacher first "
            "(python train_net.py --config-file <teacher config>) or fix the path"
        )
    try:
        load_weights(
            model,
            path,
            complete=True,
            key="KD.TEACHER.WEIGHTS",
            what="teacher built from KD.TEACHER.CONFIG_FILE",
            distiller_checkpoint="refuse",
        )
    except WeightsError as e:
        raise TeacherError(str(e)) from None


def _locked_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # A frozen teacher stays in eval mode: BatchNorm statistics, dropout and training-only code
    # paths (proposal sampling, losses) must not switch on when the trainer calls model.train().
    return nn.Module.train(self, False)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze ``model`` in place: no gradients, eval mode, and ``train()`` locked to eval.

    Args:
        model: the teacher.
    """
    model.requires_grad_(False)
    nn.Module.train(model, False)
    model.train = types.MethodType(_locked_train, model)
    return model


def build_teacher(cfg: CfgNode, student_arch: str) -> "tuple[nn.Module, CfgNode]":
    """Build, load and verify the frozen teacher named by ``cfg.KD.TEACHER``.

    Args:
        cfg: the KD config.
        student_arch: the student's meta-architecture (to compare class counts).

    Returns:
        (teacher, teacher_cfg): the frozen teacher on ``cfg.MODEL.DEVICE`` and its config.
    """
    teacher_cfg = load_teacher_config(cfg)
    check_class_agreement(cfg, teacher_cfg, student_arch)
    with torch.random.fork_rng():
        # Building the teacher must not shift the RNG stream the student is initialised from:
        # the same seed gives the same student with or without distillation.
        teacher = build_model(teacher_cfg)
    _load_verified(teacher, cfg.KD.TEACHER.WEIGHTS, "teacher")
    logger.info(
        "Teacher %s loaded from %s", teacher_cfg.MODEL.META_ARCHITECTURE, cfg.KD.TEACHER.WEIGHTS
    )
    return freeze(teacher), teacher_cfg
