"""The class spaces of the two detector families, and the maps between them.

* An R-CNN box head (and a softmax DETR) classifies with a **softmax over K + 1** classes,
  background last (detectron2's convention).
* A focal-loss DETR (DAB / Deformable / DINO) and dense detectors use **K independent sigmoids**,
  no background.

Heterogeneous distillation compares a teacher of one kind with a student of the other, so the
teacher's answer is first mapped into the student's space; the losses then work in one space.
Pure functions of tensors, no gradient assumptions: callers pass detached teacher tensors.

softmax -> sigmoid (exact, no choice): ``p_k = softmax_k`` for ``k < K``, the probability that
the box is an object of class k; the background column is dropped (it is ``1 - sum_k p_k``).

sigmoid -> softmax (a choice; ``background``): the sigmoids need not sum to 1, so a background
probability ``b`` is defined first and the foreground mass ``1 - b`` is shared among the classes
in proportion to their sigmoids, ``q_k = (1 - b) p_k / sum_j p_j``, ``q_bg = b``:

* ``"max"`` (default): ``b = 1 - max_k p_k``. The foreground mass is exactly the DETR's detection
  score (its inference ranks (query, class) pairs by ``p_k``), and the top class keeps roughly
  its sigmoid, so a confident DETR answer stays as confident in the softmax.
* ``"prod"``: ``b = prod_k (1 - p_k)``, the probability that no class fires if the sigmoids were
  independent events. With many classes, small per-class leaks add up to a large foreground mass
  on background boxes (7 classes at 0.05 each: ``1 - b = 0.30``; ``"max"`` gives 0.05).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKGROUND_MODES",
    "CLASS_SPACES",
    "softmax_to_sigmoid_probs",
    "sigmoid_to_softmax_probs",
    "softmax_logits_of",
    "sigmoid_logits_of",
    "convert_class_logits",
]

BACKGROUND_MODES = ("max", "prod")
CLASS_SPACES = ("softmax", "sigmoid")


def softmax_to_sigmoid_probs(logits: Tensor) -> Tensor:
    """Per-class probabilities of a softmax classifier with background last.

    Args:
        logits: (..., K + 1) softmax logits, background last.

    Returns:
        (..., K) ``p_k = softmax(logits)_k``; each in [0, 1], their sum ``1 - p_bg`` <= 1.
    """
    if logits.shape[-1] < 2:
        raise ValueError(f"softmax logits need K + 1 >= 2 columns, got {tuple(logits.shape)}")
    return logits.softmax(dim=-1)[..., :-1]


def sigmoid_to_softmax_probs(logits: Tensor, background: str = "max") -> Tensor:
    """A (K + 1)-way distribution, background last, from K per-class sigmoid logits.

    Args:
        logits: (..., K) sigmoid logits.
        background: how the background probability is defined, "max" (``1 - max_k p_k``) or
            "prod" (``prod_k (1 - p_k)``); see the module docstring.

    Returns:
        (..., K + 1) non-negative, summing to 1 over the last dimension.
    """
    if background not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}")
    probs = logits.sigmoid()
    if background == "max":
        bg = 1.0 - probs.max(dim=-1, keepdim=True).values
    else:
        # prod_k (1 - p_k) = exp(sum_k log sigmoid(-z_k)): no underflow of the product.
        bg = F.logsigmoid(-logits).sum(dim=-1, keepdim=True).exp()
    total = probs.sum(dim=-1, keepdim=True)
    # All sigmoids underflowing to 0 gives a foreground mass of 0 as well: q = (0, ..., 0, 1).
    fg = (1.0 - bg) * probs / total.clamp(min=torch.finfo(probs.dtype).tiny)
    return torch.cat([fg, bg], dim=-1)


def softmax_logits_of(probs: Tensor, eps: float = 1e-8) -> Tensor:
    """Logits whose softmax is ``probs`` (their logs, floored at ``eps``).

    Args:
        probs: (..., C) a distribution over the last dimension.
        eps: floor before the log, so that an exact 0 gives a large negative logit, not -inf.
    """
    return probs.clamp(min=eps).log()


def sigmoid_logits_of(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """Logits whose sigmoids are ``probs``, clamped to ``[eps, 1 - eps]`` first (|z| <= 13.8).

    Args:
        probs: (...) probabilities.
        eps: clamp margin; keeps the logits finite for probabilities of exactly 0 or 1.
    """
    return torch.logit(probs.clamp(min=eps, max=1.0 - eps))


def convert_class_logits(
    logits: Tensor, source: str, target: str, background: Optional[str] = "max"
) -> Tensor:
    """Class logits of one space as logits of another (identity when the spaces agree).

    Args:
        logits: (..., C) logits in the ``source`` space (C = K + 1 for "softmax", K for "sigmoid").
        source: "softmax" (background last) or "sigmoid".
        target: "softmax" or "sigmoid".
        background: the sigmoid -> softmax background mode, see :func:`sigmoid_to_softmax_probs`.

    Returns:
        (..., C') logits in the ``target`` space: ``softmax`` of them (K + 1 columns), or
        ``sigmoid`` of them (K columns), is the mapped distribution.
    """
    for name, space in (("source", source), ("target", target)):
        if space not in CLASS_SPACES:
            raise ValueError(f"{name} must be one of {CLASS_SPACES}, got {space!r}")
    if source == target:
        return logits
    if source == "softmax":
        return sigmoid_logits_of(softmax_to_sigmoid_probs(logits))
    return softmax_logits_of(sigmoid_to_softmax_probs(logits, background))
