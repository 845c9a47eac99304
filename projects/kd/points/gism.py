"""GISM, GID's general instance selection (Dai et al., CVPR 2021; shared/METHODS.md, section 2):
per image, the predictions where teacher and student disagree most, their boxes kept after NMS.

Functions of tensors, without gradients of their own (the selected boxes are points, not a loss),
and :class:`GeneralInstanceSelector`, the configured selection a GID distiller runs on each
family's dense scores and decoded boxes
(:class:`kd.meta_arch.gid_terms.GeneralInstanceDistillation`).
"""

from typing import Callable, List, Optional, Tuple, Union

import torch
from detectron2.structures import Boxes

from kd.losses.precision import float32_loss

__all__ = [
    "GeneralInstanceSelector",
    "BoxesAt",
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


# Decoded boxes for GISM: (N, R, 4), or a function of (N, T) indices into R returning (N, T, 4).
BoxesAt = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class GeneralInstanceSelector:
    """GISM as a distiller runs it every iteration: clipped boxes, and the selection first among
    each image's best candidates (:meth:`select`)."""

    # The best-scoring predictions of each image the selection first runs among.
    candidates = 1000

    def __init__(
        self,
        top_k: int = 10,
        nms_thresh: float = 0.3,
        score_mode: str = "max_abs_diff",
        score_thresh: float = 0.0,
        pre_nms_topk: int = 0,
    ):
        """
        Args:
            top_k: K, instances kept per image [paper: 10].
            nms_thresh: IoU threshold of the GI NMS [paper: 0.3].
            score_mode: "max_abs_diff" [paper] or "max_score_diff" [code] (:func:`gi_scores`).
            score_thresh: candidates below this GI score are dropped [open: 0].
            pre_nms_topk: best candidates kept before NMS, 0 = all [open].
        """
        self.top_k = top_k
        self.nms_thresh = nms_thresh
        self.score_mode = score_mode
        self.score_thresh = score_thresh
        self.pre_nms_topk = pre_nms_topk

    @torch.no_grad()
    def select(
        self,
        teacher_probs: torch.Tensor,
        student_probs: torch.Tensor,
        teacher_boxes: BoxesAt,
        student_boxes: BoxesAt,
        image_sizes: List[tuple],
    ) -> List[Boxes]:
        """The general instances of each image (GISM), without gradients.

        GISM keeps the first ``top_k`` survivors of a greedy NMS in GI-score order, and those
        depend only on the predictions scoring above the last of them. So the selection first runs
        on each image's ``candidates`` best-scoring predictions (in their original order, so that
        ties break as over all of them): when every image has ``top_k`` survivors there, each
        scoring above every prediction left out, they are the survivors over all predictions
        (else the selection reruns on four times as many, up to all). Only those candidates' boxes
        are decoded and compared: all R of them (61k over a BCCD RetinaNet batch) took 6-9 ms
        an iteration.

        Args:
            teacher_probs, student_probs: (N, R, C) scores at the R shared predictions.
            teacher_boxes, student_boxes: each model's decoded boxes, XYXY: (N, R, 4), or a function
                of (N, T) long indices into R that returns the (N, T, 4) boxes at those predictions.
            image_sizes: (h, w) of each image, before padding; boxes are clipped to it.

        Returns:
            N ``Boxes`` of at most ``top_k`` GI boxes each, by decreasing GI score.
        """
        r = teacher_probs.shape[1]
        num = self.candidates
        # KD.GID.PRE_NMS_TOPK counts the candidates left after dropping empty boxes, which only
        # the boxes of every prediction tell. The scores as select_general_instances_batched
        # computes them (float32 also under AMP).
        scores = (
            None
            if self.pre_nms_topk or num >= r
            else float32_loss(gi_scores)(teacher_probs, student_probs, mode=self.score_mode).float()
        )
        while scores is not None and num < r:
            best = scores.topk(num, dim=1)
            selected = self._select_at(
                best.indices.sort(dim=1).values,
                teacher_probs,
                student_probs,
                teacher_boxes,
                student_boxes,
                image_sizes,
            )
            # One comparison for the batch (a Python one per image would wait for the GPU each).
            if all(len(s) == self.top_k for _, s, _ in selected) and bool(
                (torch.stack([s[-1] for _, s, _ in selected]) > best.values[:, -1]).all()
            ):
                return [Boxes(boxes) for boxes, _, _ in selected]
            num *= 4
        selected = self._select_at(
            None, teacher_probs, student_probs, teacher_boxes, student_boxes, image_sizes
        )
        return [Boxes(boxes) for boxes, _, _ in selected]

    def _select_at(
        self,
        index: Optional[torch.Tensor],
        teacher_probs: torch.Tensor,
        student_probs: torch.Tensor,
        teacher_boxes: BoxesAt,
        student_boxes: BoxesAt,
        image_sizes: List[tuple],
    ) -> List[tuple]:
        """:func:`select_general_instances_batched` on the (N, T) predictions ``index`` (None: all
        of them), boxes clipped to each image; its (boxes, scores, from_teacher) per image."""

        def at(x: torch.Tensor) -> torch.Tensor:
            if index is None:
                return x
            return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

        def boxes_at(boxes: BoxesAt) -> torch.Tensor:
            if not callable(boxes):
                return at(boxes)
            if index is None:
                n, r = teacher_probs.shape[:2]
                return boxes(torch.arange(r, device=teacher_probs.device).expand(n, r))
            return boxes(index)

        teacher_boxes, student_boxes = boxes_at(teacher_boxes), boxes_at(student_boxes)
        # Clip every box to its own image: (N, 1, 4) upper bounds (w, h, w, h).
        hw = torch.as_tensor(image_sizes, dtype=teacher_boxes.dtype, device=teacher_boxes.device)
        upper = hw[:, [1, 0, 1, 0]][:, None]
        t_boxes = torch.min(teacher_boxes.clamp(min=0), upper)
        s_boxes = torch.min(student_boxes.clamp(min=0), upper)
        # A GI box clipped away entirely (predicted outside the image) is dropped by the selection.
        return select_general_instances_batched(
            at(teacher_probs),
            at(student_probs),
            t_boxes,
            s_boxes,
            top_k=self.top_k,
            nms_iou=self.nms_thresh,
            score_mode=self.score_mode,
            score_threshold=self.score_thresh,
            pre_nms_top_k=self.pre_nms_topk or None,
        )
