"""The DETR family inside detectron2: DAB-DETR, Deformable DETR and DINO as one meta-architecture.

Importing this package registers ``META_ARCH_REGISTRY["DETR"]``; ``add_detr_config`` adds its
``MODEL.DETR.*`` keys. See :class:`DETR` for the stage-wise interface used by distillers.
"""

from kd.modeling.detr.box_ops import denormalize_boxes, normalize_boxes
from kd.modeling.detr.config import add_detr_config
from kd.modeling.detr.detr import DETR
from kd.modeling.detr.structures import DecoderOutput, DETRDetections, DETREncoded, QueryGroup

__all__ = [
    "DETR",
    "DETREncoded",
    "DETRDetections",
    "DecoderOutput",
    "QueryGroup",
    "add_detr_config",
    "normalize_boxes",
    "denormalize_boxes",
]
