"""GISM, GID's general instance selection (Dai et al., CVPR 2021; shared/METHODS.md, section 2):
per image, the predictions where teacher and student disagree most, their boxes kept after NMS.

Pure functions of tensors, without gradients of their own (the selected boxes are points, not a
loss). The method's module (:class:`kd.meta_arch.gid.GeneralInstanceDistillation`) calls them with
each family's dense scores and decoded boxes.
"""

from typing import List, Optional, Tuple

import torch

from kd.losses.precision import float32_loss

__all__ = [
    "gi_scores",
    "greedy_nms_first_k",
    "select_general_instances",
    "select_general_instances_batched",
]

_SCORE_MODES = ("max_abs_diff", "max_score_diff")


def gi_scores(
    teacher_probs: torch.Tensor, student_probs: torch.Tensor, mode: str = "max_abs_diff"
) -> torch.Tensor:
    """
    General-instance score of each prediction.

    Args:
        teacher_probs: (R, C) teacher class probabilities (for two-stage detectors, C = 1: the RPN
            objectness).
        student_probs: (R, C) student class probabilities at the same R predictions.
        mode: "max_abs_diff": ``max_c |P_t(r, c) - P_s(r, c)|`` [paper];
            "max_score_diff": ``|max_c P_t(r, c) - max_c P_s(r, c)|`` (the authors' code [code]).
            The two differ when the models are confident about different classes.

    Returns:
        (R,) scores in [0, 1], without graph.
    """
    if teacher_probs.shape != student_probs.shape:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} and student_probs "
            f"{tuple(student_probs.shape)} must have the same shape"
        )
    teacher_probs = teacher_probs.detach()
    student_probs = student_probs.detach()
    if mode == "max_abs_diff":
        return (teacher_probs - student_probs).abs_().amax(dim=-1)
    if mode == "max_score_diff":
        return (teacher_probs.amax(dim=-1) - student_probs.amax(dim=-1)).abs()
    raise ValueError(f"gi_scores: mode must be one of {_SCORE_MODES}, got {mode!r}")


