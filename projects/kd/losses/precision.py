"""Distillation losses are computed in float32, also under mixed precision (AMP)."""

import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["float32_loss"]

_HALF = (torch.float16, torch.bfloat16)
F = TypeVar("F", bound=Callable[..., Any])


def _upcast(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _HALF:
        return value.float()
    return value


def _device_type(args, kwargs) -> str:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def float32_loss(fn: F) -> F:
    """Run a loss function in float32: half-precision tensor arguments are upcast, autocast is off.

    Under AMP the models' outputs are float16 (CUDA) or bfloat16 (CPU). The distillation losses
    sum many squared feature differences (hint and GID feature losses reach thousands on features
    trained from scratch, beyond float16's 65504 on COCO-sized maps) and compare probabilities
    through logs and softmaxes, so they are computed in float32 as detectron2 computes its own
    losses. The casts are differentiable: the student's gradients flow back in its own precision.
    float64 arguments (tests) are left as they are.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast(_device_type(args, kwargs), enabled=False):
            args = tuple(_upcast(a) for a in args)
            kwargs = {k: _upcast(v) for k, v in kwargs.items()}
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
