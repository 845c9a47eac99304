"""Loss terms of Chen et al., NeurIPS 2017 (shared/METHODS.md, section 1).

Pure functions of tensors. Every teacher input is detached inside, so a caller cannot backpropagate
into the teacher by accident; the student inputs keep their graph.

The compositions ``L_cls = mu * L_hard + (1 - mu) * L_soft`` and ``L_reg = smoothL1 + nu * L_b``
and the ``1/N`` normalisation over the sampled anchors / proposals belong to the caller (the
distiller), which knows the sample counts; the functions here return per-sample values so that it
can.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .precision import float32_loss

__all__ = [
    "weighted_soft_cross_entropy",
    "objectness_soft_cross_entropy",
    "teacher_bounded_regression",
    "hint_loss",
]


@float32_loss
def weighted_soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    class_weights: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """
    Class-weighted soft cross entropy ``L_soft = - sum_c w_c * P_t[c] * log P_s[c]`` [paper], with
    ``P = softmax(Z / T)``.

    Args:
        student_logits: (N, C) student class logits Z_s.
        teacher_logits: (N, C) teacher class logits Z_t (detached here).
        class_weights: (C,) weight w_c per class. The paper uses 1.5 for background and 1 for every
            other class; in detectron2's box predictor background is the last column, so a caller
            builds ``[1, ..., 1, 1.5]``. None means all ones.
        temperature: T of the softmax on both sides. The paper found T = 1 best for detection.
        scale_by_t2: multiply by T^2 (Hinton et al.) to keep gradient magnitudes independent of T.
            False by default because Chen et al. do not use the factor.

    Returns:
        (N,) per-sample loss. Its minimum over the student is the teacher's (weighted) entropy, not
        zero: it is a cross entropy, not a KL divergence.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    terms = p_t * log_p_s
    if class_weights is not None:
        terms = terms * class_weights.to(terms).detach()
    loss = -terms.sum(dim=-1)
    if scale_by_t2:
        loss = loss * temperature**2
    return loss


@float32_loss
def objectness_soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    background_weight: float = 1.5,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """
    The weighted soft cross entropy for the RPN, whose two "classes" object / not-object come from a
    single objectness logit z: ``p_obj = sigmoid(z / T)``, ``p_not = 1 - p_obj``. This is exactly
    :func:`weighted_soft_cross_entropy` on the 2-class logits ``[z, 0]`` with weights
    ``[1, background_weight]``; it is computed directly with ``logsigmoid`` for stability.

    Args:
        student_logits: (N,) student objectness logits (any shape; the loss is elementwise).
        teacher_logits: same shape, teacher objectness logits (detached here).
        background_weight: w for the not-object class (1.5 [paper]); the object class gets 1.
        temperature: T applied to the logits of both models.
        scale_by_t2: multiply by T^2; False by default, as in the paper.

    Returns:
        Per-anchor loss, same shape as ``student_logits``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    z_s = student_logits / temperature
    p_t = torch.sigmoid(teacher_logits.detach() / temperature)
    # log(1 - sigmoid(z)) = logsigmoid(-z): no log(0) for confident students.
    loss = -(p_t * F.logsigmoid(z_s) + background_weight * (1.0 - p_t) * F.logsigmoid(-z_s))
    if scale_by_t2:
        loss = loss * temperature**2
    return loss


@float32_loss
def teacher_bounded_regression(
    student_deltas: torch.Tensor,
    teacher_deltas: torch.Tensor,
    targets: torch.Tensor,
    *,
    margin: float = 0.0,
) -> torch.Tensor:
    """
    Teacher-bounded regression loss [paper]:
    ``L_b = ||R_s - y||^2`` if ``||R_s - y||^2 + m > ||R_t - y||^2``, else 0.

    The teacher is an upper bound, not a target: the student is only pushed towards y while it is
    not better than the teacher by at least the margin.

    Args:
        student_deltas: (N, 4) student box deltas R_s for the ground-truth class.
        teacher_deltas: (N, 4) teacher box deltas R_t for the same samples (detached here).
        targets: (N, 4) regression targets y (detached here: they are ground truth).
        margin: m. [open] in the paper; 0 by default.

    Returns:
        (N,) per-sample loss; the squared L2 norm is summed over the 4 coordinates.
    """
    if not (student_deltas.shape == teacher_deltas.shape == targets.shape):
        raise ValueError(
            f"student_deltas {tuple(student_deltas.shape)}, teacher_deltas "
            f"{tuple(teacher_deltas.shape)} and targets {tuple(targets.shape)} must match"
        )
    targets = targets.detach()
    student_err = (student_deltas - targets).pow(2).sum(dim=-1)
    teacher_err = (teacher_deltas.detach() - targets).pow(2).sum(dim=-1)
    # The comparison is a gate, not part of the loss: no gradient flows through it.
    active = (student_err.detach() + margin) > teacher_err
    return torch.where(active, student_err, torch.zeros_like(student_err))


@float32_loss
def hint_loss(
    student_adapted: torch.Tensor, teacher: torch.Tensor, *, norm: str = "l2"
) -> torch.Tensor:
    """
    Hint loss ``||Z - A(V)||`` between the teacher's hint layer Z and the adapted student layer A(V)
    [paper]. The adaptation layer is the caller's (a registered module); this is the distance only.

    The mean over all elements (rather than the sum) keeps the loss independent of the feature size,
    so that gamma = 0.5 [paper] means the same for every FPN level and input resolution.

    Args:
        student_adapted: A(V), any shape.
        teacher: Z, exactly the same shape (detached here).
        norm: "l2" (mean squared difference) or "l1" (mean absolute difference, the paper's
            variant).

    Returns:
        A scalar tensor.
    """
    if student_adapted.shape != teacher.shape:
        raise ValueError(
            f"hint_loss: student_adapted shape {tuple(student_adapted.shape)} does not match "
            f"teacher shape {tuple(teacher.shape)}; the adaptation layer must map the student "
            "feature to the teacher's shape"
        )
    diff = student_adapted - teacher.detach()
    if norm == "l2":
        return diff.pow(2).mean()
    if norm == "l1":
        return diff.abs().mean()
    raise ValueError(f"hint_loss: norm must be 'l2' or 'l1', got {norm!r}")
