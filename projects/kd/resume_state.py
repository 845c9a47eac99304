"""What a run saves beside the model so that a resumed run continues as the uninterrupted one
would have: the training sampler's position (a global count of images, whatever the world size),
every rank's RNG states and, at a preemption, every rank's BatchNorm statistics; and the teacher
the run was trained with (its weights' sha256), so that a resume with another teacher stops."""

import itertools
import logging
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import hooks
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd.teacher import TeacherError

__all__ = ["ResumableTrainingSampler", "TrainingStateHook"]

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's infinite ``TrainingSampler`` that can start ``start`` indices into its stream.

    The stream itself is unchanged (same seed, same shuffles), so skipping the indices an
    interrupted run consumed continues it exactly. ``start`` counts the indices of the whole
    stream, consumed by every process together: rank ``r`` of ``N`` takes its indices
    ``start + r, start + r + N, ...``, so a run resumed with another number of processes
    continues where the stream stopped.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None):
        """
        Args:
            size, shuffle, seed: as ``TrainingSampler``.
        """
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(
            self._infinite_indices(), self.start + self._rank, None, self._world_size
        )


def _rng_state() -> Dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA RNG states, as a checkpoint holds them."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
        # The process's own GPU only: resumed where fewer GPUs are visible, a list of every
        # visible GPU's state would not fit.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or (isinstance(cuda, list) and not cuda) or not torch.cuda.is_available():
        return
    if isinstance(cuda, list):  # checkpoints before: every visible GPU's, restored where they fit
        for device, device_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)
    else:
        torch.cuda.set_rng_state(cuda)


class TrainingStateHook(hooks.HookBase):
    """Checkpoints what detectron2 does not: every rank's RNG states and the sampler's position.

    Its ``state_dict`` is saved by the checkpointer (on the main process) with the trainer's
    state, after the iteration that just finished, and loaded on ``--resume`` by every rank
    before training starts. The RNG states of all ranks are gathered (a collective) after each
    iteration that is checkpointed; each rank restores its own.

    The sampler's position is stored as the number of images the whole run consumed, with the
    world size, so that a run resumed with another number of processes continues the same data
    stream (:class:`ResumableTrainingSampler`).
    """

    def __init__(
        self,
        sampler: Optional[ResumableTrainingSampler],
        images_per_batch: int,
        checkpoint_period: int = 0,
        teacher_sha256: str = "",
        allow_teacher_change: bool = False,
    ):
        """
        Args:
            sampler: the training loader's sampler (None: position not tracked).
            images_per_batch: images all processes together consume per iteration
                (``SOLVER.IMS_PER_BATCH``).
            checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD``: the RNG states of every rank are
                gathered after the iterations detectron2's PeriodicCheckpointer saves (and the
                last); 0: after every iteration.
            teacher_sha256: the content hash of a distiller's teacher weights ('' for none),
                stored so that a resume with another teacher is noticed.
            allow_teacher_change: ``KD.TEACHER.ALLOW_CHANGE``: resume with another teacher.
        """
        self._sampler = sampler
        self._images_per_batch = images_per_batch
        self._checkpoint_period = checkpoint_period
        self._teacher_sha256 = teacher_sha256
        self._allow_teacher_change = allow_teacher_change
        self._gathered: Optional[list] = None
        self._buffers: Optional[list] = None

    def gather(self, buffers: bool = False) -> None:
        """Collect every rank's RNG states for the next ``state_dict`` (call on every rank).

        Args:
            buffers: also every rank's BatchNorm statistics, for a checkpoint saved at an
                iteration where they were not made equal (a preemption's): each rank resumes
                with its own, as the run would have continued.
        """
        self._gathered = comm.all_gather(_rng_state())
        self._buffers = comm.all_gather(_norm_buffers(self.trainer.model)) if buffers else None

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        period = self._checkpoint_period
        if done >= self.trainer.max_iter or period <= 0 or done % period == 0:
            self.gather()
        else:
            self._gathered = self._buffers = None

    def state_dict(self) -> Dict[str, Any]:
        rng = self._gathered if self._gathered is not None else [_rng_state()]
        return {
            # trainer.iter counts from the start of the run, resumed or not.
            "consumed_images": (self.trainer.iter + 1) * self._images_per_batch,
            "world_size": comm.get_world_size(),
            "sampler_seed": getattr(self._sampler, "_seed", None),
            "rng": rng,
            "teacher_sha256": self._teacher_sha256,
            "rank_buffers": self._buffers,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved_teacher = state.get("teacher_sha256", "")
        if saved_teacher and self._teacher_sha256 and saved_teacher != self._teacher_sha256:
            if not self._allow_teacher_change:
                raise TeacherError(
                    f"--resume with another teacher: KD.TEACHER.WEIGHTS (sha256 "
                    f"{self._teacher_sha256[:12]}) is not the file this run was trained with "
                    f"(sha256 {saved_teacher[:12]}). Resume with the run's teacher, or set "
                    "KD.TEACHER.ALLOW_CHANGE True to continue with this one"
                )
            logger.warning(
                "Resuming with another teacher (sha256 %s, was %s): KD.TEACHER.ALLOW_CHANGE",
                self._teacher_sha256[:12],
                saved_teacher[:12],
            )
        rank, world = comm.get_rank(), comm.get_world_size()
        if "consumed_images" in state:
            consumed = state["consumed_images"]
        else:  # checkpoints before the global count: per rank, saved with this world size
            consumed = state["consumed_indices"] * world
        if self._sampler is not None:
            seed = state.get("sampler_seed")
            if seed is not None:
                self._sampler._seed = int(seed)
            self._sampler.start = consumed
        if "rng" not in state:  # checkpoints before per-rank states: rank 0's on every rank
            _set_rng_state({k[len("rng_") :]: v for k, v in state.items() if k.startswith("rng_")})
            return
        saved = state["rng"]
        if rank < len(saved):
            _set_rng_state(saved[rank])
        buffers = state.get("rank_buffers")
        if buffers and rank < len(buffers):
            _load_norm_buffers(self.trainer.model, buffers[rank])
        if len(saved) != world and comm.is_main_process():
            logger.warning(
                "Resumed with %d process(es), saved with %d: %s",
                world,
                len(saved),
                (
                    f"ranks {len(saved)}-{world - 1} start from their seeded RNG states (no "
                    "saved state of theirs)"
                    if world > len(saved)
                    else f"the RNG states of ranks {world}-{len(saved) - 1} are not used"
                )
                + "; the data stream continues where it stopped",
            )


def _norm_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The BatchNorm statistics of ``model`` (DDP-wrapped or not), on the CPU."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return {
        f"{name}.{b}": t.detach().cpu().clone()
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b, t in m.named_buffers(recurse=False)
    }


def _load_norm_buffers(model: nn.Module, buffers: Dict[str, torch.Tensor]) -> None:
    module = model.module if isinstance(model, DistributedDataParallel) else model
    own = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)


def _numpy_state_to_tensors(state: tuple) -> tuple:
    # torch.load(weights_only=True), the default since torch 2.6, refuses numpy arrays.
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached


def _numpy_state_from_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached
