#!/usr/bin/env python
"""Train and evaluate detectors and distillers with detectron2's trainer.

    python train_net.py --config-file CFG [--resume] [--eval-only] [--num-gpus N]
        [--num-machines M --machine-rank R --dist-url URL] [KEY VALUE ...]

Plain configs (teachers, baseline students) and KD configs (``MODEL.META_ARCHITECTURE`` a
distiller) go through the same code. Without CUDA, ``--num-gpus N`` starts N CPU processes.
Started by ``torchrun``, ``srun`` or with ``MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK`` set, it
joins the processes the launcher started instead (:mod:`kd.launch`). Whatever stops a run is one
line on stderr and a non-zero exit status; tracebacks go to ``OUTPUT_DIR/log.txt``.
"""

import json
import logging
import os
import sys
from typing import Optional

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import kd  # noqa: F401  (registers the distillers, the DETR family and the datasets)
from kd.checkpoint import KDCheckpointer, load_weights
from kd.config import ConfigError
from kd.config import load_config as kd_load_config
from kd.data import validate_datasets
from kd.engine import Trainer
from kd.launch import detect_environment, launch, setup_logging
from kd.run_dir import claim_output_dir

logger = logging.getLogger("kd.train_net")


def load_config(args) -> CfgNode:
    """The frozen config of a run: defaults, KD keys, the config file, then command-line overrides.

    Args:
        args: parsed ``default_argument_parser`` arguments.

    Raises:
        kd.config.ConfigError: a missing file, an unknown key, a value of the wrong type.
    """
    cfg = kd_load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def check_args(args) -> CfgNode:
    """What is checked once, before any process starts: the config (:func:`load_config`) and
    that ``SOLVER.IMS_PER_BATCH`` splits evenly over the run's processes.

    Args:
        args: parsed ``default_argument_parser`` arguments.

    Raises:
        kd.config.ConfigError: as :func:`load_config`, or a batch that does not split.
    """
    cfg = load_config(args)
    env = detect_environment(os.environ)
    world = env.world_size if env is not None else args.num_gpus * args.num_machines
    if not args.eval_only and cfg.SOLVER.IMS_PER_BATCH % world:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} does not split over {world} "
            f"processes: make it a multiple of {world}"
        )
    return cfg


def setup(args, cfg: Optional[CfgNode] = None) -> CfgNode:
    """The run's config, with detectron2's and the ``kd`` package's logging set up.

    Args:
        args: parsed ``default_argument_parser`` arguments.
        cfg: the config already read (default: read it from ``args``).
    """
    cfg = load_config(args) if cfg is None else cfg
    default_setup(cfg, args)
    setup_logging(cfg.OUTPUT_DIR)
    validate_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    return cfg


def save_results(cfg: CfgNode, results) -> None:
    """Write the final evaluation to ``OUTPUT_DIR/eval_results.json`` (read by the demo)."""
    if results and comm.is_main_process():
        with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=1)


def main(args):
    cfg = load_config(args)
    # One live run per OUTPUT_DIR, held before default_setup writes config.yaml into it.
    with claim_output_dir(cfg, resume=args.resume and not args.eval_only) as model_changes:
        cfg = setup(args, cfg)
        if model_changes:
            logger.warning(
                "--resume with another model than the run in %s (its config.yaml): %s; the "
                "checkpoint is loaded only if its weights still fit",
                cfg.OUTPUT_DIR,
                "; ".join(model_changes),
            )
        return _run(args, cfg)


def _run(args, cfg: CfgNode):
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = KDCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if args.resume and checkpointer.has_checkpoint():
            checkpointer.resume_or_load("", resume=True)
        else:  # every weight of the evaluated model must come from the file
            if not cfg.MODEL.WEIGHTS:
                raise ValueError(
                    "--eval-only needs weights: set MODEL.WEIGHTS to a trained checkpoint "
                    "(e.g. MODEL.WEIGHTS output/<run>/model_final.pth)"
                )
            load_weights(model, cfg.MODEL.WEIGHTS, complete=True)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        res = trainer.train()
    save_results(cfg, res)
    return res


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    # The config is read once before any process starts: a mistake in it is one line, not one
    # per process.
    sys.exit(launch(main, args, check=check_args))
