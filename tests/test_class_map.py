"""KD.TEACHER.CLASS_MAP (kd/class_map.py): teachers' classes mapped to the student's by name, and
the KD terms computed on the mapped columns only (hand-computed values)."""

import math
from types import SimpleNamespace

import pytest
import torch

from kd.class_map import ClassMapError, build_class_map


# ----------------------------------------------------------------------------- the map
def test_same_names_in_the_same_order_are_the_identity():
    m = build_class_map(["a", "b"], ["a", "b"])
    assert m.is_identity and not m.missing


def test_by_name_ignoring_case_and_separators_in_the_student_order():
    m = build_class_map(
        ["traffic light", "car", "person"], ["N/A", "person", "Traffic_Light", "car", "dog"]
    )
    assert m.student_index == (0, 1, 2) and m.teacher_index == (2, 3, 1)
    assert not m.is_identity and not m.missing
    assert m.teacher_to_student().tolist() == [-1, 2, 0, 1, -1]


def test_coco_91_id_space_with_holes():
    """A teacher with COCO's 91 ids ("N/A" holes, as Hugging Face DETR configs name them)."""
    teacher = ["N/A"] * 91
    teacher[1], teacher[3], teacher[18] = "person", "car", "dog"
    m = build_class_map(["dog", "person", "N/A"], teacher)
    assert m.pairs() == [("dog", "dog"), ("person", "person")]
    assert m.missing == ["N/A"]  # a hole never matches, even a class literally named so


def test_student_classes_the_teacher_lacks_are_left_out():
    m = build_class_map(["disc", "ring", "star"], ["star", "disc"])
    assert m.student_index == (0, 2) and m.teacher_index == (1, 0)
    assert m.missing == ["ring"]
    assert "not in the teacher" in m.describe() and "ring" in m.describe()


def test_aliases_win_over_names_and_can_leave_a_class_out():
    m = build_class_map(
        ["car", "bike", "person"],
        ["person", "automobile", "car", "bicycle"],
        ["car=automobile", "bike=bicycle", "person="],
    )
    assert m.pairs() == [("car", "automobile"), ("bike", "bicycle")]
    assert m.missing == ["person"]


@pytest.mark.parametrize(
    "spec, match",
    [
        (["car"], "student_class=teacher_class"),
        (["truck=car"], "the student has no class 'truck'"),
        (["car=truck"], "the teacher has no class 'truck'"),
        (["bike=car"], "both map to the teacher's 'car'"),
    ],
)
def test_bad_aliases_are_refused(spec, match):
    with pytest.raises(ClassMapError, match=match):
        build_class_map(["car", "bike"], ["car", "bicycle"], spec)


def test_no_class_in_common_and_index_mode():
    with pytest.raises(ClassMapError, match="no name in common"):
        build_class_map(["a"], ["b"])
    assert build_class_map(["a", "b"], ["x", "y"], ["index"]).is_identity
    with pytest.raises(ClassMapError, match="the teacher has 2 classes, the student 1"):
        build_class_map(["a"], ["x", "y"], ["index"])


# ----------------------------------------------------------------------------- KD terms
def test_kd_detr_terms_compare_only_the_mapped_columns_by_hand():
    """Student classes (a, b, c); teacher classes (x, b, a, y): a <- column 2, b <- column 1, c
    missing. The KL, the foreground weight and the box terms, worked out by hand."""
    from kd.meta_arch.kd_detr import KDDETRDistiller
    from kd.modeling.detr.structures import DecoderOutput

    cmap = build_class_map(["a", "b", "c"], ["x", "b", "a", "y"])
    s_logits = torch.tensor([[[[1.0, 0.0, 50.0]]]])  # (L=1, B=1, M=1, 3); c must not count
    t_logits = torch.tensor([[[[9.0, math.log(3.0), 0.0, 9.0]]]])  # a: 0, b: log 3
    s_boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.2]]]])
    t_boxes = torch.tensor([[[[0.6, 0.5, 0.2, 0.2]]]])
    this = SimpleNamespace(
        class_map=cmap,
        teacher_layer=0,
        student_layers=[0],
        loss_kwargs=dict(
            temperature=1.0,
            cls_weight=1.0,
            l1_weight=5.0,
            giou_weight=2.0,
            foreground_weight=True,
            normalize="num_queries",
        ),
    )
    hidden = torch.zeros(1, 1, 1, 4)
    losses = KDDETRDistiller.distillation_losses(
        this,
        {"general": DecoderOutput(s_logits, s_boxes, hidden)},
        {"general": DecoderOutput(t_logits, t_boxes, hidden)},
    )
    # Teacher over (a, b): softmax(0, log 3) = (1/4, 3/4); student over (a, b): softmax(1, 0).
    p_t = [0.25, 0.75]
    p_s = [math.e / (math.e + 1), 1 / (math.e + 1)]
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    # Foreground weight: the teacher's top sigmoid among a and b only (not x or y at 9).
    w = 1 / (1 + math.exp(-math.log(3.0)))  # 0.75
    assert losses["loss_kd_kd_detr_cls"].item() == pytest.approx(w * kl, rel=1e-6)
    assert losses["loss_kd_kd_detr_l1"].item() == pytest.approx(w * 5.0 * 0.1, rel=1e-5)
    # Boxes [0.4, 0.6] and [0.5, 0.7] in x: IoU 0.1 / 0.3 = 1/3, hull = union: GIoU loss 2/3.
    assert losses["loss_kd_kd_detr_giou"].item() == pytest.approx(w * 2.0 * (2 / 3), rel=1e-5)


