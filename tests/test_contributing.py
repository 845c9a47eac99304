"""The code of docs/contributing.md ("Adding a method") runs and does what the page says."""

import copy
import math
import re
import sys
import types

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_RCNN_OPTS, build_cfg, kd_opts
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from kd.teacher import freeze

pytestmark = pytest.mark.usefixtures("event_storage")

STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"


@pytest.fixture(scope="module")
def example():
    """The page's loss module (as kd.losses.roi_logits) and method class, executed."""
    text = (REPO / "docs" / "contributing.md").read_text()
    loss_code, class_code = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
    module = types.ModuleType("kd.losses.roi_logits")
    exec(compile(loss_code, "contributing.md (loss)", "exec"), module.__dict__)
    sys.modules["kd.losses.roi_logits"] = module
    namespace = {}
    try:
        exec(compile(class_code, "contributing.md (method)", "exec"), namespace)
        yield module.roi_logits_loss, namespace["ROILogitsDistiller"]
    finally:
        sys.modules.pop("kd.losses.roi_logits", None)
        META_ARCH_REGISTRY._obj_map.pop("ROILogitsDistiller", None)


@pytest.fixture(scope="module")
def batch(datasets_root):
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    cfg = build_cfg(STUDENT_CONFIG, kd_opts(("", ""), "/tmp"))
    mapper = DatasetMapper(cfg, True)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]
    torch.manual_seed(0)
    np.random.seed(0)
    return [mapper(copy.deepcopy(d)) for d in dicts]


def test_the_loss_by_hand(example):
    loss, _ = example
    ln3 = math.log(3.0)
    # p_t = (3/4, 1/4), p_s = (1/4, 3/4): KL = 3/4 ln 3 + 1/4 ln(1/3) = ln(3) / 2, per row.
    student = torch.tensor([[0.0, ln3], [0.0, ln3]])
    teacher = torch.tensor([[ln3, 0.0], [ln3, 0.0]])
    assert loss(student, teacher).item() == pytest.approx(ln3 / 2, rel=1e-6)
    # At T = 2 the logits twice as far apart give the same distributions, times T^2 = 4.
    assert loss(2 * student, 2 * teacher, 2.0).item() == pytest.approx(2 * ln3, rel=1e-6)


def _distiller(cls, student, teacher):
    return cls(
        student=student,
        teacher=freeze(teacher),
        teacher_input_format="BGR",
        student_input_format="BGR",
        weight=1.0,
        temperature=2.0,
    )


def test_the_method_keeps_the_students_losses_and_learns_from_the_teacher(example, batch):
    _, cls = example
    torch.manual_seed(0)
    # Frozen BatchNorms: the student in training and the teacher in eval mode compute the same
    # features, so a teacher that is the student has nothing to teach.
    frozen = [*TINY_RCNN_OPTS, "MODEL.RESNETS.NORM", "FrozenBN"]
    student = build_model(build_cfg(STUDENT_CONFIG, frozen))
    model = _distiller(cls, student, copy.deepcopy(student))

    model.train()
    torch.manual_seed(5)
    losses = model(batch)
    torch.manual_seed(5)
    alone = student(batch)
    for name, value in alone.items():  # the same samples, the same losses
        assert torch.equal(losses[name], value), name
    assert set(losses) == set(alone) | {"loss_kd_roi_logits"}
    losses["loss_kd_roi_logits"].backward()  # the term reaches the student
    assert student.roi_heads.box_predictor.cls_score.weight.grad is not None

    # The teacher is the student: nothing to learn.
    assert model(batch)["loss_kd_roi_logits"].item() < 1e-6
    # A teacher with sharper class scores: something to learn.
    with torch.no_grad():
        model.teacher.roi_heads.box_predictor.cls_score.weight.mul_(3.0)
    assert model(batch)["loss_kd_roi_logits"].item() > 1e-3
