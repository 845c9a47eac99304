"""General Instance Distillation, Dai et al., CVPR 2021 (shared/METHODS.md, section 2).

Pure functions of tensors: the feature, relation and response losses at the general instances
(GISM, which selects them, is a point sampler: :mod:`kd.points.gism`). Teacher inputs are
detached inside; the student inputs keep their graph. Everything is per image: the losses'
callers must never pool instances across images (that would turn the relation loss into a
cross-image relation the paper does not define).
"""

from typing import Tuple, Union

import torch
import torch.nn.functional as F

from .precision import float32_loss

__all__ = [
    "gi_feature_loss",
    "gi_relation_loss",
    "gi_relation_losses",
    "gi_response_loss",
]


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    # A 0-dim zero that is still connected to the student's graph, so that the loss dict has the
    # same entries and DDP sees the same used parameters whether or not an image had instances.
    return t.sum() * 0.0


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
