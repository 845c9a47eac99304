"""Weights into models: the checks every load goes through, and the student's export.

:func:`load_weights` is how ``MODEL.WEIGHTS`` (training and ``--eval-only``), the teacher's
weights and every tool put a file into a model. It reads through :mod:`kd.weights` (no code runs)
and refuses a file that does not fit, instead of training or evaluating a model that silently kept
its random weights.
"""

import logging
import os
from typing import Dict, List

import torch
from detectron2.config import CfgNode, get_cfg
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd.config import student_config
from kd.weights import (
    KDCheckpointer,
    UnsafeWeightsError,
    WeightsError,
    fetch,
    load_checkpoint_file,
)

__all__ = [
    "KDCheckpointer",
    "WeightsError",
    "UnsafeWeightsError",
    "load_checkpoint_file",
    "load_weights",
    "student_state_dict",
    "export_student_config",
    "kd_provided_parts",
    "dump_student_config",
]

logger = logging.getLogger(__name__)

_STUDENT_PREFIX = "student."


def student_state_dict(model_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The student's weights, under the names a plain detectron2 model of its kind expects.

    Args:
        model_state: the ``"model"`` entry of a distiller checkpoint. A plain detector's
            checkpoint (no ``student.`` keys) is returned unchanged.
    """
    if not any(k.startswith(_STUDENT_PREFIX) for k in model_state):
        return dict(model_state)
    return {
        k[len(_STUDENT_PREFIX) :]: v
        for k, v in model_state.items()
        if k.startswith(_STUDENT_PREFIX)
    }


def _fraction_loaded(model: nn.Module, incompatible) -> float:
    """The share of ``model``'s weights (by element count) that a load filled."""
    state = model.state_dict()
    total = sum(v.numel() for v in state.values()) or 1
    missed = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
    return 1.0 - sum(state[k].numel() for k in missed if k in state) / total


# A training run's MODEL.WEIGHTS initialises part of a model (an ImageNet backbone is 40-60% of a
# detector's weights); below this share the file is for another architecture.
MIN_LOADED_FRACTION = 0.1


def load_weights(
    model: nn.Module,
    path: str,
    *,
    complete: bool,
    key: str = "MODEL.WEIGHTS",
    what: str = "",
    distiller_checkpoint: str = "student",
) -> None:
    """Load ``path`` into a plain detector or a distiller, refusing files that do not fit.

    * a distiller's checkpoint (``student.*`` keys) goes into a distiller as it is, and into a
      plain detector as its student (the other keys, adapters, are left out, as
      ``tools/extract_student.py`` does);
    * any other file (a plain checkpoint, an ImageNet or model-zoo ``.pkl``) goes into a plain
      detector, or into a distiller's student, whose parameter names carry no ``student.`` prefix.

    Args:
        model: the detector or distiller (possibly DDP-wrapped).
        path: the weights file (local path or any detectron2 / iopath URL); empty for none.
        complete: every weight of the model must come from the file (evaluation, a teacher).
            Otherwise the file may initialise a part, but not less than ``MIN_LOADED_FRACTION``.
        key: the config key or option that named the file, for messages.
        what: what the model is, for messages (default: its class, built from the config).
        distiller_checkpoint: what a distiller's checkpoint given to a plain detector is:
            "student" (its student is loaded) or "refuse" (a teacher must be exported first).

    Raises:
        WeightsError: the file is missing, unreadable, unsafe, or does not fit the model.
    """
    if not path:
        return
    if isinstance(model, DistributedDataParallel):
        model = model.module
    checkpointer = KDCheckpointer(model)
    local = fetch(path, key)
    if not os.path.isfile(local):
        raise WeightsError(f"{key} '{path}' does not exist: fix the path")
    checkpoint = checkpointer._load_file(local)
    state = checkpoint.get("model")
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{key} '{path}' holds no model weights")
    from_distiller = any(k.startswith(_STUDENT_PREFIX) for k in state)
    target = model
    if hasattr(model, "student") and not from_distiller:
        target = model.student
    elif not hasattr(model, "student") and from_distiller:
        if distiller_checkpoint == "refuse":
            raise WeightsError(
                f"{key} '{path}' is a distillation checkpoint (its keys start with 'student.'): "
                "export the student first with tools/extract_student.py and use that file"
            )
        logger.info(
            "%s '%s' is a distillation checkpoint: loading its student (adapters left out; "
            "tools/extract_student.py writes the student alone)",
            key,
            path,
        )
        checkpoint = dict(checkpoint, model=student_state_dict(state))
    logger.info("Loading %s into %s", path, type(target).__name__)
    target_checkpointer = KDCheckpointer(target)
    incompatible = target_checkpointer._load_model(checkpoint)
    fraction = _fraction_loaded(target, incompatible)
    missed = list(incompatible.missing_keys) + [k for k, *_ in incompatible.incorrect_shapes]
    if (complete and missed) or fraction < MIN_LOADED_FRACTION:
        shapes = "; ".join(
            f"{k}: file {tuple(a)} vs model {tuple(b)}"
            for k, a, b in incompatible.incorrect_shapes[:3]
        )
        raise WeightsError(
            f"{key} '{path}' does not fit the "
            f"{what or type(target).__name__ + ' built from the config'}: "
            f"{len(missed)} of its weights are missing from the file or of another shape "
            f"(only {fraction:.0%} of the model loaded; e.g. {', '.join(missed[:4])}"
            f"{'; ' + shapes if shapes else ''}). "
            + (
                "Evaluating or distilling from it would use untrained weights: pass the "
                "weights trained with this config (same architecture, depth, widths and "
                "NUM_CLASSES)"
                if complete
                else "Pass weights of this architecture, or leave MODEL.WEIGHTS empty to start "
                "from random weights"
            )
        )
    target_checkpointer._log_incompatible_keys(incompatible)


def export_student_config(cfg: CfgNode) -> CfgNode:
    """A plain detectron2 config for the student of a KD config.

    ``KD.STUDENT.INPUT_SCALE`` is folded into the test input size, since a low-resolution student
    was trained, and must be evaluated, on images that much smaller.

    Args:
        cfg: the KD config.
    """
    scfg = student_config(cfg)
    scfg.defrost()
    scale = cfg.KD.STUDENT.INPUT_SCALE
    if scale != 1.0:
        scfg.INPUT.MIN_SIZE_TEST = int(round(cfg.INPUT.MIN_SIZE_TEST * scale))
        scfg.INPUT.MAX_SIZE_TEST = int(round(cfg.INPUT.MAX_SIZE_TEST * scale))
        scfg.INPUT.MIN_SIZE_TRAIN = tuple(int(round(s * scale)) for s in cfg.INPUT.MIN_SIZE_TRAIN)
        scfg.INPUT.MAX_SIZE_TRAIN = int(round(cfg.INPUT.MAX_SIZE_TRAIN * scale))
    scfg.pop("KD")
    if kd_provided_parts(scfg):
        # Its weights come from MODEL.WEIGHTS: building it must not need the ImageNet file.
        if "MOBILENET" in scfg.MODEL:
            scfg.MODEL.MOBILENET.IMAGENET_WEIGHTS = ""
    else:
        # Only keys plain detectron2 knows, so the file merges into get_cfg() without `import kd`.
        _prune_to(scfg, get_cfg())
    scfg.freeze()
    return scfg


def kd_provided_parts(cfg: CfgNode) -> List[str]:
    """The config keys naming parts of the model that ``import kd`` registers (found in
    detectron2's registries, e.g. ``MODEL.BACKBONE.NAME build_mobilenetv2_fpn_backbone``); empty
    for a model plain detectron2 builds."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    parts = []
    for key, registry, name in (
        ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE),
        ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME),
    ):
        part = registry.get(name) if name in registry else None
        if getattr(part, "__module__", "").split(".")[0] == "kd":
            parts.append(f"{key} {name}")
    return parts


def dump_student_config(cfg: CfgNode) -> str:
    """``cfg.dump()``, headed by a comment saying how to load it when ``import kd`` must register
    parts of the model (plain detectron2 would stop at an unknown key or name)."""
    parts = kd_provided_parts(cfg)
    if not parts:
        return cfg.dump()
    header = (
        f"# This model uses what the kd package registers ({'; '.join(parts)}).\n"
        "# Wherever it is loaded: put this repository's projects/ on sys.path, `import kd`, and\n"
        "# call kd.add_kd_config(cfg) on get_cfg() before cfg.merge_from_file(this file)\n"
        "# (tools/predict.py and tools/export_student.py do).\n"
    )
    return header + cfg.dump()


def _prune_to(cfg: CfgNode, reference: CfgNode) -> None:
    for key in list(cfg.keys()):
        if key not in reference:
            cfg.pop(key)
        elif isinstance(cfg[key], CfgNode) and isinstance(reference[key], CfgNode):
            _prune_to(cfg[key], reference[key])
