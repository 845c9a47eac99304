"""General Instance Distillation, Dai et al., CVPR 2021 (shared/METHODS.md, section 2).

Pure functions of tensors: general instance selection (GISM) and the feature, relation and response
losses. Teacher inputs are detached inside; the student inputs keep their graph. Everything is per
image: selection takes a batch but selects in each image on its own, and the losses' callers must
never pool instances across images (that would turn the relation loss into a cross-image relation
the paper does not define).
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .precision import float32_loss

__all__ = [
    "gi_scores",
    "greedy_nms_first_k",
    "select_general_instances",
    "select_general_instances_batched",
    "gi_feature_loss",
    "gi_relation_loss",
    "gi_relation_losses",
    "gi_response_loss",
]

_SCORE_MODES = ("max_abs_diff", "max_score_diff")


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    # A 0-dim zero that is still connected to the student's graph, so that the loss dict has the
    # same entries and DDP sees the same used parameters whether or not an image had instances.
    return t.sum() * 0.0


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


@float32_loss
def gi_feature_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """
    GI feature loss ``(1/K) sum_i ||t_i - s_i||^2`` [paper].

    The squared norm is summed over C, h, w (not averaged), so the loss grows with the ROI feature
    size; this is the normalisation the authors' weight lambda_1 ~ 5e-3 (10x10 ROIs, 256 channels)
    is tuned for.

    Args:
        student_feats: (K, C, h, w) ROI features of the student, already adapted to the teacher's
            channels (the adapter is the caller's registered module).
        teacher_feats: (K, C, h, w) teacher ROI features of the same boxes (detached here).

    Returns:
        A scalar tensor; a graph-connected zero when K = 0.
    """
    if student_feats.shape != teacher_feats.shape:
        raise ValueError(
            f"student_feats {tuple(student_feats.shape)} and teacher_feats "
            f"{tuple(teacher_feats.shape)} must have the same shape"
        )
    num = student_feats.shape[0]
    if num == 0:
        return _zero_like_graph(student_feats)
    # One fused pass (forward and backward) instead of a difference, a square and a sum.
    return F.mse_loss(student_feats, teacher_feats.detach(), reduction="sum") / num


def _normalized_pairwise_distances(feats: torch.Tensor, eps: float) -> torch.Tensor:
    """
    Euclidean distance matrices of the rows of ``feats`` (B, K, D), each divided by its mean
    off-diagonal entry: (B, K, K). Uses the Gram matrix (O(K^2 + K*D) memory per image instead of
    O(K^2 * D)).
    """
    num = feats.shape[-2]
    # Distances do not change under translation; centring first reduces cancellation in
    # |a|^2 + |b|^2 - 2ab when features have a large common component.
    feats = feats - feats.mean(dim=-2, keepdim=True)
    gram = feats @ feats.transpose(-1, -2)
    # The squared norms are the Gram matrix's diagonal: no (B, K, D) square and its backward
    # (half the cost of this function, forward and backward, at K = 10 and D = 12800).
    sq_norms = torch.diagonal(gram, dim1=-2, dim2=-1)
    sq_dist = sq_norms[..., :, None] + sq_norms[..., None, :] - 2.0 * gram
    # Clamp before sqrt: d sqrt / dx is infinite at 0 (the diagonal, or identical instances).
    dist = sq_dist.clamp(min=1e-12).sqrt()
    off_diag = ~torch.eye(num, dtype=torch.bool, device=feats.device)
    dist = dist * off_diag
    mean = dist.sum(dim=(-2, -1), keepdim=True) / (num * num - num)
    # A floor, not an added eps: it keeps the normalisation exactly scale invariant.
    return dist / mean.clamp(min=eps)


@float32_loss
def gi_relation_losses(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    beta: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """
    :func:`gi_relation_loss` of B images with K instances each, in one batched pass.

    Args:
        student_feats: (B, K, ...) student instance features, K >= 2.
        teacher_feats: (B, K, ...) teacher instance features (detached here).
        beta, eps: as in :func:`gi_relation_loss`.

    Returns:
        (B,) the loss of each image; instances of different images are never compared.
    """
    if student_feats.shape[:2] != teacher_feats.shape[:2] or student_feats.shape[1] < 2:
        raise ValueError(
            f"student_feats {tuple(student_feats.shape)} and teacher_feats "
            f"{tuple(teacher_feats.shape)} must be (B, K, ...) with the same B and K >= 2"
        )
    num = student_feats.shape[1]
    d_s = _normalized_pairwise_distances(student_feats.flatten(2), eps)
    with torch.no_grad():
        d_t = _normalized_pairwise_distances(teacher_feats.detach().flatten(2).to(d_s), eps)
    # Diagonals are exactly 0 on both sides, so they add nothing to the sum.
    loss = F.smooth_l1_loss(d_s, d_t, reduction="none", beta=beta).sum(dim=(1, 2))
    return loss / (num * num - num)


def gi_relation_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    min_instances: int = 3,
    beta: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """
    GI relation loss for ONE image [paper]: pairwise Euclidean distances between the K instance
    features, each matrix divided by its own mean off-diagonal distance, then
    ``sum_{i != j} smoothL1(d_t(i, j), d_s(i, j)) / (K^2 - K)``.

    The normalisation makes the loss invariant to a global scale of either model's features.

    Args:
        student_feats: (K, D) student instance features (K, C, h, w is flattened to K, C*h*w).
        teacher_feats: (K, D) teacher instance features (detached here); D may differ from the
            student's, since only distances are compared.
        min_instances: images with fewer GIs give zero (3 [paper]).
        beta: smooth-L1 transition point. [open]; 1.0 (torch's default, as in the authors' code).
        eps: floor of the mean distance, so that identical features give a finite loss.

    Returns:
        A scalar tensor; a graph-connected zero when K < min_instances.
    """
    num = student_feats.shape[0]
    if teacher_feats.shape[0] != num:
        raise ValueError(
            f"student_feats {tuple(student_feats.shape)} and teacher_feats "
            f"{tuple(teacher_feats.shape)} must have the same number of instances"
        )
    if num < max(min_instances, 2):
        return _zero_like_graph(student_feats)
    return gi_relation_losses(student_feats[None], teacher_feats[None], beta=beta, eps=eps)[0]


@float32_loss
def gi_response_loss(
    student_cls_logits: torch.Tensor,
    teacher_cls_logits: torch.Tensor,
    student_deltas: torch.Tensor,
    teacher_deltas: torch.Tensor,
    mask: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    GI response loss ``(1/N_m) sum_i M_i [L_cls(y_t, y_s) + L_reg(r_t, r_s)]`` [paper], with
    the authors' terms [code]: BCE-with-logits of the student's logits against the teacher's sigmoid
    probabilities, and L1 on the box deltas.

    Args:
        student_cls_logits: (N, C) student class logits at N anchors / locations.
        teacher_cls_logits: (N, C) teacher class logits (detached here).
        student_deltas: (N, 4) student box deltas.
        teacher_deltas: (N, 4) teacher box deltas (detached here).
        mask: (N,) distillation mask M, bool or float (a float mask weights rows).

    Returns:
        cls_loss: BCE summed over classes and masked rows, divided by ``max(sum(M), 1)``.
            Its minimum is the teacher's binary entropy, not 0 (gradient 0 there).
        reg_loss: L1 summed over the 4 coordinates and masked rows, divided by ``max(sum(M), 1)``.
    """
    if student_cls_logits.shape != teacher_cls_logits.shape:
        raise ValueError(
            f"student_cls_logits {tuple(student_cls_logits.shape)} and teacher_cls_logits "
            f"{tuple(teacher_cls_logits.shape)} must have the same shape"
        )
    if student_deltas.shape != teacher_deltas.shape:
        raise ValueError(
            f"student_deltas {tuple(student_deltas.shape)} and teacher_deltas "
            f"{tuple(teacher_deltas.shape)} must have the same shape"
        )
    mask = _as_float_mask(mask, student_cls_logits)
    norm = mask.sum().clamp(min=1.0)
    cls = F.binary_cross_entropy_with_logits(
        student_cls_logits, torch.sigmoid(teacher_cls_logits.detach()), reduction="none"
    ).sum(dim=-1)
    reg = (student_deltas - teacher_deltas.detach()).abs().sum(dim=-1)
    return (cls * mask).sum() / norm, (reg * mask).sum() / norm


def _as_float_mask(mask: Union[torch.Tensor, bool], like: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask, device=like.device)
    if mask.dim() != 1 or mask.shape[0] != like.shape[0]:
        raise ValueError(f"mask must be (N,) with N = {like.shape[0]}, got {tuple(mask.shape)}")
    return mask.detach().to(like.dtype)
