"""Where and in what precision the models run.

* the precisions ``KD.TEACHER.DTYPE`` and ``SOLVER.AMP.DTYPE`` name, checked against the device
  (:func:`parse_dtype`);
* a teacher in half precision (:func:`set_precision`): every call of the teacher or of one of
  its modules runs under autocast of the teacher's own type, whatever the student runs in, and
  returns float32;
* RNG forks that touch the current GPU only, not every GPU of the machine (:func:`fork_rng`);
* one GPU per process: which ranks of a run share a GPU (:func:`shared_gpus`).

``MODEL.DEVICE`` itself is resolved where configs are read (:func:`kd.config.resolve_device`).
"""

import dataclasses
import socket
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Sequence

import torch
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from kd.config import ConfigError

__all__ = [
    "DTYPES",
    "parse_dtype",
    "device_type",
    "to_float32",
    "set_precision",
    "fork_rng",
    "gpu_identity",
    "shared_gpus",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_type(device: Any) -> str:
    """The autocast device type ("cuda" or "cpu") of a device or its name."""
    return torch.device(device).type


def parse_dtype(name: str, key: str, device: Any) -> torch.dtype:
    """The dtype a precision key names, refused where the device cannot run it.

    Args:
        name: the key's value ("float32", "bfloat16", "float16").
        key: the key, for messages (e.g. "KD.TEACHER.DTYPE").
        device: the models' device (``MODEL.DEVICE``).

    Raises:
        ConfigError: an unknown name, or bfloat16 on a GPU without bfloat16 support.
    """
    if name not in DTYPES:
        raise ConfigError(f"{key} must be one of {', '.join(DTYPES)}, got '{name}'")
    dtype = DTYPES[name]
    if (
        dtype == torch.bfloat16
        and device_type(device) == "cuda"
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        raise ConfigError(
            f"{key} bfloat16 but {torch.cuda.get_device_name()} has no bfloat16 support (it "
            "takes an Ampere or newer GPU): use float16"
        )
    return dtype


def to_float32(value: Any) -> Any:
    """``value`` with every half-precision floating-point tensor in it made float32.

    Goes through tensors, dicts, lists, tuples (named ones too), dataclasses and detectron2's
    ``Instances``, ``Boxes`` and ``ImageList``; anything else (and every float32, float64 or
    integer tensor) is returned as it is, not copied.
    """
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, dict):
        return type(value)((k, to_float32(v)) for k, v in value.items())
    if isinstance(value, list):
        return [to_float32(v) for v in value]
    if isinstance(value, tuple):
        items = [to_float32(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, Instances):
        out = Instances(value.image_size)
        for k, v in value.get_fields().items():
            out.set(k, to_float32(v))
        return out
    if isinstance(value, Boxes):
        return type(value)(to_float32(value.tensor))
    if isinstance(value, ImageList):
        return ImageList(to_float32(value.tensor), value.image_sizes)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_float32(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value


class _ModelAutocast:
    """Forward hooks that run every call of a model, or of any module in it, under one autocast.

    The outermost call (the first hooked module entered) enters the autocast and, when it
    returns, leaves it and casts what it returns to float32; calls nested in it only count depth,
    so the model's inside stays in the half-precision type and only its answers are cast.
    """

    def __init__(self, dtype: torch.dtype, device_type: str):
        self.dtype = dtype
        self.device_type = device_type
        self.depth = 0
        self._context = None

    def before(self, module: nn.Module, args: Any) -> None:
        if self.depth == 0:
            # float32: autocast off, so that the student's AMP does not reach the teacher.
            self._context = torch.autocast(
                self.device_type,
                dtype=self.dtype if self.dtype != torch.float32 else None,
                enabled=self.dtype != torch.float32,
            )
            self._context.__enter__()
        self.depth += 1

    def after(self, module: nn.Module, args: Any, output: Any) -> Any:
        # Also called when the forward raised (always_call): the autocast is always left.
        self.depth -= 1
        if self.depth:
            return None
        context, self._context = self._context, None
        context.__exit__(None, None, None)
        return to_float32(output) if self.dtype != torch.float32 else None


def set_precision(model: nn.Module, dtype: torch.dtype, device: Any) -> nn.Module:
    """Make every call of ``model`` and of its modules run under autocast of ``dtype``
    (float32: under no autocast, also inside the student's AMP) and return float32 (in place).

    The weights stay float32 (autocast casts them per call): a teacher checkpoint, its AP in
    float32 and the distiller's state are unchanged. Calling it again replaces the precision.

    Args:
        model: the frozen teacher.
        dtype: its precision (:func:`parse_dtype`).
        device: its device (autocast's device type).
    """
    for handle in getattr(model, "_kd_precision_hooks", ()):
        handle.remove()
    hooks = _ModelAutocast(dtype, device_type(device))
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(hooks.before))
        handles.append(module.register_forward_hook(hooks.after, always_call=True))
    object.__setattr__(model, "_kd_precision_hooks", handles)
    object.__setattr__(model, "kd_dtype", dtype)
    return model


@contextmanager
def fork_rng() -> Iterator[None]:
    """``torch.random.fork_rng`` over the CPU and the current GPU only.

    Without ``devices`` it forks every visible GPU's generator (initialising a CUDA context on
    each, and warning on machines with many GPUs); a process works on its own GPU alone.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def gpu_identity() -> str:
    """This process's GPU, the same string in every process that uses it: the host and the
    device's UUID (its index when torch gives no UUID)."""
    index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"{socket.gethostname()}/{uuid if uuid is not None else index}"


def shared_gpus(identities: Sequence[str]) -> Dict[str, List[int]]:
    """The GPUs used by more than one rank: identity -> its ranks.

    Args:
        identities: :func:`gpu_identity` of every rank, in rank order.
    """
    ranks: Dict[str, List[int]] = {}
    for rank, identity in enumerate(identities):
        ranks.setdefault(identity, []).append(rank)
    return {k: v for k, v in ranks.items() if len(v) > 1}
