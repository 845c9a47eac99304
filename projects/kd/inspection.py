"""What the inspection tools share: a model as training starts it, and their command line.

``tools/loss_scale.py`` (every loss term's size) and ``tools/diagnose_gid.py`` (what GID does
per class) look at a model in training mode on its first training batches, without optimizer
steps; both build it here, the way ``train_net.py`` starts a run.
"""

import argparse
from typing import Iterator, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.utils.env import seed_all_rng
from torch import nn

from kd.checkpoint import load_weights
from kd.config import load_config
from kd.data import validate_datasets
from kd.engine import Trainer

__all__ = ["training_model", "batches_parser", "parse_batches_args"]


def training_model(
    config_file: str, opts: Sequence[str]
) -> Tuple[CfgNode, nn.Module, Iterator[List[dict]]]:
    """A config's model in training mode, as ``train_net.py`` starts it, and its training batches.

    Args:
        config_file: a detectron2 / KD config.
        opts: ``KEY VALUE`` overrides.

    Returns:
        (cfg, model, batches): the frozen config, the model initialised from ``MODEL.WEIGHTS``
        (a distiller's checkpoint or a plain one; ImageNet backbones and the teacher's weights as
        every run), and an iterator over the training loader (its augmentation, its ``SEED``).
    """
    # The teacher's AP is not what these tools measure (and costs a pass over the test set).
    cfg = load_config(config_file, [*opts, "KD.TEACHER.EVALUATE", "False"])
    cfg.freeze()
    validate_datasets(list(cfg.DATASETS.TRAIN))
    # As detectron2's default_setup: the same SEED gives the same initial model and batches.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    model = Trainer.build_model(cfg)
    load_weights(model, cfg.MODEL.WEIGHTS, complete=False)
    model.train()
    return cfg, model, iter(Trainer.build_train_loader(cfg))


def batches_parser(description: str, default_batches: int) -> argparse.ArgumentParser:
    """The inspection tools' command line: a config, ``--batches`` and ``KEY VALUE`` overrides,
    in any order (parse with :func:`parse_batches_args`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config_file")
    parser.add_argument(
        "--batches",
        type=int,
        default=default_batches,
        help=f"training batches (default {default_batches})",
    )
    parser.add_argument("opts", nargs="*", help="KEY VALUE overrides")
    return parser


def parse_batches_args(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
) -> argparse.Namespace:
    """Parse ``argv`` with a :func:`batches_parser` (intermixed: `CONFIG --batches 3 KEY VALUE`
    as the usage lines write it; a REMAINDER would take --batches for a key)."""
    args = parser.parse_intermixed_args(argv)
    if args.batches < 1:
        parser.error("--batches must be at least 1")
    return args
