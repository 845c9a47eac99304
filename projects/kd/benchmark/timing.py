"""What the cost tools share (``tools/benchmark_kd.py``, ``tools/count_syncs.py``,
``tools/gpu_check.py``): the method configs of a suite, found from the configs and the registry,
a distiller's config for timing, teacher weights to time it with, and fixed batches."""

import os
from typing import Dict, List, Optional

import torch
from detectron2.modeling import META_ARCH_REGISTRY

from kd.benchmark.suites import trained_teacher
from kd.config import load_config
from kd.engine import Trainer
from kd.experiments import ROOT
from kd.families.hf_source import is_hf_source
from kd.meta_arch.base import Distiller
from kd.teacher import build_teacher_model

__all__ = [
    "SUITES",
    "method_configs",
    "timing_config",
    "ensure_teacher_weights",
    "fixed_batches",
]

# The suites whose configs the cost tools time.
SUITES = ("kd_shapes", "bccd")


def method_configs(suite: str) -> List[str]:
    """Every method config of a suite: the YAML files directly in ``configs/<suite>`` whose
    ``MODEL.META_ARCHITECTURE`` is a registered :class:`Distiller` and whose teacher is one of
    the suite's (not a Hugging Face folder, which a checkout does not have), sorted by name.

    Args:
        suite: a folder of ``configs/`` ("kd_shapes", "bccd").

    Returns:
        Paths relative to the repository, e.g. ``configs/kd_shapes/detr_kd_detr.yaml``.
    """
    folder = os.path.join("configs", suite)
    found = []
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if not name.endswith(".yaml"):
            continue
        path = os.path.join(folder, name)
        cfg = load_config(os.path.join(ROOT, path), [])
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        is_distiller = isinstance(arch, type) and issubclass(arch, Distiller)
        if is_distiller and not is_hf_source(cfg.KD.TEACHER.CONFIG_FILE):
            found.append(path)
    return found


def timing_config(path: str, opts: List[str], device: str):
    """The distiller's config with ``opts`` and the device applied, and a learning rate of 0: the
    optimizer step is timed but moves nothing, so every timed iteration sees the same model (and
    a random teacher's losses cannot make the student diverge mid-benchmark)."""
    cfg = load_config(path, opts, file_option="--configs")
    cfg.MODEL.DEVICE = device
    cfg.SOLVER.BASE_LR = 0.0
    return cfg


def ensure_teacher_weights(cfg, tmpdir: str) -> str:
    """Make ``KD.TEACHER.WEIGHTS`` an existing file: the configured one, else the teacher the
    benchmark trains from this teacher config (:func:`kd.benchmark.suites.trained_teacher`) when
    it exists, else a randomly initialised teacher saved in ``tmpdir``.

    Args:
        cfg: the distiller's config; ``KD.TEACHER.WEIGHTS`` is changed unless it exists.
        tmpdir: where a random teacher is written.

    Returns:
        Which weights are used: "configured", "benchmark" or "random".
    """
    if os.path.isfile(cfg.KD.TEACHER.WEIGHTS):
        return "configured"
    trained: Optional[str] = trained_teacher(cfg.KD.TEACHER.CONFIG_FILE)
    if trained and os.path.isfile(os.path.join(ROOT, trained)):
        cfg.KD.TEACHER.WEIGHTS = os.path.join(ROOT, trained)
        return "benchmark"
    torch.manual_seed(0)
    teacher, _ = build_teacher_model(cfg)  # yacs or LazyConfig teacher
    path = os.path.join(tmpdir, f"random_teacher_{abs(hash(cfg.KD.TEACHER.CONFIG_FILE))}.pth")
    torch.save({"model": {k: v.cpu() for k, v in teacher.state_dict().items()}}, path)
    cfg.KD.TEACHER.WEIGHTS = path
    return "random"


def fixed_batches(cfg, count: int) -> List[List[Dict]]:
    """``count`` training batches, drawn once and reused for every phase and every model."""
    loader = iter(Trainer.build_train_loader(cfg))
    return [next(loader) for _ in range(count)]
