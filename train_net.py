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
import os
import sys

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import kd  # noqa: F401  (registers the distillers, the DETR family and the datasets)
from kd.checkpoint import KDCheckpointer, load_weights
from kd.config import load_config as kd_load_config
from kd.data import validate_datasets
from kd.engine import Trainer
from kd.launch import launch, setup_logging


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


def setup(args) -> CfgNode:
    """The run's config, with detectron2's and the ``kd`` package's logging set up.

    Args:
        args: parsed ``default_argument_parser`` arguments.
    """
    cfg = load_config(args)
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
    cfg = setup(args)
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
    sys.exit(launch(main, args, check=load_config))
