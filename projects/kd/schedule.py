"""A schedule for the distillation terms: warm-up, constant, then stop or decay.

None of the three papers schedules its KD terms; users of every KD toolkit ask for it (a student
that first learns alone for a while, or a teacher whose guidance is switched off for the last
iterations). The factor multiplies every ``loss_kd_*`` term a distiller returns, on top of the
method's own weights; the student's own losses are untouched (Chen et al.'s ``mu`` on the
student's cross entropy stays what ``KD.CHEN2017.HARD_WEIGHT`` says).

The factor is a function of the training iteration alone (detectron2's ``EventStorage.iter``,
which a resumed run restores), so a resumed run continues with exactly the factors of an
uninterrupted one.
"""

import math
from typing import Optional

from detectron2.config import CfgNode, configurable

from kd.events import training_storage

__all__ = ["KDLossSchedule", "current_iteration"]

AFTER_END = ("stop", "linear", "cosine")


class KDLossSchedule:
    """The factor of the KD terms at an iteration.

    ``w(i) = warm(i) * tail(i)`` with ``warm(i) = min(1, i / WARMUP_ITERS)`` (0 at iteration 0;
    1 without warm-up) and ``tail(i) = 1`` before ``END_ITER``; from ``END_ITER`` on, ``tail``
    is 0 ("stop"), ``(MAX_ITER - i) / (MAX_ITER - END_ITER)`` ("linear") or
    ``(1 + cos(pi * (i - END_ITER) / (MAX_ITER - END_ITER))) / 2`` ("cosine").
    The default (no warm-up, ``END_ITER`` 0) is 1 at every iteration: today's behaviour.
    """

    @configurable
    def __init__(
        self,
        *,
        warmup_iters: int = 0,
        end_iter: int = 0,
        after_end: str = "stop",
        max_iter: int = 0,
    ):
        """
        Args:
            warmup_iters: iterations over which the factor rises linearly from 0 to 1; 0: none.
            end_iter: the iteration from which the terms stop or decay; 0: never.
            after_end: "stop", "linear" or "cosine" (decay to 0 at ``max_iter``).
            max_iter: the run's last iteration + 1 (``SOLVER.MAX_ITER``); needed by a decay.
        """
        if warmup_iters < 0 or end_iter < 0:
            raise ValueError(
                f"KD.LOSS_SCHEDULE: WARMUP_ITERS ({warmup_iters}) and END_ITER ({end_iter}) must "
                "be >= 0 (0 switches each off)"
            )
        if after_end not in AFTER_END:
            raise ValueError(
                f"KD.LOSS_SCHEDULE.AFTER_END must be one of {AFTER_END}, got {after_end!r}"
            )
        if end_iter and after_end != "stop" and end_iter >= max_iter:
            raise ValueError(
                f"KD.LOSS_SCHEDULE.END_ITER ({end_iter}) must be below SOLVER.MAX_ITER "
                f"({max_iter}) for a {after_end} decay (it ends at MAX_ITER)"
            )
        if end_iter and warmup_iters > end_iter:
            raise ValueError(
                f"KD.LOSS_SCHEDULE.WARMUP_ITERS ({warmup_iters}) ends after END_ITER ({end_iter})"
            )
        self.warmup_iters = warmup_iters
        self.end_iter = end_iter
        self.after_end = after_end
        self.max_iter = max_iter

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        s = cfg.KD.LOSS_SCHEDULE
        return {
            "warmup_iters": s.WARMUP_ITERS,
            "end_iter": s.END_ITER,
            "after_end": s.AFTER_END,
            "max_iter": cfg.SOLVER.MAX_ITER,
        }

    @property
    def constant(self) -> bool:
        """True when the factor is 1 at every iteration (nothing to apply)."""
        return self.warmup_iters == 0 and self.end_iter == 0

    def __call__(self, iteration: int) -> float:
        """The factor at ``iteration`` (0-based, as detectron2 counts)."""
        warm = min(1.0, iteration / self.warmup_iters) if self.warmup_iters else 1.0
        if not self.end_iter or iteration < self.end_iter:
            return warm
        if self.after_end == "stop":
            return 0.0
        t = min(1.0, (iteration - self.end_iter) / (self.max_iter - self.end_iter))
        tail = 1.0 - t if self.after_end == "linear" else (1.0 + math.cos(math.pi * t)) / 2
        return warm * tail

    def __repr__(self) -> str:
        return (
            f"KDLossSchedule(warmup_iters={self.warmup_iters}, end_iter={self.end_iter}, "
            f"after_end={self.after_end!r}, max_iter={self.max_iter})"
        )


def current_iteration() -> Optional[int]:
    """The trainer's iteration (detectron2's current ``EventStorage``), None outside training."""
    storage = training_storage()
    return None if storage is None else storage.iter
