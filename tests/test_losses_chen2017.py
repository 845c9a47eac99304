"""Hand-computed checks of the Chen et al. 2017 losses (kd.losses.chen2017)."""

import math

import pytest
import torch

from kd.losses.chen2017 import (
    hint_loss,
    objectness_soft_cross_entropy,
    teacher_bounded_regression,
    weighted_soft_cross_entropy,
)

LOG2, LOG3 = math.log(2.0), math.log(3.0)


def _t(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def test_soft_ce_uniform():
    # P_t = P_s = 1/4 everywhere: -4 * 1/4 * log(1/4) = log 4.
    loss = weighted_soft_cross_entropy(torch.zeros(2, 4), torch.zeros(2, 4))
    assert torch.allclose(loss, torch.full((2,), math.log(4.0)))


def test_soft_ce_peaked_and_class_weights():
    # Teacher logits [log 3, 0] -> P_t = [3/4, 1/4]; student [log 2, 0] -> P_s = [2/3, 1/3].
    student = _t([[LOG2, 0.0]])
    teacher = _t([[LOG3, 0.0]])
    plain = -(0.75 * math.log(2 / 3) + 0.25 * math.log(1 / 3))
    assert weighted_soft_cross_entropy(student, teacher).item() == pytest.approx(plain)

    # Background (last column here) weighted 1.5: only the background term is scaled.
    weighted = -(0.75 * math.log(2 / 3) + 1.5 * 0.25 * math.log(1 / 3))
    loss = weighted_soft_cross_entropy(student, teacher, _t([1.0, 1.5]))
    assert loss.item() == pytest.approx(weighted)

    # All-ones weights are the same as no weights.
    ones = weighted_soft_cross_entropy(student, teacher, _t([1.0, 1.0]))
    assert ones.item() == pytest.approx(plain)


def test_soft_ce_temperature():
    # At T = 2, logits [2 log 3, 0] and [2 log 2, 0] give the same P as the test above.
    student = _t([[2 * LOG2, 0.0]])
    teacher = _t([[2 * LOG3, 0.0]])
    expected = -(0.75 * math.log(2 / 3) + 0.25 * math.log(1 / 3))
    loss = weighted_soft_cross_entropy(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(expected)
    loss_t2 = weighted_soft_cross_entropy(student, teacher, temperature=2.0, scale_by_t2=True)
    assert loss_t2.item() == pytest.approx(4.0 * expected)
    # At T = 1 the same logits are sharper: P_t = [9/10, 1/10], P_s = [4/5, 1/5].
    at_one = -(0.9 * math.log(0.8) + 0.1 * math.log(0.2))
    assert weighted_soft_cross_entropy(student, teacher).item() == pytest.approx(at_one)


def test_soft_ce_gradient_student_only():
    student = _t([[LOG2, 0.0, 1.0]], requires_grad=True)
    teacher = _t([[LOG3, 0.0, -1.0]], requires_grad=True)
    weighted_soft_cross_entropy(student, teacher).sum().backward()
    assert teacher.grad is None
    # Unweighted soft CE: d/dz_s = P_s - P_t (the teacher's P sums to 1).
    expected = torch.softmax(student.detach(), -1) - torch.softmax(teacher.detach(), -1)
    assert torch.allclose(student.grad, expected)


def test_objectness_soft_ce_hand_value():
    # p_t = sigmoid(log 3) = 3/4, p_s = sigmoid(log 2) = 2/3; not-object weighted 1.5.
    loss = objectness_soft_cross_entropy(_t([LOG2, 0.0]), _t([LOG3, 0.0]))
    expected0 = -(0.75 * math.log(2 / 3) + 1.5 * 0.25 * math.log(1 / 3))
    expected1 = -(0.5 * math.log(0.5) + 1.5 * 0.5 * math.log(0.5))
    assert torch.allclose(loss, _t([expected0, expected1]))

    # The same as the general function on 2-class logits [z, 0] with weights [1, 1.5].
    z_s, z_t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    two_class = weighted_soft_cross_entropy(
        torch.stack([z_s, torch.zeros_like(z_s)], 1),
        torch.stack([z_t, torch.zeros_like(z_t)], 1),
        _t([1.0, 1.5]),
        temperature=3.0,
    )
    direct = objectness_soft_cross_entropy(z_s, z_t, temperature=3.0)
    assert torch.allclose(direct, two_class)


def test_objectness_soft_ce_stable_and_student_only():
    student = _t([80.0, -80.0], requires_grad=True)
    teacher = _t([-80.0, 80.0], requires_grad=True)
    loss = objectness_soft_cross_entropy(student, teacher, background_weight=1.0)
    # Confidently wrong: loss ~ |z| = 80, finite.
    assert torch.allclose(loss, _t([80.0, 80.0]))
    loss.sum().backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()


def test_bounded_regression_switches_at_the_bound():
    y = torch.zeros(4, 4, dtype=torch.float64)
    teacher = _t([[1.0, 0.0, 0.0, 0.0]] * 4)  # ||R_t - y||^2 = 1 for every sample
    student = _t(
        [
            [1.0, 1.0, 0.0, 0.0],  # error 2 > 1: active, loss 2
            [0.5, 0.5, 0.0, 0.0],  # error 0.5: student beats the teacher, loss 0
            [0.0, 0.0, 1.0, 0.0],  # error exactly 1: 1 + 0 > 1 is false, loss 0
            [0.0, 0.0, 0.0, -1.5],  # error 2.25: active
        ]
    )
    loss = teacher_bounded_regression(student, teacher, y)
    assert torch.equal(loss, _t([2.0, 0.0, 0.0, 2.25]))

    # Margin: the student with error 0.5 stays active while 0.5 + m > 1, i.e. for m > 0.5.
    err_half = student[1:2]
    assert teacher_bounded_regression(err_half, teacher[:1], y[:1], margin=0.75).item() == 0.5
    assert teacher_bounded_regression(err_half, teacher[:1], y[:1], margin=0.5).item() == 0.0
    assert teacher_bounded_regression(err_half, teacher[:1], y[:1], margin=0.25).item() == 0.0


def test_bounded_regression_nonzero_targets_and_gradients():
    y = _t([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    teacher = _t([[1.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 2.0]], requires_grad=True)  # error 1
    student = _t([[3.0, 1.0, 1.0, 1.0], [1.5, 1.0, 1.0, 1.0]], requires_grad=True)  # 4, 0.25
    loss = teacher_bounded_regression(student, teacher, y)
    assert torch.equal(loss.detach(), _t([4.0, 0.0]))
    loss.sum().backward()
    assert teacher.grad is None
    # Active row: 2 (R_s - y); inactive row: no gradient.
    assert torch.equal(student.grad, _t([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_hint_loss_values_and_gradient():
    student = _t([[1.0, -2.0], [3.0, 4.0]], requires_grad=True)
    teacher = _t([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    # l2: (1 + 4 + 4 + 16) / 4; l1: (1 + 2 + 2 + 4) / 4.
    assert hint_loss(student, teacher).item() == pytest.approx(25 / 4)
    assert hint_loss(student, teacher, norm="l1").item() == pytest.approx(9 / 4)
    hint_loss(student, teacher).backward()
    assert teacher.grad is None
    # d/ds mean((s - t)^2) = 2 (s - t) / 4.
    assert torch.allclose(student.grad, (student - teacher).detach() / 2)


def test_hint_loss_errors():
    with pytest.raises(ValueError, match=r"\(1, 8, 4, 4\).*\(1, 16, 4, 4\)"):
        hint_loss(torch.zeros(1, 8, 4, 4), torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="norm"):
        hint_loss(torch.zeros(2), torch.zeros(2), norm="l3")
