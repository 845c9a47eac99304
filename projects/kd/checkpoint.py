"""Student export: a distiller's checkpoint reduced to the plain student detector."""

from typing import Dict

import torch
from detectron2.config import CfgNode, get_cfg

from kd.meta_arch.base import student_config

__all__ = ["student_state_dict", "export_student_config"]

_STUDENT_PREFIX = "student."
# Students whose architecture (and config keys) this package provides: their exported config keeps
# its extra keys, and loading it needs `import kd`.
KD_PROVIDED_ARCHITECTURES = ("DETR", "FCOS")


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
    if scfg.MODEL.META_ARCHITECTURE not in KD_PROVIDED_ARCHITECTURES:
        # Only keys plain detectron2 knows, so the file merges into get_cfg() without `import kd`.
        _prune_to(scfg, get_cfg())
    scfg.freeze()
    return scfg


def _prune_to(cfg: CfgNode, reference: CfgNode) -> None:
    for key in list(cfg.keys()):
        if key not in reference:
            cfg.pop(key)
        elif isinstance(cfg[key], CfgNode) and isinstance(reference[key], CfgNode):
            _prune_to(cfg[key], reference[key])
