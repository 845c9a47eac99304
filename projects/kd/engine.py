"""The trainer: detectron2's ``DefaultTrainer`` with what a KD run needs on top.

* optimizer: SGD (detectron2's) or AdamW, a backbone LR multiplier, and full-model gradient
  clipping (DETR family);
* a training sampler whose position is checkpointed, and the RNG states saved with it, so that an
  interrupted run resumed from its last checkpoint continues with the same batches
  (exactly, on one process with ``DATALOADER.NUM_WORKERS 0``): :mod:`kd.resume_state`;
* pretrained weights (``MODEL.WEIGHTS``: a detectron2 checkpoint or an ImageNet ``.pkl``) loaded
  into the *student* of a distiller (:func:`kd.checkpoint.load_weights`), checkpoints written
  atomically and resumed from the newest one that loads (:class:`kd.weights.KDCheckpointer`);
* DDP without CUDA (gloo), and COCO evaluation that works without the compiled extension;
* the same buffers (BatchNorm statistics) on every rank wherever the model is saved or evaluated
  (:class:`EqualBuffersHook`);
* a diverging loss stops with what to try (:class:`TrainingDivergedError`), and whatever else
  stops the loop says at which iteration (``kd_iteration``, read by :mod:`kd.launch`).
"""

import itertools
import logging
import os
import re
import weakref
from typing import Any, Dict, Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, SimpleTrainer, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.solver import get_default_optimizer_params
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd import compat
from kd.amp import MixedPrecisionTrainer, amp_dtype
from kd.checkpoint import KDCheckpointer, load_weights
from kd.data.validation import validate_test_datasets, validate_test_dicts, validate_train_dicts
from kd.preemption import PreemptionHook
from kd.resume_state import ResumableTrainingSampler, TrainingStateHook
from kd.teacher_eval import TeacherEvalHook, teacher_weights_file
from kd.weights import file_sha256

__all__ = [
    "Trainer",
    "TrainingDivergedError",
    "EqualBuffersHook",
    "equalize_buffers",
    "ResumableTrainingSampler",
    "TrainingStateHook",
    "build_optimizer",
]

