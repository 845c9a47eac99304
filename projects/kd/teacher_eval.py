"""The teacher's AP before the first step: measured, logged, cached, and gated.

A teacher whose weights load can still answer badly: trained on other data or classes, fed BGR
when it learnt RGB, normalised with another pixel mean/std. Such a teacher distils noise, and
nothing in the losses says so. Before a KD run trains, :class:`TeacherEvalHook` runs the teacher
alone over ``DATASETS.TEST[0]`` exactly as the distiller feeds it (this run's test images, in the
teacher's channel order, at full resolution), with detectron2's COCO evaluation; logs its AP as
``teacher/bbox/*`` at the run's first iteration (``metrics.json``, TensorBoard) and in the log;
and stops the run when the AP is below ``KD.TEACHER.MIN_AP``.

The result is cached in ``OUTPUT_DIR/teacher_eval.json``, keyed by the weights file (path and
sha256 of its content), the teacher's config (path and sha256) and overrides, the dataset and
this run's test input settings, so a resumed run reads it instead of evaluating again. An AP that
COCOEvaluator cannot define (NaN: the teacher predicted no box) counts as 0 for the gate.
"""

import json
import logging
import os
import random
from contextlib import contextmanager
from typing import Any, Dict, Optional

import numpy as np
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.evaluation import inference_on_dataset
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd.device import fork_rng
from kd.families.hf_source import is_hf_source, weights_file
from kd.meta_arch.base import Distiller
from kd.teacher import TeacherError, load_teacher_config
from kd.weights import atomic_write, file_sha256

__all__ = ["TeacherEvalHook", "CACHE_FILE", "teacher_weights_file"]

logger = logging.getLogger(__name__)

CACHE_FILE = "teacher_eval.json"


class _TeacherAsDistilled(nn.Module):
    """The distiller's frozen teacher, fed each batch as the distiller feeds it in training."""

    def __init__(self, distiller: nn.Module):
        super().__init__()
        # Not a submodule: inference_on_dataset's eval()/train() toggling must not reach the
        # student (the teacher is eval-locked anyway).
        object.__setattr__(self, "distiller", distiller)

    def forward(self, batched_inputs):
        outputs = self.distiller.teacher(self.distiller.teacher_inputs(batched_inputs))
        class_map = getattr(self.distiller, "class_map", None)
        if class_map is None:
            return outputs
        # A class-mapped teacher (KD.TEACHER.CLASS_MAP) is scored on the mapped classes, as the
        # student's classes: its other classes' detections are dropped.
        mapped = []
        for out in outputs:
            instances = out["instances"]
            student = class_map.teacher_to_student(instances.pred_classes.device)
            classes = student[instances.pred_classes]
            instances = instances[classes >= 0]
            instances.pred_classes = classes[classes >= 0]
            mapped.append(dict(out, instances=instances))
        return mapped


@contextmanager
def _rng_kept():
    # Creating the test loader's iterator draws a seed from the global torch RNG: without this, a
    # run with the teacher evaluated would train on other random numbers than one without.
    py, np_state = random.getstate(), np.random.get_state()
    with fork_rng():
        yield
    random.setstate(py)
    np.random.set_state(np_state)


def teacher_weights_file(cfg) -> str:
    """The local file the teacher's weights are read from: ``KD.TEACHER.WEIGHTS`` (fetched when a
    URL), or a Hugging Face teacher's weights in its folder; '' when there is none.

    Args:
        cfg: the KD config.
    """
    t = cfg.KD.TEACHER
    weights = PathManager.get_local_path(t.WEIGHTS) if "://" in t.WEIGHTS else t.WEIGHTS
    if not weights and is_hf_source(t.CONFIG_FILE):
        weights = weights_file(t.CONFIG_FILE) or ""
    return weights


def _cache_key(cfg, dataset: str) -> Dict[str, Any]:
    t = cfg.KD.TEACHER
    weights = teacher_weights_file(cfg)
    config = t.CONFIG_FILE
    local_config = os.path.isfile(config)
    # By content: cp -p, rsync -a and tar keep another file's size and modification time.
    key = {
        "weights": os.path.abspath(weights),
        "weights_sha256": file_sha256(weights),
        "config_file": os.path.abspath(config) if local_config else config,
        "config_sha256": file_sha256(config) if local_config else None,
        "opts": [str(o) for o in t.OPTS],
        "dataset": dataset,
        "input": {
            "format": cfg.INPUT.FORMAT,
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        },
    }
    if t.CLASS_MAP:
        key["class_map"] = [str(c) for c in t.CLASS_MAP]
    return key


