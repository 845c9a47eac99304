"""Mixed-precision training of the student (``SOLVER.AMP``) on any device, in float16 or bfloat16.

detectron2 v0.6's ``AMPTrainer`` runs CUDA float16 only (``torch.cuda.amp.autocast()`` and a
CUDA ``GradScaler``). :class:`MixedPrecisionTrainer` is the same training step with the autocast's
device and type taken from the config: float16 with a gradient scaler (detectron2's recipe; its
state is checkpointed with the trainer's, :class:`kd.compat.TrainerStateMixin`), bfloat16 without
one (its exponent range is float32's, so gradients do not underflow). A distiller's teacher is not
under this autocast: it runs in ``KD.TEACHER.DTYPE`` (:func:`kd.device.set_precision`).
"""

import time
from typing import Any

import torch
from detectron2.engine import AMPTrainer

from kd.config import ConfigError
from kd.device import device_type, parse_dtype

__all__ = ["MixedPrecisionTrainer", "amp_dtype"]


def amp_dtype(cfg) -> torch.dtype:
    """The student's autocast type, ``SOLVER.AMP.DTYPE``, checked against ``MODEL.DEVICE``.

    Raises:
        ConfigError: not float16 or bfloat16, or a type the device cannot run.
    """
    dtype = parse_dtype(cfg.SOLVER.AMP.DTYPE, "SOLVER.AMP.DTYPE", cfg.MODEL.DEVICE)
    if dtype == torch.float32:
        raise ConfigError(
            "SOLVER.AMP.DTYPE float32 is no mixed precision: use float16 or bfloat16, or turn "
            "SOLVER.AMP.ENABLED off"
        )
    return dtype


class MixedPrecisionTrainer(AMPTrainer):
    """detectron2's ``AMPTrainer`` with the autocast's device and type as arguments."""

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Any,
        optimizer: torch.optim.Optimizer,
        *,
        dtype: torch.dtype,
        device: Any,
    ):
        """
        Args:
            model, data_loader, optimizer: as ``SimpleTrainer``'s.
            dtype: torch.float16 (with a gradient scaler) or torch.bfloat16 (without).
            device: the model's device (autocast's device type).
        """
        self.device_type = device_type(device)
        self.dtype = dtype
        scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler)

    def run_step(self):
        # AMPTrainer.run_step (v0.6) with torch.autocast(device, dtype) for its CUDA autocast.
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()

        self._write_metrics(loss_dict, data_time)

        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
