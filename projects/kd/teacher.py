"""The frozen teacher: built from its own config and weights, verified, locked in eval mode.

Silent teacher loading is the failure KD toolkits are known for (a teacher whose weights did not
load still "trains"). Everything here refuses to start, with a message that says what to fix,
rather than distil from a random network.

A teacher's config (``KD.TEACHER.CONFIG_FILE``) is any of:

* a yacs YAML file, as detectron2's ``train_net.py`` reads (``get_cfg()`` + this project's keys);
* a detectron2 LazyConfig: a ``.py`` file, or the ``.yaml`` that ``LazyConfig.save`` writes
  (recognised by its lower-case top-level nodes, ``model``, ``dataloader``, ...). The teacher is
  ``instantiate(cfg.model)``; ``KD.TEACHER.OPTS`` are then ``key=value`` overrides
  (``LazyConfig.apply_overrides``);
* ``hf://<folder or hub id>``, a Hugging Face ``transformers`` DETR teacher, built by the source
  registered for that prefix in :data:`TEACHER_SOURCES` (:mod:`kd.families.hf_teacher_source`);
* ``zoo://<name>``, a name in detectron2's model zoo (``COCO-Detection/faster_rcnn_R_101_FPN_3x
  .yaml``), resolved with ``detectron2.model_zoo.get_config_file`` where detectron2 ships its
  model-zoo configs (the official install does; the pure-Python package does not, and
  ``configs/coco/zoo/`` holds this project's configs of the zoo architectures the recipes use).

Whatever built it, the teacher is described to the distillers by a :class:`TeacherInfo`, so that
no distiller reads a config system's keys.
"""

import dataclasses
import logging
import os
import types
from typing import Callable, Dict, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from torch import nn

from kd.checkpoint import WeightsError, load_weights
from kd.class_map import INDEX, ClassMap, ClassMapError, build_class_map
from kd.device import fork_rng, parse_dtype, set_precision
from kd.teacher_config import (
    TeacherError,
    TeacherInfo,
    is_lazy_config,
    lazy_info,
    load_teacher_config,
    num_classes_of,
    read_teacher_config,
    resolve_config_file,
    yacs_info,
)
from kd.weights import fetch

__all__ = [
    "TeacherError",
    "TeacherInfo",
    "TEACHER_SOURCES",
    "build_teacher",
    "build_teacher_model",
    "load_teacher_config",
    "is_lazy_config",
    "resolve_config_file",
    "num_classes_of",
    "freeze",
]

logger = logging.getLogger(__name__)

# Teachers that are not detectron2 configs, by their KD.TEACHER.CONFIG_FILE prefix ("hf://"):
# (KD config) -> (the teacher built and loaded, not frozen; its TeacherInfo). The families that
# provide them register here (kd.families.hf_detr), so this module imports none of them.
TEACHER_SOURCES: Dict[str, Callable[[CfgNode], "tuple[nn.Module, TeacherInfo]"]] = {}


def _teacher_source(config_file: str):
    for prefix, build in TEACHER_SOURCES.items():
        if config_file.startswith(prefix):
            return build
    return None


# ----------------------------------------------------------------------------- checks
def _thing_classes(datasets: Sequence[str], load: bool = False) -> Optional[list]:
    if not datasets:
        return None
    metadata = MetadataCatalog.get(datasets[0])
    if load and not hasattr(metadata, "thing_classes"):
        # A COCO-json dataset says its classes when it is read (the trainer reads it anyway).
        from detectron2.data import DatasetCatalog

        try:
            DatasetCatalog.get(datasets[0])
        except Exception:  # noqa: BLE001 (not registered, unreadable: the names stay unknown)
            return None
    try:
        return list(metadata.thing_classes)
    except AttributeError:  # dataset registered without class names yet
        return None


def _accepts_class_map(cfg: CfgNode) -> bool:
    # The distiller says whether it compares mapped classes (its ``accepts_class_map``).
    from detectron2.modeling import META_ARCH_REGISTRY

    try:
        distiller = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        return bool(getattr(distiller, "accepts_class_map", False))
    except (KeyError, AttributeError):
        return False


