"""The registry of detector families: what a distiller asks of a teacher or student it did not
build itself (which family it is, how many classes it predicts)."""

from typing import Optional, Type

from detectron2.utils.registry import Registry
from torch import nn

__all__ = [
    "FAMILY_REGISTRY",
    "family_of",
    "family_name",
    "num_classes_of",
    "dense_view_of",
    "register_model_class_family",
]

FAMILY_REGISTRY = Registry("KD_FAMILY")
FAMILY_REGISTRY.__doc__ = """
Detector families a distiller can take as teacher or student. A registered family is a class
with (no instances are made):

* ``name: str``: the family's name in messages ("Faster R-CNN", "DETR");
* ``matches(model: nn.Module) -> bool`` (static): the model is of this family;
* ``num_classes(model: nn.Module) -> int`` (static): K, the object classes it predicts;
* ``dense_view: Optional[type]``: for a family with dense per-location predictions (one-stage
  heads, an R-CNN's RPN), a :class:`kd.families.dense.DenseView` subclass taking the model, that
  distillers comparing two models location by location (GID) read it through; None otherwise.

Each family's module registers its class and holds what distillers do with that family (its
training step, probes, dense view): :mod:`kd.families.rcnn`, :mod:`kd.families.dense`,
:mod:`kd.families.detr`, :mod:`kd.families.hf_detr`. A new family is one such module, imported
by ``kd/families/__init__.py``.
"""


def family_of(model: nn.Module) -> Optional[Type]:
    """The registered family ``model`` belongs to (the first that matches), or None."""
    for _, family in sorted(FAMILY_REGISTRY):
        if family.matches(model):
            return family
    return None


def family_name(model: nn.Module) -> str:
    """The family's name, or the model's class name when no registered family matches."""
    family = family_of(model)
    return family.name if family is not None else type(model).__name__


def num_classes_of(model: nn.Module) -> int:
    """K, the object classes ``model`` predicts, as its family reads them."""
    family = family_of(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} is not of a registered detector family")
    return family.num_classes(model)


def dense_view_of(model: nn.Module, who: str, what: str):
    """The dense view of ``model`` (:class:`kd.families.dense.DenseView`), or one line naming
    the families that have one.

    Args:
        model: the teacher or the student.
        who: "teacher" or "student"; what: the distiller's name, for the message.
    """
    family = family_of(model)
    view = getattr(family, "dense_view", None)
    if view is None:
        dense = sorted(f.name for _, f in FAMILY_REGISTRY if getattr(f, "dense_view", None))
        raise ValueError(
            f"{what} compares dense per-location predictions, which the {who} "
            f"({family_name(model)}) does not make; families that do: {', '.join(dense)}"
        )
    return view(model)


def register_model_class_family(
    name: str, model_class: type, dense_view: Optional[type] = None
) -> Type:
    """Register the family of the instances of one model class whose ``num_classes`` attribute
    is K (detectron2's dense detectors, this project's DETR, the Hugging Face DETR adapter).

    Args:
        name: the family's name in messages.
        model_class: the class whose instances (subclasses' too) are of the family.
        dense_view: its dense view class, if it has one.

    Returns:
        The registered family class, named ``<model class>Family``.
    """
    family = type(
        f"{model_class.__name__}Family",
        (),
        {
            "__doc__": f"{name}: instances of ``{model_class.__module__}.{model_class.__name__}``.",
            "name": name,
            "matches": staticmethod(lambda model: isinstance(model, model_class)),
            "num_classes": staticmethod(lambda model: model.num_classes),
            "dense_view": dense_view,
        },
    )
    FAMILY_REGISTRY.register(family)
    return family
