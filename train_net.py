#!/usr/bin/env python
"""Train and evaluate detectors and distillers with detectron2's trainer.

    python train_net.py --config-file CFG [--resume] [--eval-only] [--num-gpus N]
        [--num-machines M --machine-rank R --dist-url URL] [KEY VALUE ...]

Plain configs (teachers, baseline students) and KD configs (``MODEL.META_ARCHITECTURE`` a
distiller) go through the same code. Without CUDA, ``--num-gpus N`` starts N CPU processes.
"""

import json
import logging
import os

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import kd  # noqa: F401  (registers the distillers, the DETR family and the datasets)
from kd.checkpoint import KDCheckpointer, load_weights
from kd.compat import launch
from kd.config import add_kd_config
from kd.data import validate_datasets
from kd.engine import Trainer

logger = logging.getLogger("kd")


def setup(args) -> CfgNode:
    """The frozen config of a run: defaults, KD keys, the config file, then command-line overrides.

    Args:
        args: parsed ``default_argument_parser`` arguments.
    """
    if not os.path.isfile(args.config_file):
        raise SystemExit(f"--config-file '{args.config_file}' does not exist")
    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
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


def _main_guarded(args):
    # Bad input (a wrong teacher, an unregistered dataset, ...) ends the run with its message,
    # not a traceback.
    from kd.teacher import TeacherError

    try:
        return main(args)
    except (TeacherError, FileNotFoundError, KeyError, ValueError) as e:
        if isinstance(e, KeyError) and "is not registered" not in str(e):
            raise
        logger.error("%s", e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        _main_guarded,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