def check_class_agreement(
    cfg: CfgNode, teacher: TeacherInfo, student_arch: str
) -> Optional[ClassMap]:
    """The teacher's classes mapped to the student's (``KD.TEACHER.CLASS_MAP``, by name), or a
    refusal where the distiller cannot compare them.

    Args:
        cfg: the KD config (describes the student).
        teacher: the teacher's description.
        student_arch: the student's meta-architecture.

    Returns:
        None where the classes are compared index by index (the same names in the same order,
        names unknown, or ``KD.TEACHER.CLASS_MAP ["index"]``); otherwise the :class:`ClassMap`.
    """
    spec = [str(x) for x in cfg.KD.TEACHER.CLASS_MAP]
    n_s = num_classes_of(cfg, student_arch)
    n_t = teacher.num_classes
    # Names are read (the datasets loaded) where they decide something: a teacher that names its
    # own classes, other class counts, or aliases. Otherwise names already known are compared.
    load = teacher.class_names is not None or n_s != n_t or bool(spec and spec != [INDEX])
    c_s = _thing_classes(list(cfg.DATASETS.TRAIN), load)
    c_t = (
        list(teacher.class_names)
        if teacher.class_names is not None
        else _thing_classes(teacher.train_datasets, load)
    )
    by_name = spec != [INDEX] and c_s is not None and c_t is not None
    if by_name and (len(c_s) != n_s or len(c_t) != n_t):
        by_name = False  # names that do not describe the class columns: index by index
    if by_name:
        try:
            class_map = build_class_map(c_s, c_t, spec)
        except ClassMapError as e:
            raise TeacherError(str(e)) from None
        if class_map.is_identity:
            return None
        if _accepts_class_map(cfg):
            logger.info("Teacher classes mapped to the student's: %s", class_map.describe())
            return class_map
    elif spec and spec != [INDEX]:
        raise TeacherError(
            f"KD.TEACHER.CLASS_MAP {spec}: the class names of the teacher or the student are "
            "unknown (their DATASETS.TRAIN[0] has no thing_classes), so classes cannot be "
            "mapped by name"
        )
    hint = (
        f" KD.TEACHER.CLASS_MAP maps a teacher's classes to the student's by name for the "
        f"distillers that compare mapped classes (KDDETRDistiller, DETRToRCNNDistiller), not "
        f"for {cfg.MODEL.META_ARCHITECTURE}."
        if by_name
        else ""
    )
    if n_s != n_t:
        raise TeacherError(
            f"class-count mismatch: the teacher ({cfg.KD.TEACHER.CONFIG_FILE}) predicts {n_t} "
            f"classes, the student {n_s}. Distillation compares class scores one to one: train "
            "the teacher on the student's classes, or set the student's NUM_CLASSES to match."
            + hint
        )
    if by_name:
        where = (
            f"dataset {teacher.train_datasets[0]}"
            if teacher.class_names is None
            else cfg.KD.TEACHER.CONFIG_FILE
        )
        raise TeacherError(
            f"class mismatch: the teacher was configured with {where} (classes {c_t}) and the "
            f"student with {cfg.DATASETS.TRAIN[0]} (classes {c_s}). Class scores are compared "
            "index by index, so both must use the same classes in the same order." + hint
        )
    return None


def _load_verified(model: nn.Module, path: str, what: str) -> None:
    if not path:
        raise TeacherError(
            f"KD.TEACHER.WEIGHTS is empty: a {what} without trained weights would distil noise. "
            "Train the teacher first (python train_net.py --config-file <teacher config>) and set "
            "KD.TEACHER.WEIGHTS to its model_final.pth"
        )
    local = path
    if "://" in path:
        try:
            local = fetch(path, "KD.TEACHER.WEIGHTS")
        except WeightsError as e:  # the server did not answer in time
            raise TeacherError(str(e)) from None
        except Exception as e:  # noqa: BLE001 (iopath's handlers raise many types offline)
            raise TeacherError(
                f"KD.TEACHER.WEIGHTS '{path}' cannot be fetched ({type(e).__name__}: {e}). "
                "Download it where the internet is reachable (detectron2:// names are "
                "https://dl.fbaipublicfiles.com/detectron2/...) and set KD.TEACHER.WEIGHTS to the "
                "local file"
            ) from None
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


