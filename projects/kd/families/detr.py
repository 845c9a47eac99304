"""The DETR family: this project's DETR-style models (:mod:`kd.modeling.detr`), whose encoding,
detection queries and decoding of given boxes (:meth:`~kd.modeling.detr.DETR.encode`,
``detection_anchors``, ``decode_groups``) the DETR distillers and :func:`kd.probes.probe_detr` use;
a Hugging Face DETR teacher answers the same questions (:mod:`kd.families.hf_detr`)."""

from kd.families.registry import register_model_class_family
from kd.modeling.detr import DETR

__all__ = ["DETRFamily"]


DETRFamily = register_model_class_family("DETR", DETR)