def test_hetero_terms_compare_only_the_mapped_columns_by_hand():
    """DETR -> Faster R-CNN, "foreground" target: the student's softmax without background over
    the mapped classes against the teacher's mapped logits; the teacher's top mapped class picks
    the student's per-class box."""
    from kd.meta_arch.hetero_detr_to_rcnn import DETRToRCNNDistiller
    from kd.probes import ProbeAnswer

    cmap = build_class_map(["a", "b", "c"], ["b", "y", "a"])  # a <- 2, b <- 0, c missing
    this = SimpleNamespace(
        class_map=cmap,
        class_target="foreground",
        background="max",
        _points=lambda sampled, sizes: (torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]), valid, None),
        _student_answers=lambda *args: student,
        _teacher_probe=lambda encoded, points, valid: teacher,
        teacher=SimpleNamespace(encode=lambda x: None),
        teacher_inputs=lambda x: x,
    )
    valid = torch.tensor([[True]])
    # Student: K_s = 3 + background; per-class boxes, the one of class b differs.
    s_logits = torch.tensor([[[[0.0, 1.0, 30.0, 5.0]]]])
    s_boxes = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]])
    student = ProbeAnswer(s_logits, s_boxes[None, None, None], "softmax")
    t_logits = torch.tensor([[[[math.log(3.0), 20.0, 0.0]]]])  # b: log 3, y: 20, a: 0
    teacher = ProbeAnswer(t_logits, torch.tensor([[[[[0.5, 0.5, 0.2, 0.2]]]]]), "sigmoid")
    calls = []

    def loss(s_logits, s_boxes, t_logits, t_boxes, activation, no_object):
        calls.append((s_logits, s_boxes, t_logits, activation, no_object))
        return {"cls": s_logits.sum() * 0}

    this._loss, this._named = loss, lambda terms: terms
    images = SimpleNamespace(image_sizes=[(10, 10)])
    DETRToRCNNDistiller._distill(this, [{}], images, {}, [], None, None)
    s, boxes, t, activation, no_object = calls[0]
    # Columns in student order (a, b): the student's (0, 1), the teacher's (2, 0).
    torch.testing.assert_close(s, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(t, torch.tensor([[0.0, math.log(3.0)]]))
    # The teacher's top mapped class is b (sigmoid(log 3) > sigmoid(0)), not y: b's box.
    torch.testing.assert_close(boxes, torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    assert activation == "sigmoid" and no_object is False


def test_the_teacher_ap_check_scores_the_mapped_classes():
    from detectron2.structures import Boxes, Instances

    from kd.teacher_eval import _TeacherAsDistilled

    cmap = build_class_map(["a", "b"], ["b", "x", "a"])
    r = Instances((10, 10))
    r.pred_boxes = Boxes(torch.zeros(3, 4))
    r.scores = torch.tensor([0.9, 0.8, 0.7])
    r.pred_classes = torch.tensor([0, 1, 2])  # b, x, a
    distiller = SimpleNamespace(
        class_map=cmap, teacher=lambda x: [{"instances": r}], teacher_inputs=lambda x: x
    )
    (out,) = _TeacherAsDistilled(distiller)([{}])
    assert out["instances"].pred_classes.tolist() == [1, 0]  # b -> 1, a -> 0; x dropped
    assert out["instances"].scores.tolist() == pytest.approx([0.9, 0.7])


def test_a_yacs_teacher_is_mapped_by_its_datasets_class_names(datasets_root):
    """Any teacher source: a yacs / LazyConfig teacher's names are its DATASETS.TRAIN[0]'s."""
    from conftest import TINY_DETR_OPTS, build_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from kd.teacher import TeacherInfo, check_class_agreement

    name = "kdtest_superset_teacher_train"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).thing_classes = ["hexagon", "ellipse", "cross", "star"]
    cfg = build_cfg("configs/kd_shapes/detr_kd_detr.yaml", TINY_DETR_OPTS)
    info = TeacherInfo(None, "BGR", 4, (name,), "teacher.yaml")
    cmap = check_class_agreement(cfg, info, "DETR")
    assert cmap.pairs() == [("star", "star"), ("cross", "cross"), ("ellipse", "ellipse")]
    assert cmap.missing == ["disc", "ring", "square", "triangle"]