# ----------------------------------------------------------------------------- building
def _instantiate(lcfg, path: str, device: str) -> nn.Module:
    from detectron2.config import instantiate

    try:
        model = instantiate(lcfg.model)
    except Exception as e:  # noqa: BLE001 (the config's constructors raise anything)
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}': instantiate(cfg.model) failed: "
            f"{type(e).__name__}: {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}': instantiate(cfg.model) gave a "
            f"{type(model).__name__}, not a model: cfg.model must be L(<detector class>)(...)"
        )
    return model.to(torch.device(device))


def _build(cfg: CfgNode, tcfg, path: str) -> nn.Module:
    dtype = parse_dtype(cfg.KD.TEACHER.DTYPE, "KD.TEACHER.DTYPE", cfg.MODEL.DEVICE)
    with fork_rng():
        # Building the teacher must not shift the RNG stream the student is initialised from:
        # the same seed gives the same student with or without distillation.
        if isinstance(tcfg, CfgNode):
            model = build_model(tcfg)
        else:
            model = _instantiate(tcfg, path, cfg.MODEL.DEVICE)
    _set_precision(cfg, model, dtype)
    return model


def _set_precision(cfg: CfgNode, model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    if dtype is None:
        dtype = parse_dtype(cfg.KD.TEACHER.DTYPE, "KD.TEACHER.DTYPE", cfg.MODEL.DEVICE)
    # Also in float32, so that the student's autocast (SOLVER.AMP) does not reach the teacher.
    if dtype != torch.float32 or cfg.SOLVER.AMP.ENABLED:
        set_precision(model, dtype, cfg.MODEL.DEVICE)


def build_teacher_model(cfg: CfgNode) -> "tuple[nn.Module, TeacherInfo]":
    """The teacher's architecture, built on ``cfg.MODEL.DEVICE`` but not loaded or frozen (for
    tools that need a teacher of the right shape, e.g. a random one to time).

    Args:
        cfg: the KD config.
    """
    source = _teacher_source(cfg.KD.TEACHER.CONFIG_FILE)
    if source is not None:
        model, info = source(cfg)
        _set_precision(cfg, model)
        return model, info
    path, tcfg = read_teacher_config(cfg)
    model = _build(cfg, tcfg, path)
    info = yacs_info(tcfg, path) if isinstance(tcfg, CfgNode) else lazy_info(tcfg, model, path)
    return model, info


def build_teacher(cfg: CfgNode, student_arch: str) -> "tuple[nn.Module, TeacherInfo]":
    """Build, load and verify the frozen teacher named by ``cfg.KD.TEACHER``.

    Args:
        cfg: the KD config.
        student_arch: the student's meta-architecture (to compare class counts).

    Returns:
        (teacher, info): the frozen teacher on ``cfg.MODEL.DEVICE`` and its description.
    """
    source = _teacher_source(cfg.KD.TEACHER.CONFIG_FILE)
    if source is not None:
        # Built and loaded (and verified) by its family's source, from its own folder.
        with fork_rng():
            teacher, info = source(cfg)
        _set_precision(cfg, teacher)
        class_map = check_class_agreement(cfg, info, student_arch)
        path = info.config_file
    else:
        path, tcfg = read_teacher_config(cfg)
        if isinstance(tcfg, CfgNode):
            # A yacs config says its classes before anything is built: refuse early.
            info = yacs_info(tcfg, path)
            class_map = check_class_agreement(cfg, info, student_arch)
            teacher = _build(cfg, tcfg, path)
        else:
            teacher = _build(cfg, tcfg, path)
            info = lazy_info(tcfg, teacher, path)
            class_map = check_class_agreement(cfg, info, student_arch)
        _load_verified(teacher, cfg.KD.TEACHER.WEIGHTS, "teacher")
    if class_map is not None:
        info = dataclasses.replace(info, class_map=class_map)
    logger.info(
        "Teacher %s loaded from %s (config %s, %s input)",
        type(teacher).__name__,
        cfg.KD.TEACHER.WEIGHTS or path,
        path,
        info.input_format,
    )
    return freeze(teacher), info
