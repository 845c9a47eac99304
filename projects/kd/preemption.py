"""Preemption: SIGTERM or SIGUSR1 end a run with a checkpoint after the current step.

SLURM and Kubernetes send SIGTERM some time before they kill a job (SLURM's ``--signal`` sends
SIGUSR1, or what it is told); without a handler the run dies at once and loses everything since
its last periodic checkpoint. Here the signal only sets a flag. :class:`PreemptionHook`, after
every step, asks every rank whether one of them got it (one small all-reduce over the CPU group);
when one did, all of them finish the step, make their buffers equal, gather their RNG states, the
main process saves ``model_<iteration>.pth`` and points ``last_checkpoint`` at it, and every
process exits with status 128 + the signal's number (143 for SIGTERM) after one line on stderr.
``--resume`` continues from there exactly as from a periodic checkpoint.

The process that ``train_net.py --num-gpus N`` starts the others from forwards the signals to
them (:func:`forward_signals_to_children`): a scheduler signals the process it started.
"""

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["PREEMPTION_SIGNALS", "Preempted", "PreemptionHook", "forward_signals_to_children"]

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Seconds within which a repeated signal is the same request (see PreemptionHook._handle).
_REPEAT_WINDOW_S = 5.0


class Preempted(BaseException):
    """The run stopped on a preemption signal after saving a checkpoint; ``code`` is the exit
    status. A ``BaseException``, as ``KeyboardInterrupt``: the training loop does not log it as
    a failure."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class PreemptionHook(HookBase):
    """After each step, stop every rank with a checkpoint if any of them got SIGTERM/SIGUSR1.

    Register it last, so that the step's other hooks (LR scheduler, periodic checkpoint and
    evaluation, writers) have run when it saves.
    """

    def __init__(self, before_save: Callable[[], None] = lambda: None):
        """
        Args:
            before_save: called on every rank right before the checkpoint is saved (a
                collective, e.g. gathering every rank's RNG states); may be set later as the
                attribute ``before_save``.
        """
        self.before_save = before_save
        self._received = 0
        self._received_at = 0.0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        # A signal sent to the whole process group also reaches a worker through the process
        # that forwards it (forward_signals_to_children): a repeat within seconds is the same
        # request. Asked again later: stop now, as without the handler.
        if self._received and time.monotonic() - self._received_at > _REPEAT_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self._received:
            self._received, self._received_at = signum, time.monotonic()

    def install(self) -> None:
        """Catch the signals from now on (idempotent). The trainer calls it while it is built:
        a signal that comes before the first step stops the run after that step."""
        if self._previous or not _in_main_thread():  # handlers can only be set there
            return
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def before_train(self) -> None:
        self.install()

    def after_train(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._received and self.trainer.iter + 1 >= self.trainer.max_iter:
            # It came after the last step: the final checkpoint exists, the run ends anyway.
            logger.info("Got %s after the last iteration", signal.Signals(self._received).name)

    def _agreed_signal(self) -> int:
        if comm.get_world_size() == 1:
            return self._received
        import torch.distributed as dist

        flag = torch.tensor([self._received], dtype=torch.int64)
        # The CPU (gloo) group: no host-device synchronisation on GPUs.
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=comm._get_global_gloo_group())
        return int(flag.item())

    def after_step(self) -> None:
        signum = self._agreed_signal()
        if not signum or self.trainer.iter + 1 >= self.trainer.max_iter:
            return
        trainer, iteration = self.trainer, self.trainer.iter
        self.before_save()
        name = f"model_{iteration:07d}"
        path = os.path.join(trainer.cfg.OUTPUT_DIR, f"{name}.pth")
        if comm.is_main_process():
            trainer.checkpointer.save(name, iteration=iteration)
        comm.synchronize()
        signame = signal.Signals(signum).name
        message = (
            f"stopped by {signame} after iteration {iteration}: saved {path}; continue with "
            "--resume"
        )
        logger.info(message, extra={"kd_file_only": True})  # the console gets it below
        if not comm.is_main_process():
            # Status 0: a launcher that sees a process fail ends the others at once, with a
            # message of its own; the main process's status is the run's.
            raise Preempted(message, 0)
        # Printed here, not on the way out: nothing can cut it off any more.
        print(message, file=sys.stderr, flush=True)
        raise Preempted(message, 128 + signum)


@contextmanager
def forward_signals_to_children() -> Iterator[None]:
    """While the block runs, send SIGTERM and SIGUSR1 received by this process to its
    ``multiprocessing`` children (the processes ``--num-gpus`` starts) instead of dying of them.
    """
    if not _in_main_thread():
        yield
        return

    def forward(signum: int, frame) -> None:
        children = [c for c in multiprocessing.active_children() if c.pid is not None]
        if not children:  # nobody to save: die of it, as without the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # The workers now stop by themselves, the main one with a non-zero status; torch's
        # launcher then ends the others, which are already on their way out, with a warning
        # line each. Expected here: only its errors are shown.
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
        for child in children:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    previous: Dict[int, Optional[object]] = {}
    for sig in PREEMPTION_SIGNALS:
        previous[sig] = signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