def greedy_nms_first_k(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The first ``k`` survivors of greedy NMS, for a batch of images at once.

    Greedy NMS takes the best remaining box, suppresses every box overlapping it by more than
    ``iou_threshold``, and repeats. Its first ``k`` survivors depend only on those ``k`` steps,
    so GISM (which keeps 10) needs ``k`` passes of one-to-all IoU, O(k * R) per image, instead of
    a full NMS over every candidate, O(R^2) in the worst case. The survivors are those of
    ``torchvision.ops.nms`` (suppression at IoU strictly above the threshold), up to the order
    among equal scores.

    Args:
        boxes: (N, R, 4) XYXY boxes (one of zero area overlaps nothing, as in torchvision).
        scores: (N, R) scores; ``-inf`` marks a candidate that must never be kept.
        iou_threshold: a box is suppressed when its IoU with a kept box is above it.
        k: the number of survivors wanted per image.

    Returns:
        (index, kept): (N, k') long indices into R in order of decreasing score, k' = min(k, R),
        and (N, k') bool, False where an image has fewer than k' survivors.
    """
    n, r = scores.shape
    k = min(k, r)
    scores = scores.clone()
    # (N, R) coordinate planes, contiguous: each step is a handful of elementwise passes.
    x1, y1, x2, y2 = (c.contiguous() for c in boxes.unbind(dim=-1))
    areas = (x2 - x1) * (y2 - y1)
    picks, kept = [], []
    for _ in range(k):
        best_score, best = scores.max(dim=1, keepdim=True)  # (N, 1)
        picks.append(best[:, 0])
        kept.append(best_score[:, 0] > float("-inf"))
        w = (torch.min(x2, x2.gather(1, best)) - torch.max(x1, x1.gather(1, best))).clamp_(min=0)
        h = (torch.min(y2, y2.gather(1, best)) - torch.max(y1, y1.gather(1, best))).clamp_(min=0)
        inter = w.mul_(h)
        union = areas + areas.gather(1, best) - inter
        # inter / union > t without the division (union > 0 for any box with an area).
        scores.masked_fill_(inter > iou_threshold * union, float("-inf"))
        scores.scatter_(1, best, float("-inf"))  # kept boxes leave the pool even at t >= 1
    if not picks:
        empty = torch.zeros((n, 0), dtype=torch.long, device=scores.device)
        return empty, empty.bool()
    return torch.stack(picks, dim=1), torch.stack(kept, dim=1)


@torch.no_grad()
@float32_loss
def select_general_instances_batched(
    teacher_probs: torch.Tensor,
    student_probs: torch.Tensor,
    teacher_boxes: torch.Tensor,
    student_boxes: torch.Tensor,
    *,
    top_k: int = 10,
    nms_iou: float = 0.3,
    score_mode: str = "max_abs_diff",
    score_threshold: float = 0.0,
    pre_nms_top_k: Optional[int] = None,
) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """
    General instance selection module (GISM) [paper], every image of a batch at once.

    For every dense prediction r: the GI score (:func:`gi_scores`); the GI box, which is the
    teacher's box where ``max_c P_t(r) > max_c P_s(r)`` and the student's otherwise (ties go to the
    student, as the paper's "else"). Then NMS on the GI scores at ``nms_iou``, and the ``top_k``
    best survive. A GI box of zero area (e.g. clipped away outside the image) is no instance and
    is dropped before NMS rather than spend one of the K slots. Images never interact: each one's
    selection is what it would be alone.

    Args:
        teacher_probs: (N, R, C) teacher class probabilities.
        student_probs: (N, R, C) student class probabilities at the same predictions.
        teacher_boxes: (N, R, 4) teacher's decoded boxes, XYXY absolute.
        student_boxes: (N, R, 4) student's decoded boxes, XYXY absolute.
        top_k: K, the number of instances kept per image (10 [paper]).
        nms_iou: IoU threshold of the NMS (0.3 [paper]).
        score_mode: see :func:`gi_scores`; "max_abs_diff" follows the paper.
        score_threshold: candidates scoring below it are dropped before NMS. [open]; the default
            0.0 keeps every candidate, as in the paper.
        pre_nms_top_k: keep only this many best-scoring candidates before NMS [open]; None
            (default) = all candidates, as in the paper.

    Returns:
        Per image, (boxes (K', 4) float32 by decreasing score, K' <= top_k; scores (K',) float32,
        their GI scores; from_teacher (K',) bool, True where the box is the teacher's).
    """
    if not (teacher_boxes.shape == student_boxes.shape == teacher_probs.shape[:-1] + (4,)):
        raise ValueError(
            f"teacher_boxes {tuple(teacher_boxes.shape)} and student_boxes "
            f"{tuple(student_boxes.shape)} must both be (N, R, 4) with (N, R) = "
            f"{tuple(teacher_probs.shape[:-1])}"
        )
    scores = gi_scores(teacher_probs, student_probs, mode=score_mode).float()
    # amax: a reduction over the few classes without the indices, 3-4x faster than max on CPU.
    from_teacher = teacher_probs.amax(dim=-1) > student_probs.amax(dim=-1)
    boxes = torch.where(from_teacher[..., None], teacher_boxes, student_boxes).float()

    drop = (boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])
    if score_threshold > 0.0:
        drop |= scores < score_threshold
    candidates = scores.masked_fill(drop, float("-inf"))
    if pre_nms_top_k is not None and pre_nms_top_k < candidates.shape[1]:
        beyond = torch.ones_like(drop)
        beyond.scatter_(1, candidates.topk(pre_nms_top_k, dim=1).indices, False)
        candidates = candidates.masked_fill(beyond, float("-inf"))
    index, kept = greedy_nms_first_k(boxes, candidates, nms_iou, top_k)
    # One gather for the batch, split per image (a boolean gather per image would wait for the
    # GPU each time): the same indices in the same order.
    per_image = index[kept].split(kept.sum(dim=1).tolist())
    out = []
    for i, idx in enumerate(per_image):
        out.append((boxes[i, idx], scores[i, idx], from_teacher[i, idx]))
    return out


def select_general_instances(
    teacher_probs: torch.Tensor,
    student_probs: torch.Tensor,
    teacher_boxes: torch.Tensor,
    student_boxes: torch.Tensor,
    **kwargs,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    GISM for one image: :func:`select_general_instances_batched` on (R, C) / (R, 4) inputs.

    Returns:
        boxes: (K', 4) float32 selected GI boxes, K' <= top_k, sorted by decreasing score.
        scores: (K',) float32, their GI scores.
        from_teacher: (K',) bool, True where the box is the teacher's.
    """
    if not (teacher_boxes.shape == student_boxes.shape == (teacher_probs.shape[0], 4)):
        raise ValueError(
            f"teacher_boxes {tuple(teacher_boxes.shape)} and student_boxes "
            f"{tuple(student_boxes.shape)} must both be (R, 4) with R = {teacher_probs.shape[0]}"
        )
    batch = (x[None] for x in (teacher_probs, student_probs, teacher_boxes, student_boxes))
    return select_general_instances_batched(*batch, **kwargs)[0]
