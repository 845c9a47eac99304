"""The family registry: each built detector is recognised as its family, with its classes."""

import pytest
import torch
from conftest import TINY_DETR_OPTS, TINY_RCNN_OPTS, build_cfg
from detectron2.modeling import build_model

from kd.families.registry import FAMILY_REGISTRY, family_name, family_of, num_classes_of

# config -> (family name, MODEL.*.NUM_CLASSES key the detector's classes come from)
CASES = {
    "configs/kd_shapes/faster_rcnn_student.yaml": ("Faster R-CNN", "ROI_HEADS"),
    "configs/kd_shapes/retinanet_student.yaml": ("RetinaNet", "RETINANET"),
    "configs/kd_shapes/fcos_student.yaml": ("FCOS", "FCOS"),
    "configs/kd_shapes/detr_student.yaml": ("DETR", "DETR"),
}


@pytest.mark.parametrize("config", sorted(CASES))
def test_each_family_recognised_with_its_classes(config, one_thread):
    name, key = CASES[config]
    opts = TINY_DETR_OPTS if name == "DETR" else TINY_RCNN_OPTS[:4]
    cfg = build_cfg(config, list(opts))
    model = build_model(cfg)
    assert family_name(model) == name
    assert num_classes_of(model) == getattr(cfg.MODEL, key).NUM_CLASSES
    # Exactly one family claims it.
    assert [n for n, f in FAMILY_REGISTRY if f.matches(model)] == [family_of(model).__name__]


def test_a_model_of_no_family():
    model = torch.nn.Linear(2, 2)
    assert family_of(model) is None
    assert family_name(model) == "Linear"
    with pytest.raises(ValueError, match="Linear is not of a registered detector family"):
        num_classes_of(model)


def test_cascade_rcnn_is_not_faster_rcnn(one_thread):
    cfg = build_cfg(
        "configs/kd_shapes/faster_rcnn_student.yaml",
        [*TINY_RCNN_OPTS[:4], "MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
         "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"],
    )  # fmt: skip
    model = build_model(cfg)
    assert family_of(model) is None
    assert family_name(model) == "GeneralizedRCNN"
