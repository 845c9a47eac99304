"""Hand-computed checks of the GID losses and instance selection (kd.losses.gid)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses.gid import (
    gi_feature_loss,
    gi_relation_loss,
    gi_relation_losses,
    gi_response_loss,
)
from kd.points.gism import (
    gi_scores,
    greedy_nms_first_k,
    select_general_instances,
    select_general_instances_batched,
)

LOG2, LOG3 = math.log(2.0), math.log(3.0)


def _t(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


# ---------------------------------------------------------------- selection (GISM)


def test_gi_scores_two_modes():
    teacher = _t([[0.9, 0.1], [0.2, 0.7]])
    student = _t([[0.1, 0.8], [0.2, 0.6]])
    # Row 0: the models are sure about different classes. Paper: max(|0.8|, |0.7|) = 0.8;
    # authors' code: |0.9 - 0.8| = 0.1. Row 1: both give 0.1.
    assert torch.allclose(gi_scores(teacher, student), _t([0.8, 0.1]))
    assert torch.allclose(gi_scores(teacher, student, mode="max_score_diff"), _t([0.1, 0.1]))
    with pytest.raises(ValueError):
        gi_scores(teacher, student, mode="mean")


def _gism_case():
    # Single-class (RPN-like) predictions. GI score = |P_t - P_s|.
    teacher_probs = _t([[0.9], [0.8], [0.2], [0.5], [0.3]])
    student_probs = _t([[0.1], [0.1], [0.8], [0.45], [0.6]])
    # scores:            0.8    0.7    0.6    0.05    0.3
    teacher_boxes = _t(
        [
            [0, 0, 10, 10],  # r0: teacher more confident -> teacher box
            [1, 1, 10, 10],  # r1: IoU 81/100 with r0 -> suppressed
            [50, 50, 60, 60],  # r2: student more confident -> student box
            [100, 100, 110, 110],  # r3: teacher more confident (0.5 > 0.45)
            [0, 8, 10, 18],  # r4: IoU 20/180 with r0 -> kept; student box
        ]
    )
    student_boxes = _t(
        [
            [0, 0, 10, 12],
            [1, 1, 10, 10],
            [50, 50, 62, 62],
            [100, 100, 111, 111],
            [0, 8, 10, 18],
        ]
    )
    return teacher_probs, student_probs, teacher_boxes, student_boxes


def test_gism_selects_suppresses_and_picks_confident_box():
    boxes, scores, from_teacher = select_general_instances(*_gism_case())
    expected_boxes = torch.tensor(
        [[0, 0, 10, 10], [50, 50, 62, 62], [0, 8, 10, 18], [100, 100, 110, 110]],
        dtype=torch.float32,
    )
    assert torch.equal(boxes, expected_boxes)
    assert torch.allclose(scores, torch.tensor([0.8, 0.6, 0.3, 0.05]))
    assert from_teacher.tolist() == [True, False, False, True]


def test_gism_top_k_threshold_and_pre_nms_cap():
    case = _gism_case()
    boxes, scores, _ = select_general_instances(*case, top_k=2)
    assert boxes.shape == (2, 4)
    assert torch.allclose(scores, torch.tensor([0.8, 0.6]))

    _, scores, _ = select_general_instances(*case, score_threshold=0.5)
    assert torch.allclose(scores, torch.tensor([0.8, 0.6]))

    # Only r0 and r1 survive the pre-NMS cap, and r1 is then suppressed by r0.
    _, scores, _ = select_general_instances(*case, pre_nms_top_k=2)
    assert torch.allclose(scores, torch.tensor([0.8]))

    # A looser NMS keeps r1 too.
    _, scores, _ = select_general_instances(*case, nms_iou=0.9)
    assert torch.allclose(scores, torch.tensor([0.8, 0.7, 0.6, 0.3, 0.05]))


def test_gism_tie_goes_to_student_and_no_grad():
    teacher_probs = _t([[0.5]], requires_grad=True)
    student_probs = _t([[0.5]], requires_grad=True)
    teacher_boxes = _t([[0, 0, 4, 4]])
    student_boxes = _t([[1, 1, 5, 5]], requires_grad=True)
    boxes, scores, from_teacher = select_general_instances(
        teacher_probs, student_probs, teacher_boxes, student_boxes
    )
    assert boxes.tolist() == [[1, 1, 5, 5]] and from_teacher.tolist() == [False]
    assert not boxes.requires_grad and not scores.requires_grad


def test_gism_score_modes_choose_differently():
    # A: the models disagree on the class (abs diff 0.8, max-score diff 0.1).
    # B: they agree on the class, the teacher is surer (both modes 0.5).
    teacher_probs = _t([[0.9, 0.1], [0.6, 0.0]])
    student_probs = _t([[0.1, 0.8], [0.1, 0.0]])
    boxes_t = _t([[0, 0, 10, 10], [20, 20, 30, 30]])
    paper, _, _ = select_general_instances(teacher_probs, student_probs, boxes_t, boxes_t, top_k=1)
    code, _, _ = select_general_instances(
        teacher_probs, student_probs, boxes_t, boxes_t, top_k=1, score_mode="max_score_diff"
    )
    assert paper.tolist() == [[0, 0, 10, 10]]
    assert code.tolist() == [[20, 20, 30, 30]]


def test_gism_empty():
    boxes, scores, from_teacher = select_general_instances(
        torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 4)
    )
    assert boxes.shape == (0, 4) and scores.shape == (0,) and from_teacher.shape == (0,)


def _random_boxes(generator, n, r, size=100.0):
    xy = torch.rand(n, r, 2, generator=generator) * size
    wh = torch.rand(n, r, 2, generator=generator) * size / 3 + 1
    return torch.cat([xy, xy + wh], dim=-1)


@pytest.mark.parametrize("iou", [0.3, 0.5])
def test_greedy_first_k_equals_torchvision_nms(iou):
    from torchvision.ops import nms

    g = torch.Generator().manual_seed(0)
    boxes = _random_boxes(g, 3, 400)
    scores = torch.rand(3, 400, generator=g)
    scores[1, 200:] = float("-inf")  # never kept: torchvision sees only the first 200
    index, kept = greedy_nms_first_k(boxes, scores, iou, k=10)
    for i in range(3):
        alive = torch.isfinite(scores[i]).nonzero().squeeze(1)
        expected = alive[nms(boxes[i, alive], scores[i, alive], iou)[:10]]
        assert kept[i].all()
        assert index[i].tolist() == expected.tolist()
    # Fewer survivors than k: the rest are marked not kept.
    two = torch.tensor([[[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]])
    index, kept = greedy_nms_first_k(two, torch.tensor([[0.9, 0.8, 0.7]]), 0.3, k=5)
    assert index[0][kept[0]].tolist() == [0, 2] and kept.shape == (1, 3)


def test_gism_batched_selects_each_image_on_its_own():
    from torchvision.ops import nms

    g = torch.Generator().manual_seed(1)
    n, r, c = 3, 300, 4
    t_probs, s_probs = torch.rand(n, r, c, generator=g), torch.rand(n, r, c, generator=g)
    t_boxes, s_boxes = _random_boxes(g, n, r), _random_boxes(g, n, r)
    s_boxes[2, :50, 2:] = s_boxes[2, :50, :2]  # zero-area student boxes: never selected
    kwargs = dict(top_k=7, nms_iou=0.3, pre_nms_top_k=100)
    batched = select_general_instances_batched(t_probs, s_probs, t_boxes, s_boxes, **kwargs)
    for i in range(n):
        # The paper's steps for this image alone, with torchvision's NMS.
        score = (t_probs[i] - s_probs[i]).abs().max(dim=1).values
        from_t = t_probs[i].max(dim=1).values > s_probs[i].max(dim=1).values
        box = torch.where(from_t[:, None], t_boxes[i], s_boxes[i])
        alive = ((box[:, 2:] - box[:, :2]) > 0).all(dim=1).nonzero().squeeze(1)
        alive = alive[score[alive].topk(100).indices]
        keep = alive[nms(box[alive], score[alive], 0.3)[:7]]
        boxes, scores, from_teacher = batched[i]
        assert torch.equal(boxes, box[keep]) and torch.equal(scores, score[keep])
        assert torch.equal(from_teacher, from_t[keep]) and len(keep) == 7
        alone = select_general_instances(t_probs[i], s_probs[i], t_boxes[i], s_boxes[i], **kwargs)
        assert torch.equal(alone[0], boxes)  # the one-image entry point agrees


# ---------------------------------------------------------------- feature loss


def test_feature_loss_hand_value_and_gradient():
    student = torch.zeros(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)]).double()
    teacher.requires_grad_(True)
    # ||t_0 - s_0||^2 = 4 * 1, ||t_1 - s_1||^2 = 4 * 4; (4 + 16) / K with K = 2.
    loss = gi_feature_loss(student, teacher)
    assert loss.item() == pytest.approx(10.0)
    loss.backward()
    assert teacher.grad is None
    assert torch.allclose(student.grad, -(teacher.detach() - student.detach()))  # 2 (s - t) / 2


def test_feature_loss_empty_is_graph_connected_zero():
    student = torch.zeros(0, 4, 3, 3, requires_grad=True)
    loss = gi_feature_loss(student, torch.zeros(0, 4, 3, 3))
    assert loss.dim() == 0 and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None


# ---------------------------------------------------------------- relation loss


def _smooth_l1(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def test_relation_loss_hand_value():
    # Student points form a 3-4-5 triangle: mean off-diagonal distance (2 * 12) / 6 = 4, so the
    # normalised distances are 3/4, 1, 5/4.
    student = _t([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], requires_grad=True)
    # Teacher points: distances 1, 1, sqrt 2; mean (2 + sqrt 2) / 3.
    teacher = _t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mean_t = (2 + math.sqrt(2)) / 3
    pairs = [(3 / 4, 1 / mean_t), (1.0, 1 / mean_t), (5 / 4, math.sqrt(2) / mean_t)]
    # Every unordered pair appears twice among the K^2 - K = 6 ordered pairs.
    expected = 2 * sum(_smooth_l1(s, t) for s, t in pairs) / 6
    loss = gi_relation_loss(student, teacher)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_relation_loss_scale_invariant_and_dims_may_differ():
    torch.manual_seed(0)
    student = torch.randn(5, 8, dtype=torch.float64)
    teacher = torch.randn(5, 12, dtype=torch.float64)
    base = gi_relation_loss(student, teacher)
    assert base.item() > 0
    assert gi_relation_loss(7.3 * student, teacher).item() == pytest.approx(base.item(), rel=1e-6)
    assert gi_relation_loss(student, 0.01 * teacher).item() == pytest.approx(base.item(), rel=1e-6)
    # Features of shape (K, C, h, w) are flattened.
    assert gi_relation_loss(student.view(5, 2, 2, 2), teacher).item() == pytest.approx(base.item())
    # The same geometry on both sides gives zero.
    assert gi_relation_loss(student, 3.0 * student).item() == pytest.approx(0.0, abs=1e-12)


def _relation_by_cdist(student, teacher):
    """The relation loss of one image by a second method: torch.cdist distance matrices."""

    def normalised(x):
        d = torch.cdist(x.flatten(1), x.flatten(1))
        k = d.shape[0]
        return d / (d.sum() / (k * k - k))

    k = student.shape[0]
    return F.smooth_l1_loss(normalised(student), normalised(teacher), reduction="sum") / (k * k - k)


def test_relation_losses_batched_equals_each_image_alone():
    torch.manual_seed(0)
    student = torch.randn(3, 5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 4, 3, 3, dtype=torch.float64)
    losses = gi_relation_losses(student, teacher)
    assert losses.shape == (3,)
    for i in range(3):
        expected = _relation_by_cdist(student[i].detach(), teacher[i])
        assert losses[i].item() == pytest.approx(expected.item(), rel=1e-9)
        assert gi_relation_loss(student[i], teacher[i]).item() == pytest.approx(losses[i].item())
    # Images do not interact: changing image 0 leaves the others' losses as they are.
    moved = student.detach().clone()
    moved[0] = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    assert torch.equal(gi_relation_losses(moved, teacher)[1:], losses[1:].detach())
    losses.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_relation_loss_too_few_instances_is_zero():
    for k in (0, 1, 2):
        student = torch.randn(k, 4, requires_grad=True)
        loss = gi_relation_loss(student, torch.randn(k, 4))
        assert loss.dim() == 0 and loss.item() == 0.0 and loss.requires_grad
        loss.backward()
    student = torch.randn(3, 4)
    assert gi_relation_loss(student, torch.randn(3, 4), min_instances=4).item() == 0.0


def test_relation_loss_identical_features_are_finite():
    student = torch.ones(4, 6, requires_grad=True)
    teacher = torch.ones(4, 6, requires_grad=True)
    loss = gi_relation_loss(student, teacher)
    assert torch.isfinite(loss)
    loss.backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()


# ---------------------------------------------------------------- response loss


def test_response_loss_hand_value_and_mask():
    student_logits = _t([[0.0, 0.0], [100.0, -100.0], [LOG2, 0.0]], requires_grad=True)
    teacher_logits = _t([[0.0, 0.0], [-100.0, 100.0], [LOG3, -LOG3]], requires_grad=True)
    student_deltas = _t([[1.0, -1.0, 0.0, 0.0], [100.0, 0, 0, 0], [0.5, 0, 0, 0]], True)
    teacher_deltas = _t([[0.0, 0.0, 0.0, 0.0], [0.0, 0, 0, 0], [0.0, 0, 0, 0]], True)
    mask = torch.tensor([True, False, True])  # row 1 is wildly off and must not count

    # Row 0: p_s = 1/2, targets 1/2 for both classes: 2 log 2.
    row0 = 2 * LOG2
    # Row 2: class 0 target 3/4, p_s = 2/3; class 1 target 1/4, p_s = 1/2.
    row2 = -(0.75 * math.log(2 / 3) + 0.25 * math.log(1 / 3)) + LOG2
    cls, reg = gi_response_loss(
        student_logits, teacher_logits, student_deltas, teacher_deltas, mask
    )
    assert cls.item() == pytest.approx((row0 + row2) / 2)
    assert reg.item() == pytest.approx((2.0 + 0.5) / 2)

    (cls + reg).backward()
    assert teacher_logits.grad is None and teacher_deltas.grad is None
    assert student_logits.grad[1].abs().sum() == 0 and student_deltas.grad[1].abs().sum() == 0

    # A float mask is the same as the bool one.
    cls_f, reg_f = gi_response_loss(
        student_logits, teacher_logits, student_deltas, teacher_deltas, mask.double()
    )
    assert cls_f.item() == pytest.approx(cls.item()) and reg_f.item() == pytest.approx(reg.item())


def test_response_loss_normalised_by_mask_size():
    torch.manual_seed(0)
    s_cls, t_cls = torch.randn(1, 3), torch.randn(1, 3)
    s_reg, t_reg = torch.randn(1, 4), torch.randn(1, 4)
    one = gi_response_loss(s_cls, t_cls, s_reg, t_reg, torch.ones(1, dtype=torch.bool))
    # Five copies of the same row, all masked: the same per-row mean.
    five = gi_response_loss(
        s_cls.expand(5, 3),
        t_cls.expand(5, 3),
        s_reg.expand(5, 4),
        t_reg.expand(5, 4),
        torch.ones(5, dtype=torch.bool),
    )
    assert five[0].item() == pytest.approx(one[0].item())
    assert five[1].item() == pytest.approx(one[1].item())
    expected_cls = F.binary_cross_entropy_with_logits(s_cls, t_cls.sigmoid(), reduction="sum")
    assert one[0].item() == pytest.approx(expected_cls.item())
    assert one[1].item() == pytest.approx((s_reg - t_reg).abs().sum().item())

    # Empty mask: divided by max(0, 1) = 1, so exactly zero and finite.
    cls, reg = gi_response_loss(s_cls, t_cls, s_reg, t_reg, torch.zeros(1, dtype=torch.bool))
    assert cls.item() == 0.0 and reg.item() == 0.0