logger = logging.getLogger(__name__)


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters, with the backbone LR multiplier and clipping.

    Args:
        cfg: config with ``SOLVER.{OPTIMIZER, BACKBONE_MULTIPLIER, CLIP_GRADIENTS, ...}``.
        model: the model (a distiller's frozen teacher is not among its parameters).
    """
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    if cfg.SOLVER.BACKBONE_MULTIPLIER != 1.0:
        backbone = {id(p) for n, p in model.named_parameters() if ".backbone." in f".{n}"}
        for group in params:
            if any(id(p) in backbone for p in group["params"]):
                group["lr"] = group.get("lr", cfg.SOLVER.BASE_LR) * cfg.SOLVER.BACKBONE_MULTIPLIER
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        cls, kwargs = torch.optim.SGD, dict(
            momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV
        )
    elif name == "ADAMW":
        cls, kwargs = torch.optim.AdamW, {}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'SGD' or 'ADAMW', got '{cfg.SOLVER.OPTIMIZER}'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        cls = _with_full_model_clipping(cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    elif clip.ENABLED:
        from detectron2.solver.build import maybe_add_gradient_clipping

        cls = maybe_add_gradient_clipping(cfg, cls)
    return cls(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)


def _with_full_model_clipping(cls: type, max_norm: float, norm_type: float) -> type:
    class FullModelClipping(cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipping.__name__ = f"{cls.__name__}WithFullModelClipping"
    return FullModelClipping


class Trainer(compat.TrainerStateMixin, DefaultTrainer):
    """``DefaultTrainer`` for plain detectors (teachers, baselines) and distillers alike."""

    def __init__(self, cfg: CfgNode):
        # Same as DefaultTrainer.__init__, except DDP is created so that it also works on CPU.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # A missing evaluation image stops the run now, not at its first evaluation.
        validate_test_datasets(cfg)
        self._sampler = getattr(data_loader, "kd_sampler", None)
        # SIGTERM/SIGUSR1 from here on stop the run after a step, with a checkpoint; set before
        # the ranks meet in DDP's constructor, so that every rank has it once any trains.
        self._preemption = PreemptionHook()
        self._preemption.install()
        model = _create_ddp_model(model)
        if cfg.SOLVER.AMP.ENABLED:  # float16 or bfloat16, on CUDA or the CPU (kd/amp.py)
            self._trainer = MixedPrecisionTrainer(
                model, data_loader, optimizer, dtype=amp_dtype(cfg), device=cfg.MODEL.DEVICE
            )
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = KDCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = super().build_hooks()
        # Before the checkpointer, so its state is part of every checkpoint.
        state = TrainingStateHook(
            self._sampler,
            self.cfg.SOLVER.IMS_PER_BATCH,
            self.cfg.SOLVER.CHECKPOINT_PERIOD,
            teacher_sha256=_teacher_sha256(self.cfg, self.model),
            allow_teacher_change=self.cfg.KD.TEACHER.ALLOW_CHANGE,
        )
        ret.insert(1, state)
        # Right before the checkpointer (rank 0 only) and the evaluation: what is saved and what
        # is evaluated are the same buffers on every rank.
        users = [
            i
            for i, h in enumerate(ret)
            if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
        ]
        ret.insert(
            users[0] if users else len(ret),
            EqualBuffersHook(
                self.model, self.cfg.SOLVER.CHECKPOINT_PERIOD, self.cfg.TEST.EVAL_PERIOD
            ),
        )
        # A distiller's teacher's AP (KD.TEACHER.EVALUATE), measured by train() below.
        self._teacher_eval = TeacherEvalHook()
        ret.append(self._teacher_eval)

        # Each rank's own BatchNorm statistics, not their average, saved on preemption: the run
        # continues as if never stopped (the checkpoint's model holds the main process's).
        self._preemption.before_save = lambda: state.gather(buffers=True)
        # Last: the step's other hooks have run when a preemption signal saves a checkpoint.
        ret.append(self._preemption)
        return ret

    def train(self):
        """Train; returns the final evaluation results (detectron2 v0.6 returns them only when
        ``TEST.EXPECTED_RESULTS`` is set).

        Raises:
            TrainingDivergedError: the loss became infinite or NaN.
            Exception: anything else the loop raised, with ``kd_iteration`` set to the
                iteration it stopped at (its traceback is in the log already).
            kd.teacher.TeacherError: the teacher's AP is below KD.TEACHER.MIN_AP.
        """
        # Before any hook runs: a refused teacher leaves no checkpoint or evaluation behind.
        self._teacher_eval.evaluate(self)
        try:
            super().train()
        except FloatingPointError as e:  # detectron2's checks of the losses and the proposals
            raise TrainingDivergedError(self._divergence_message(e)) from e
        except Exception as e:
            e.kd_iteration = self.iter
            raise
        return getattr(self, "_last_eval_results", None) if comm.is_main_process() else None

    def after_train(self):
        try:
            super().after_train()
        except Exception:
            # detectron2 logs with its traceback what the loop raises, not what the hooks'
            # after_train raise (the final evaluation); kd.launch counts on either being logged.
            logger.exception("Exception after training:")
            raise

    def _divergence_message(self, error: FloatingPointError) -> str:
        """What diverged, where, what to try, and which checkpoint is still good."""
        cfg, iteration = self.cfg, self.iter
        if "Loss became infinite or NaN" in str(error):
            terms = re.findall(r"'(\w+)': (?:nan|inf|-inf)\b", str(error))
            what = "the loss became infinite or NaN" + (f" ({', '.join(terms)})" if terms else "")
        elif "Predicted boxes or scores contain Inf/NaN" in str(error):  # the RPN's check
            what = "the predicted boxes or scores became infinite or NaN"
        else:
            what = str(error).splitlines()[0].rstrip(".!")
        clip = cfg.SOLVER.CLIP_GRADIENTS
        text = (
            f"training diverged at iteration {iteration}: {what}"
            + f". Lower SOLVER.BASE_LR (now {cfg.SOLVER.BASE_LR}), lengthen "
            f"SOLVER.WARMUP_ITERS (now {cfg.SOLVER.WARMUP_ITERS})"
            + (
                f" or clip gradients harder (SOLVER.CLIP_GRADIENTS.CLIP_VALUE, now "
                f"{clip.CLIP_VALUE})"
                if clip.ENABLED
                else " or clip gradients (SOLVER.CLIP_GRADIENTS.ENABLED True, CLIP_VALUE)"
            )
            + ". "
        )
        last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""
        if not last or not os.path.isfile(last):
            return text + "No checkpoint had been written."
        # NaN and inf stay in weights once there: finite weights now mean finite checkpoints.
        finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        saved_at = re.search(r"model_(\d+)\.pth$", last)
        if finite or (saved_at and int(saved_at.group(1)) < iteration - 1):
            return text + f"The last checkpoint, {last}, holds finite weights and is kept."
        return text + (
            f"The weights became infinite or NaN at iteration {iteration - 1}, so {last} may "
            f"hold them; the checkpoints before it in {cfg.OUTPUT_DIR} are kept."
        )

    def resume_or_load(self, resume: bool = True) -> None:
        if resume and self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load("", resume=True)
            self.start_iter = self.iter + 1
        else:
            if resume:
                logger.warning(
                    "--resume: no checkpoint in %s, starting from iteration 0%s",
                    os.path.abspath(self.cfg.OUTPUT_DIR),
                    (
                        f" with MODEL.WEIGHTS {self.cfg.MODEL.WEIGHTS}"
                        if self.cfg.MODEL.WEIGHTS
                        else ""
                    ),
                )
            load_weights(self.model, self.cfg.MODEL.WEIGHTS, complete=False)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        # Every image and box, before the sampler: nothing bad is met mid-run.
        dataset = validate_train_dicts(cfg, dataset)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            return build_detection_train_loader(cfg, dataset=dataset)
        sampler = ResumableTrainingSampler(len(dataset))
        loader = build_detection_train_loader(
            dataset,
            mapper=DatasetMapper(cfg, True),
            sampler=sampler,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )
        loader.kd_sampler = sampler
        _give_loaders_own_generators(loader, sampler._seed)
        return loader

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        # detectron2's, with the dicts checked before inference starts.
        proposal_files = None
        if cfg.MODEL.LOAD_PROPOSALS:
            index = list(cfg.DATASETS.TEST).index(dataset_name)
            proposal_files = [cfg.DATASETS.PROPOSAL_FILES_TEST[index]]
        dataset = get_detection_dataset_dicts(
            [dataset_name], filter_empty=False, proposal_files=proposal_files
        )
        return build_detection_test_loader(
            validate_test_dicts(cfg, dataset, dataset_name),
            mapper=DatasetMapper(cfg, False),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        import os

        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return compat.build_coco_evaluator(dataset_name, output_dir=output_folder)


def _give_loaders_own_generators(loader, seed: int) -> None:
    """Stop the train loader from drawing its worker seed from the global torch RNG.

    With aspect-ratio grouping detectron2 nests a second DataLoader whose iterator, created on the
    first batch, draws a seed from the global RNG: on resume that draw would come after the
    restored RNG state and shift every later random number. A generator of their own, seeded from
    the sampler's seed (the same on every rank) and the rank, keeps both runs on the same stream
    and gives each rank's workers their own random augmentations.
    """
    rank = comm.get_rank()
    # The loader is a DataLoader, or (with grouping) an AspectRatioGroupedDataset over one.
    candidates = (loader, getattr(loader, "dataset", None))
    for i, dl in enumerate(candidates):
        if isinstance(dl, torch.utils.data.DataLoader):
            dl.generator = torch.Generator().manual_seed(_worker_seed(seed, rank, i))


def _worker_seed(seed: int, rank: int, index: int) -> int:
    """A 63-bit seed for rank ``rank``'s ``index``-th loader, distinct across ranks."""
    return int(np.random.SeedSequence([seed, rank, index]).generate_state(2, np.uint64)[0] >> 1)


def _teacher_sha256(cfg: CfgNode, model: nn.Module) -> str:
    """The sha256 of a distiller's teacher weights file (a Hugging Face teacher's in its folder;
    '' for a plain detector)."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    if not hasattr(module, "teacher"):
        return ""
    weights = teacher_weights_file(cfg)
    return file_sha256(weights) if weights else ""


def _create_ddp_model(model: nn.Module) -> nn.Module:
    if comm.get_world_size() == 1:
        return model
    # The current device, not the local rank: a launcher that gives each process one GPU of its
    # own (SLURM --gpus-per-task=1) shows it as device 0 whatever the local rank.
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    # No buffer broadcast at every forward (detectron2's choice): EqualBuffersHook makes the
    # buffers equal where they are used, at checkpoints and evaluations.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class TrainingDivergedError(FloatingPointError):
    """The loss became infinite or NaN; the message says where, what to try and what is kept."""


def equalize_buffers(model: nn.Module) -> None:
    """Make ``model``'s buffers the same on every rank: BatchNorm running statistics averaged
    over the ranks, every other buffer copied from rank 0. Call on every rank (collective).

    Averaging the running means and variances (as timm's ``distribute_bn``) estimates them from
    every rank's images, not rank 0's alone; the mean of the per-rank variances leaves out the
    spread of the per-rank means, as SyncBN-free training does anyway.

    Args:
        model: the model, DDP-wrapped or not. A distiller's frozen teacher is not among its
            buffers (not a registered submodule) and is the same on every rank anyway.
    """
    world = comm.get_world_size()
    if world == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    module = model.module if isinstance(model, DistributedDataParallel) else model
    stats = [
        t
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for t in (m.running_mean, m.running_var)
        if t is not None
    ]

    def by_kind(tensors):
        groups: Dict[Any, list] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        return groups.values()

    with torch.no_grad():
        for group in by_kind(stats):
            flat = _flatten_dense_tensors(group)
            dist.all_reduce(flat)
            flat /= world
            for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(v)
        # Rank 0's copy of everything (the averages included): equal to the last bit.
        for group in by_kind(list(module.buffers())):
            flat = _flatten_dense_tensors(group)
            dist.broadcast(flat, src=0)
            for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(v)


class EqualBuffersHook(hooks.HookBase):
    """Calls :func:`equalize_buffers` after each iteration whose model is saved or evaluated.

    DDP runs with ``broadcast_buffers=False`` and plain BatchNorm keeps per-rank running
    statistics, so without it the ranks' buffers drift apart: the checkpoint holds rank 0's and
    the distributed evaluation scores each rank's share of the images with that rank's own.
    Turning ``broadcast_buffers`` on instead would cost a broadcast at every forward and keep
    rank 0's statistics only; this costs two collectives per checkpoint or evaluation.
    """

    def __init__(self, model: nn.Module, checkpoint_period: int, eval_period: int):
        """
        Args:
            model: the trained model (DDP-wrapped or not).
            checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD`` (detectron2's PeriodicCheckpointer
                saves after iterations ``i`` with ``(i + 1) % period == 0``, and the last).
            eval_period: ``TEST.EVAL_PERIOD`` (EvalHook's period; 0: at the end only).
        """
        self._model = model
        self._checkpoint_period = checkpoint_period
        self._eval_period = eval_period

    def after_step(self):
        done = self.trainer.iter + 1
        if (
            done >= self.trainer.max_iter
            or done % self._checkpoint_period == 0
            or (self._eval_period > 0 and done % self._eval_period == 0)
        ):
            equalize_buffers(self._model)
