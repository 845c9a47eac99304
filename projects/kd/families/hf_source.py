"""Where a Hugging Face DETR teacher comes from (``KD.TEACHER.CONFIG_FILE "hf://<folder or hub
id>"``): the families that can take box queries, loading and verifying the model and its
processor config, and the input conventions it expects. The adapter itself is
:mod:`kd.families.hf_detr`.
"""

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from torch import nn

from kd.teacher import TeacherError

__all__ = [
    "HF_PREFIX",
    "FAMILIES",
    "SUPPORTED",
    "HFTeacherError",
    "is_hf_source",
    "load_hf_detector",
    "check_family",
    "weights_file",
]

HF_PREFIX = "hf://"
# model_type -> how its decoder takes box queries.
# RT-DETR family: reference_points logits, encoder_attention_mask = the self-attention mask.
RT_STYLE = "rt_detr"
DAB_STYLE = "dab"  # query_position_embeddings logits, mask through self_attn pre-hooks
DEFORMABLE_STYLE = "deformable"  # box -> (position, content) via pos_trans, mask through pre-hooks
FAMILIES = {
    "rt_detr": RT_STYLE,
    "rt_detr_v2": RT_STYLE,
    "d_fine": RT_STYLE,
    "dab-detr": DAB_STYLE,
    "deformable_detr": DEFORMABLE_STYLE,  # two-stage only
}
SUPPORTED = "RT-DETR, RT-DETR v2, D-FINE, DAB-DETR and two-stage Deformable DETR"
_REFUSED = {
    "detr": "DETR",
    "conditional_detr": "Conditional DETR",
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class HFTeacherError(TeacherError):
    """A Hugging Face teacher that cannot be used as configured; the message says how to fix it."""


def is_hf_source(config_file: str) -> bool:
    """Whether ``KD.TEACHER.CONFIG_FILE`` names a Hugging Face teacher."""
    return config_file.startswith(HF_PREFIX)


# ----------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class InputProcessing:
    """The model's input conventions, from its processor config or the family's defaults."""

    resize: bool
    size: Dict[str, int]
    rescale: float
    normalize: bool
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    pad: bool


def input_processing(model_type: str, processor: Optional[dict]) -> InputProcessing:
    rt = FAMILIES.get(model_type) == RT_STYLE
    p = processor or {}
    size = p.get("size") or (
        {"height": 640, "width": 640} if rt else {"shortest_edge": 800, "longest_edge": 1333}
    )
    normalize = bool(p.get("do_normalize", not rt))
    return InputProcessing(
        resize=bool(p.get("do_resize", True)),
        size=dict(size),
        rescale=float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0,
        normalize=normalize,
        mean=tuple(p.get("image_mean") or _IMAGENET_MEAN),
        std=tuple(p.get("image_std") or _IMAGENET_STD),
        pad=bool(p.get("do_pad", not rt)),
    )


def target_size(h: int, w: int, size: Dict[str, int]) -> Tuple[int, int]:
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        short, long_ = size["shortest_edge"], size.get("longest_edge")
        scale = short / min(h, w)
        if long_ is not None and max(h, w) * scale > long_:
            scale = long_ / max(h, w)
        return max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if "max_height" in size and "max_width" in size:
        scale = min(size["max_height"] / h, size["max_width"] / w)
        return max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    raise HFTeacherError(f"the teacher's processor size {size} is not one this adapter reads")


# ----------------------------------------------------------------------------- loading
def _local_file(source: str, name: str) -> Optional[str]:
    if os.path.isdir(source):
        path = os.path.join(source, name)
        return path if os.path.isfile(path) else None
    try:
        from transformers.utils import cached_file

        return cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 (offline, no such file: the defaults apply)
        return None


def load_hf_detector(source: str) -> Tuple[nn.Module, Optional[dict]]:
    """The detector and its processor config, from a ``save_pretrained`` folder or a hub id.

    Built with ``AutoModelForObjectDetection.from_pretrained`` (never ``trust_remote_code``),
    from safetensors where the folder has them; every weight of the architecture must load.

    Args:
        source: the folder or hub id (``KD.TEACHER.CONFIG_FILE`` without ``hf://``).

    Raises:
        HFTeacherError: no such model, a family that cannot take box queries, or weights that do
            not match the architecture.
    """
    try:
        from transformers import AutoConfig, AutoModelForObjectDetection
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise HFTeacherError(
            f"KD.TEACHER.CONFIG_FILE '{HF_PREFIX}{source}' needs the transformers package "
            f"({e}); make setup installs it"
        ) from None
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 (missing folder, offline hub id, bad json)
        hint = (
            "the folder has no config.json"
            if os.path.isdir(source)
            else "no such folder, and the hub is unreachable or has no such model"
        )
        raise HFTeacherError(
            f"KD.TEACHER.CONFIG_FILE '{HF_PREFIX}{source}' cannot be read ({hint}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); point it at a "
            "folder written by save_pretrained"
        ) from None
    check_family(config, source)
    hf_logging.disable_progress_bar()  # one bar per weight file in every training log otherwise
    use_safetensors = True if _local_file(source, "model.safetensors") else None
    try:
        model, info = AutoModelForObjectDetection.from_pretrained(
            source,
            config=config,
            trust_remote_code=False,
            use_safetensors=use_safetensors,
            output_loading_info=True,
        )
    except Exception as e:  # noqa: BLE001 (missing weights, shape mismatches, ...)
        raise HFTeacherError(
            f"KD.TEACHER.CONFIG_FILE '{HF_PREFIX}{source}': the weights cannot be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        details = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in bad.items())
        raise HFTeacherError(
            f"KD.TEACHER.CONFIG_FILE '{HF_PREFIX}{source}': the weights do not match the "
            f"architecture ({details or info.get('error_msgs')}); a teacher whose weights did not "
            "load would distil noise. Save the trained model with save_pretrained into that folder"
        )
    processor = None
    path = _local_file(source, "preprocessor_config.json")
    if path:
        with open(path) as f:
            processor = json.load(f)
    return model, processor


def check_family(config: Any, source: str = "") -> str:
    """The adapter family of a ``transformers`` config; refuses the others in one line."""
    model_type = getattr(config, "model_type", "")
    name = _REFUSED.get(model_type)
    if model_type == "deformable_detr" and not getattr(config, "two_stage", False):
        name = "single-stage Deformable DETR"
    if name is not None:
        raise HFTeacherError(
            f"{HF_PREFIX}{source}: {name} decodes learned positional queries that cannot express a "
            f"box, so distillation points cannot be put to it; use {SUPPORTED}"
        )
    if model_type not in FAMILIES:
        raise HFTeacherError(
            f"{HF_PREFIX}{source}: model type '{model_type}' is not a DETR teacher this project "
            f"can put box queries to; use {SUPPORTED}"
        )
    if model_type == "deformable_detr" and not getattr(config, "with_box_refine", False):
        raise HFTeacherError(
            f"{HF_PREFIX}{source}: two-stage Deformable DETR without with_box_refine has no "
            "per-layer box heads to answer with; use one trained with with_box_refine=True"
        )
    return model_type


def weights_file(config_file: str) -> Optional[str]:
    """The local weights file of an ``hf://`` teacher (for caches and checksums), or None."""
    source = config_file[len(HF_PREFIX) :] if is_hf_source(config_file) else config_file
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = _local_file(source, name)
        if path:
            return path
    return None