def _read_cache(path: str, key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("key") == key:
            return entry.get("results")
    return None


def _write_cache(path: str, key: Dict[str, Any], results: Dict[str, Any]) -> None:
    try:
        with open(path) as f:
            entries = json.load(f)
        entries = [e for e in entries if isinstance(e, dict) and e.get("key") != key]
    except (OSError, ValueError, TypeError):
        entries = []
    entries.append({"key": key, "results": results})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(entries, indent=1).encode()))


def _plain(results) -> Dict[str, Dict[str, float]]:
    return {task: {k: float(v) for k, v in res.items()} for task, res in results.items()}


class TeacherEvalHook(HookBase):
    """Measures (or reads back) a distiller's teacher's AP before training and gates on it.

    :meth:`evaluate` runs from ``Trainer.train`` before any hook, so that a refused teacher stops
    the run before a hook has done anything (detectron2 calls every hook's ``after_train`` even
    when training fails, which would save a checkpoint of the untrained student);
    :meth:`before_train` puts the result into the run's ``EventStorage``.
    """

    def __init__(self):
        self._results: Optional[Dict[str, Dict[str, float]]] = None

    def evaluate(self, trainer) -> Optional[Dict[str, Dict[str, float]]]:
        """Measure or read back the teacher's AP, log it, and refuse a teacher below MIN_AP.

        Args:
            trainer: the :class:`kd.engine.Trainer` about to train; its ``build_test_loader``
                and ``build_evaluator`` are used.

        Returns:
            The evaluation results (``{"bbox": {"AP": ..}}``), or None when not evaluated.

        Raises:
            TeacherError: the teacher's AP is below ``KD.TEACHER.MIN_AP``.
        """
        cfg = trainer.cfg
        model = trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, Distiller) or not cfg.KD.TEACHER.EVALUATE:
            return None
        if not cfg.DATASETS.TEST:
            logger.info("Teacher AP not measured: DATASETS.TEST is empty")
            return None
        dataset = cfg.DATASETS.TEST[0]
        logger.info("Teacher (%s) on %s before training", cfg.KD.TEACHER.WEIGHTS, dataset)
        results, cached = self._measure(
            trainer, model, cfg, dataset, os.path.join(cfg.OUTPUT_DIR, "inference", "teacher")
        )
        box = results.get("bbox", {})
        logger.info(
            "Teacher AP on %s%s: %s",
            dataset,
            f" (cached in {os.path.join(cfg.OUTPUT_DIR, CACHE_FILE)})" if cached else "",
            ", ".join(f"{k} {box[k]:.2f}" for k in ("AP", "AP50", "AP75") if k in box) or "none",
        )
        self._results = results
        self._gate(cfg, dataset, box.get("AP"))
        own = self._own_input_results(trainer, model, dataset)
        if own is not None:
            self._results = {**results, **{f"own_input/{k}": v for k, v in own.items()}}
            self._compare(cfg, dataset, box.get("AP"), own.get("bbox", {}).get("AP"))
        return results

    @staticmethod
    def _measure(
        trainer, model, cfg, dataset: str, folder: str, own_input: bool = False
    ) -> "tuple[dict, bool]":
        """The teacher's results on ``dataset`` fed as ``cfg`` says, and whether they came from
        the cache (``OUTPUT_DIR/teacher_eval.json``; the evaluation at the teacher's own size,
        ``own_input``, is marked so in its key); evaluation output under ``folder``."""
        key = _cache_key(cfg, dataset)
        if own_input:
            key["own_input"] = True
        cache = os.path.join(cfg.OUTPUT_DIR, CACHE_FILE)
        # Every process takes the main process's answer, so all of them evaluate or none does,
        # and all stop together.
        cached = comm.all_gather(_read_cache(cache, key) if comm.is_main_process() else None)[0]
        if cached is not None:
            return cached, True
        with _rng_kept():
            results = inference_on_dataset(
                _TeacherAsDistilled(model),
                trainer.build_test_loader(cfg, dataset),
                trainer.build_evaluator(cfg, dataset, os.path.join(folder, dataset)),
            )
        results = comm.all_gather(_plain(results) if comm.is_main_process() else None)[0]
        if comm.is_main_process():
            _write_cache(cache, key, results)
        return results, False

    def _own_input_results(self, trainer, model, dataset: str):
        """The teacher's results at its own test size when the run feeds it another one (its
        yacs config's INPUT.MIN/MAX_SIZE_TEST; None for other teachers, the same size, or
        ``KD.TEACHER.INPUT_AP_GAP`` 0)."""
        cfg = trainer.cfg
        if cfg.KD.TEACHER.INPUT_AP_GAP <= 0:
            return None
        if is_hf_source(cfg.KD.TEACHER.CONFIG_FILE):
            return None  # its processor's own size is not a detectron2 test size
        tcfg = load_teacher_config(cfg)
        if not isinstance(tcfg, CfgNode):
            return None  # a LazyConfig: its test mapper's augmentations say its size
        own = (tcfg.INPUT.MIN_SIZE_TEST, tcfg.INPUT.MAX_SIZE_TEST)
        if own == (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST):
            return None
        ocfg = cfg.clone()
        ocfg.defrost()
        ocfg.INPUT.MIN_SIZE_TEST, ocfg.INPUT.MAX_SIZE_TEST = own
        ocfg.freeze()
        logger.info("Evaluating the teacher at its own test size (%s, max %s) too", own[0], own[1])
        folder = os.path.join(cfg.OUTPUT_DIR, "inference", "teacher_own_input")
        return self._measure(trainer, model, ocfg, dataset, folder, own_input=True)[0]

    @staticmethod
    def _compare(cfg, dataset: str, ap: Optional[float], own_ap: Optional[float]) -> None:
        if ap is None or own_ap is None or not np.isfinite(own_ap):
            return
        ap = 0.0 if np.isnan(ap) else ap
        gap = cfg.KD.TEACHER.INPUT_AP_GAP
        logger.info(
            "Teacher AP on %s at its own test size: %.2f (at this run's: %.2f)", dataset, own_ap, ap
        )
        if own_ap - ap > gap:
            logger.warning(
                "The teacher answers badly at the input this run feeds it: %.2f AP on %s at this "
                "run's test size (INPUT.MIN_SIZE_TEST %s, MAX_SIZE_TEST %s) against %.2f at its "
                "own, more than KD.TEACHER.INPUT_AP_GAP %g below: it would distil its mistakes "
                "at that size. Train the teacher at the student's input (e.g. "
                "configs/bccd/*_teacher_student_input.yaml), or use a method that feeds the "
                "teacher its own input (Chen et al. 2017, KD-DETR, the heterogeneous distillers)",
                ap,
                dataset,
                cfg.INPUT.MIN_SIZE_TEST,
                cfg.INPUT.MAX_SIZE_TEST,
                own_ap,
                gap,
            )

    @staticmethod
    def _gate(cfg, dataset: str, ap: Optional[float]) -> None:
        min_ap = cfg.KD.TEACHER.MIN_AP
        if ap is None or min_ap <= 0:
            return
        if np.isnan(ap):
            # COCOEvaluator's answer when the teacher predicted no box at all: it scores 0.
            logger.warning(
                "The teacher's AP on %s is undefined (no predictions, or no ground truth): "
                "counted as 0",
                dataset,
            )
            ap = 0.0
        if ap < min_ap:
            raise TeacherError(
                f"the teacher's box AP on {dataset} is {ap:.2f}, below KD.TEACHER.MIN_AP "
                f"{min_ap:g}: distilling from it would teach noise. Likely causes: it was "
                f"trained on other data, or other classes or class order, than {dataset}; its "
                "input format is wrong (it is fed in its config's INPUT.FORMAT, or a "
                "LazyConfig's dataloader.train.mapper.image_format: BGR and RGB swapped?); its "
                "pixel mean/std (MODEL.PIXEL_MEAN/PIXEL_STD, model.pixel_mean/std) are not the "
                "ones it was trained with; or it is barely trained. Check it alone with "
                "train_net.py --eval-only on its own config and weights; KD.TEACHER.MIN_AP 0 "
                "distils from it anyway"
            )

    def before_train(self) -> None:
        if self._results:
            flat = flatten_results_dict(self._results)
            self.trainer.storage.put_scalars(
                **{f"teacher/{k}": v for k, v in flat.items()}, smoothing_hint=False
            )
