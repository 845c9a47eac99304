"""Hand-computed checks of the KD-DETR distillation loss (kd.losses.kd_detr)."""

import math

import pytest
import torch

from kd.losses.kd_detr import kd_detr_loss, paired_giou_loss
from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy

LOG2, LOG3 = math.log(2.0), math.log(3.0)


def _t(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


BOX = [0.5, 0.5, 0.2, 0.2]


def test_box_conversion():
    xyxy = box_cxcywh_to_xyxy(_t([[0.5, 0.5, 0.2, 0.4]]))
    assert torch.allclose(xyxy, _t([[0.4, 0.3, 0.6, 0.7]]))


@pytest.mark.parametrize(
    "box1,box2,expected",
    [
        # identical: GIoU 1
        ([0.3, 0.4, 0.2, 0.1], [0.3, 0.4, 0.2, 0.1], 0.0),
        # disjoint: xyxy [0,0,.25,.25] and [.5,0,.75,.25]: IoU 0, union 2a, hull 3a -> GIoU -1/3
        ([0.125, 0.125, 0.25, 0.25], [0.625, 0.125, 0.25, 0.25], 4 / 3),
        # contained: [0,0,1,1] and [.25,.25,.75,.75]: IoU 1/4, hull = union -> GIoU 1/4
        ([0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], 3 / 4),
        # partial: [0,0,.5,.5] and [.25,.25,.75,.75]: IoU 1/7, hull 9, union 7 -> 1/7 - 2/9
        ([0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], 1 - (1 / 7 - 2 / 9)),
    ],
)
def test_paired_giou_hand_values(box1, box2, expected):
    loss = paired_giou_loss(_t([box1]), _t([box2]))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # Symmetric, and the same on float32.
    assert paired_giou_loss(_t([box2]), _t([box1])).item() == pytest.approx(expected, abs=1e-12)
    loss32 = paired_giou_loss(torch.tensor([box1]), torch.tensor([box2]))
    assert loss32.item() == pytest.approx(expected, abs=1e-6)


def test_paired_giou_agrees_with_torchvision_and_handles_degenerate_boxes():
    from torchvision.ops import generalized_box_iou

    torch.manual_seed(0)
    a = torch.rand(6, 4, dtype=torch.float64) * 0.5 + 0.25
    b = torch.rand(6, 4, dtype=torch.float64) * 0.5 + 0.25
    reference = 1 - generalized_box_iou(box_cxcywh_to_xyxy(a), box_cxcywh_to_xyxy(b)).diagonal()
    assert torch.allclose(paired_giou_loss(a, b), reference)
    # Zero-area boxes: finite loss and gradient.
    a = _t([[0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    loss = paired_giou_loss(a, _t([[0.5, 0.5, 0.0, 0.0]]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(a.grad).all()


def test_kl_with_temperature_and_t2_scaling():
    temperature = 10.0
    # At T = 10, teacher logits [10 log 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> [1/2, 1/2].
    student = _t([[[0.0, 0.0]]])
    teacher = _t([[[temperature * LOG3, 0.0]]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    boxes = _t([[BOX]])
    out = kd_detr_loss(student, boxes, teacher, boxes, foreground_weight=False)
    assert out["cls"].item() == pytest.approx(temperature**2 * kl)
    assert out["l1"].item() == 0.0 and out["giou"].item() == pytest.approx(0.0, abs=1e-12)

    # At T = 1 the teacher is sharper: p_t = [3^10 / (3^10 + 1), 1 / (3^10 + 1)], no scaling
    # beyond T^2 = 1.
    p0 = 3.0**10 / (3.0**10 + 1.0)
    kl_1 = p0 * math.log(p0 / 0.5) + (1 - p0) * math.log((1 - p0) / 0.5)
    out = kd_detr_loss(student, boxes, teacher, boxes, temperature=1.0, foreground_weight=False)
    assert out["cls"].item() == pytest.approx(kl_1)

    # cls_weight multiplies; the foreground weight is the teacher's top sigmoid probability.
    out = kd_detr_loss(student, boxes, teacher, boxes, cls_weight=2.0)
    w = _sigmoid(temperature * LOG3)
    assert out["cls"].item() == pytest.approx(2.0 * w * temperature**2 * kl)


def test_foreground_weights_change_the_result_as_computed():
    # Two queries with the same logits for both models (KL = 0) and different boxes.
    # Teacher logits q0 [log 3, 0] -> sigmoid max 3/4; q1 [0, -log 3] -> sigmoid max 1/2.
    logits = _t([[[LOG3, 0.0], [0.0, -LOG3]]])
    student_boxes = _t([[[0.5, 0.5, 0.2, 0.2], [0.4, 0.4, 0.2, 0.2]]])
    teacher_boxes = _t([[[0.6, 0.5, 0.2, 0.2], [0.4, 0.4, 0.3, 0.3]]])
    l1 = [0.1, 0.2]  # summed over the 4 coordinates
    giou = [paired_giou_loss(student_boxes[0, i], teacher_boxes[0, i]).item() for i in range(2)]

    out = kd_detr_loss(logits, student_boxes, logits, teacher_boxes)
    assert out["cls"].item() == pytest.approx(0.0, abs=1e-12)
    # Divided by the number of queries B * M = 2.
    assert out["l1"].item() == pytest.approx(5.0 * (0.75 * l1[0] + 0.5 * l1[1]) / 2)
    assert out["giou"].item() == pytest.approx(2.0 * (0.75 * giou[0] + 0.5 * giou[1]) / 2)

    out = kd_detr_loss(logits, student_boxes, logits, teacher_boxes, normalize="weight_sum")
    assert out["l1"].item() == pytest.approx(5.0 * (0.75 * l1[0] + 0.5 * l1[1]) / 1.25)

    out = kd_detr_loss(logits, student_boxes, logits, teacher_boxes, foreground_weight=False)
    assert out["l1"].item() == pytest.approx(5.0 * (l1[0] + l1[1]) / 2)

    # Softmax probabilities: both queries have top probability 3/4.
    out = kd_detr_loss(
        logits, student_boxes, logits, teacher_boxes, teacher_probs_activation="softmax"
    )
    assert out["l1"].item() == pytest.approx(5.0 * 0.75 * (l1[0] + l1[1]) / 2)


def test_softmax_no_object_class_left_out_of_the_weight():
    # softmax([0, 0, log 2]) = [1/4, 1/4, 1/2]: max 1/2 with the no-object class, 1/4 without.
    logits = _t([[[0.0, 0.0, LOG2]]])
    student_boxes = _t([[[0.5, 0.5, 0.2, 0.2]]])
    teacher_boxes = _t([[[0.6, 0.5, 0.2, 0.2]]])
    kwargs = dict(teacher_probs_activation="softmax")
    with_bg = kd_detr_loss(logits, student_boxes, logits, teacher_boxes, **kwargs)
    without = kd_detr_loss(
        logits, student_boxes, logits, teacher_boxes, no_object_class=True, **kwargs
    )
    assert with_bg["l1"].item() == pytest.approx(5.0 * 0.5 * 0.1)
    assert without["l1"].item() == pytest.approx(5.0 * 0.25 * 0.1)


def test_identical_inputs_give_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 5)
    boxes = torch.rand(2, 7, 4) * 0.5 + 0.25
    out = kd_detr_loss(logits, boxes, logits.clone(), boxes.clone())
    for value in out.values():
        assert value.item() == pytest.approx(0.0, abs=1e-5)


def test_gradients_reach_the_student_only():
    torch.manual_seed(0)
    s_logits = torch.randn(2, 3, 4, requires_grad=True)
    t_logits = torch.randn(2, 3, 4, requires_grad=True)
    s_boxes = (torch.rand(2, 3, 4) * 0.4 + 0.3).requires_grad_(True)
    t_boxes = (torch.rand(2, 3, 4) * 0.4 + 0.3).requires_grad_(True)
    out = kd_detr_loss(s_logits, s_boxes, t_logits, t_boxes)
    sum(out.values()).backward()
    assert t_logits.grad is None and t_boxes.grad is None
    assert s_logits.grad.abs().sum() > 0 and s_boxes.grad.abs().sum() > 0
    assert torch.isfinite(s_logits.grad).all() and torch.isfinite(s_boxes.grad).all()


def test_bad_arguments():
    x, b = torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)
    with pytest.raises(ValueError):
        kd_detr_loss(x, b, x, b, normalize="sum")
    with pytest.raises(ValueError):
        kd_detr_loss(x, b, x, b, teacher_probs_activation="relu")
    with pytest.raises(ValueError):
        kd_detr_loss(x, b, torch.zeros(1, 2, 4), b)
