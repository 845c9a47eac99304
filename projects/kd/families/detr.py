"""The DETR family: this project's DETR-style models (:mod:`kd.modeling.detr`), whose encoding,
detection queries and decoding of given boxes (:meth:`~kd.modeling.detr.DETR.encode`,
``detection_anchors``, ``decode_groups``) the DETR distillers and :func:`kd.probes.probe_detr` use;
a Hugging Face DETR teacher answers the same questions (:mod:`kd.families.hf_detr`)."""

from torch import nn

from kd.families.registry import FAMILY_REGISTRY
from kd.modeling.detr import DETR

__all__ = ["DETRFamily"]


@FAMILY_REGISTRY.register()
class DETRFamily:
    """This project's DETR-style detectors (DETR, DAB, Deformable, RT-DETR-like configs)."""

    name = "DETR"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return isinstance(model, DETR)

    @staticmethod
    def num_classes(model: nn.Module) -> int:
        return model.num_classes
