"""KD-DETR, Wang et al., CVPR 2024 (shared/METHODS.md, section 3): the distillation loss at shared
distillation queries.

Pure functions of tensors. Teacher inputs are detached inside; the student inputs keep their graph.
The caller calls :func:`kd_detr_loss` once per student decoder layer, each time against the
teacher's final layer [code].
"""

from typing import Dict

import torch
import torch.nn.functional as F

from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy

from .precision import float32_loss

__all__ = ["paired_giou_loss", "kd_detr_loss"]


@float32_loss
def paired_giou_loss(
    boxes1: torch.Tensor, boxes2: torch.Tensor, *, eps: float = 1e-9
) -> torch.Tensor:
    """
    ``1 - GIoU`` of aligned pairs (``boxes1[i]`` with ``boxes2[i]``, not all pairs).

    Written out rather than torchvision's ``generalized_box_iou_loss``, which adds its eps (1e-7) to
    the denominators: on normalised boxes (areas ~1e-3) that biases identical boxes to a loss of
    ~1e-4 instead of 0. Here eps only floors the denominators of degenerate (zero-area) boxes.

    Args:
        boxes1: (..., 4) cxcywh boxes.
        boxes2: (..., 4) cxcywh boxes, same shape.
        eps: floor of the union and enclosing areas.

    Returns:
        (...) loss in [0, 2): 0 for identical boxes, towards 2 for far-apart small boxes.
    """
    x0a, y0a, x1a, y1a = box_cxcywh_to_xyxy(boxes1).unbind(dim=-1)
    x0b, y0b, x1b, y1b = box_cxcywh_to_xyxy(boxes2).unbind(dim=-1)
    area_a = (x1a - x0a).clamp(min=0) * (y1a - y0a).clamp(min=0)
    area_b = (x1b - x0b).clamp(min=0) * (y1b - y0b).clamp(min=0)
    inter = (torch.min(x1a, x1b) - torch.max(x0a, x0b)).clamp(min=0) * (
        torch.min(y1a, y1b) - torch.max(y0a, y0b)
    ).clamp(min=0)
    union = area_a + area_b - inter
    hull = (torch.max(x1a, x1b) - torch.min(x0a, x0b)) * (torch.max(y1a, y1b) - torch.min(y0a, y0b))
    iou = inter / union.clamp(min=eps)
    giou = iou - (hull - union) / hull.clamp(min=eps)
    return 1.0 - giou


@float32_loss
def kd_detr_loss(
    student_logits: torch.Tensor,
    student_boxes: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_boxes: torch.Tensor,
    *,
    temperature: float = 10.0,
    cls_weight: float = 1.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    foreground_weight: bool = True,
    teacher_probs_activation: str = "sigmoid",
    no_object_class: bool = False,
    normalize: str = "num_queries",
) -> Dict[str, torch.Tensor]:
    """
    The KD-DETR loss over the distillation queries [paper]::

        L_distill = sum_i w_i [l_cls * KL(c_t || c_s)
                               + l_L1 * L1(b_s, b_t) + l_GIoU * (1 - GIoU(b_s, b_t))]

    Args:
        student_logits: (B, M, K) student class logits at the M distillation queries.
        student_boxes: (B, M, 4) student boxes, cxcywh normalised to [0, 1].
        teacher_logits: (B, M, K) teacher class logits at the same queries (detached here).
        teacher_boxes: (B, M, 4) teacher boxes, cxcywh normalised (detached here).
        temperature: T of the KL, on softmax(logits / T) of both models; the KL is multiplied by
            T^2 to keep gradient magnitudes independent of T (10 [code]).
        cls_weight: lambda_cls (1 [code]).
        l1_weight: lambda_L1 (5 [code]).
        giou_weight: lambda_GIoU (2 [code]).
        foreground_weight: weight each query by ``w_i = max_c p_t(c | q_i)``, the teacher's top
            class probability at temperature 1 (detached) [paper]; False gives w_i = 1.
        teacher_probs_activation: how p_t is obtained from the teacher's logits for ``w_i``:
            "sigmoid" for focal-loss DETRs (DAB / Deformable / DINO; the default), "softmax" for
            softmax-classifier DETRs. The KL always uses a softmax [code].
        no_object_class: the last logit is DETR's "no object" class (softmax DETRs). [open]; if True
            it is left out of the max in ``w_i``, which would otherwise give background queries the
            largest weights. False by default.
        normalize: the divisor of ``sum_i w_i [...]``. [open]; "num_queries" (default) divides by
            B*M, so that the loss scale does not move with the teacher's confidence and a query's
            contribution is exactly its weight; "weight_sum" divides by ``max(sum_i w_i, eps)``, a
            weighted mean.

    Returns:
        {"cls", "l1", "giou"}: scalar tensors, each already multiplied by its lambda.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_boxes.shape != teacher_boxes.shape or student_boxes.shape[:-1] != (
        student_logits.shape[:-1]
    ):
        raise ValueError(
            f"student_boxes {tuple(student_boxes.shape)} and teacher_boxes "
            f"{tuple(teacher_boxes.shape)} must be {tuple(student_logits.shape[:-1]) + (4,)}"
        )
    if teacher_probs_activation not in ("sigmoid", "softmax"):
        raise ValueError(
            "teacher_probs_activation must be 'sigmoid' or 'softmax', got "
            f"{teacher_probs_activation!r}"
        )
    if normalize not in ("num_queries", "weight_sum"):
        raise ValueError(f"normalize must be 'num_queries' or 'weight_sum', got {normalize!r}")
    teacher_logits = teacher_logits.detach()
    teacher_boxes = teacher_boxes.detach()

    # KL(c_t || c_s) = sum_c p_t (log p_t - log p_s), per query.
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=-1)
    kl = kl * temperature**2

    l1 = (student_boxes - teacher_boxes).abs().sum(dim=-1)
    giou = paired_giou_loss(student_boxes, teacher_boxes)

    if foreground_weight:
        with torch.no_grad():
            if teacher_probs_activation == "sigmoid":
                probs = teacher_logits.sigmoid()
            else:
                probs = teacher_logits.softmax(dim=-1)
            if no_object_class:
                probs = probs[..., :-1]
            weights = probs.max(dim=-1).values.to(kl.dtype)
    else:
        weights = torch.ones_like(kl)

    if normalize == "num_queries":
        norm = float(max(kl.numel(), 1))
    else:
        norm = weights.sum().clamp(min=1e-6)

    return {
        "cls": cls_weight * (weights * kl).sum() / norm,
        "l1": l1_weight * (weights * l1).sum() / norm,
        "giou": giou_weight * (weights * giou).sum() / norm,
    }
