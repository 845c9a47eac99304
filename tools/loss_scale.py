#!/usr/bin/env python
"""Every loss term of a config on its first training batches, before any step: how to size a weight.

    python tools/loss_scale.py CONFIG.yaml [--batches 3] [KEY VALUE ...]

The model is built and initialised as ``train_net.py`` would start it (``MODEL.WEIGHTS``, the
teacher's ``KD.TEACHER.WEIGHTS``, ImageNet backbones), put in training mode, and run on the
first ``--batches`` batches of ``DATASETS.TRAIN`` (the training loader, with its augmentation and
``SEED``) without gradients or optimizer steps. For each term it prints the mean, lowest and
highest value as the training loop would log it (weights applied), then the sums of the model's
own losses and of the distillation terms (``loss_kd_*``).

A distillation weight the paper leaves to the data (e.g. GID's lambda_1 on features of another
scale) is sized from the training data, not from validation AP: run with the weight at 1 and set
it so that the term starts near the model's own losses. ``configs/bccd/faster_rcnn_kd_gid.yaml``
was sized this way.

Bad input (a missing file, an unknown key, unusable weights, an unregistered dataset) stops the
tool with one line, as ``train_net.py`` does.
"""

import argparse
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))


def loss_values(config_file: str, opts: Sequence[str], batches: int) -> Dict[str, List[float]]:
    """Each loss term's value on each of the first ``batches`` training batches.

    Args:
        config_file: a detectron2 / KD config.
        opts: ``KEY VALUE`` overrides.
        batches: how many training batches.

    Returns:
        ``{loss name: [value per batch]}``, in the order the model returns them.
    """
    import torch
    from detectron2.utils.events import EventStorage

    from kd.inspection import training_model

    _, model, loader = training_model(config_file, opts)
    values: Dict[str, List[float]] = {}
    with EventStorage(0), torch.no_grad():
        for _ in range(batches):
            for name, value in model(next(loader)).items():
                values.setdefault(name, []).append(float(value))
    return values


def format_report(values: Dict[str, List[float]]) -> str:
    """The table: one row per term (mean, lowest, highest), then the two sums' means.

    Args:
        values: ``{loss name: [value per batch]}``.
    """
    width = max([len(k) for k in values] + [len("distillation (loss_kd_*)")])
    lines = [f"{'term':<{width}}  {'mean':>11}  {'lowest':>11}  {'highest':>11}"]
    for name, v in values.items():
        lines.append(f"{name:<{width}}  {statistics.mean(v):11.4g}  {min(v):11.4g}  {max(v):11.4g}")
    own = [statistics.mean(v) for k, v in values.items() if not k.startswith("loss_kd_")]
    kd = [statistics.mean(v) for k, v in values.items() if k.startswith("loss_kd_")]
    lines.append(f"{'model (sum)':<{width}}  {sum(own):11.4g}")
    if kd:
        lines.append(f"{'distillation (loss_kd_*)':<{width}}  {sum(kd):11.4g}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line: the config, ``--batches`` and ``KEY VALUE`` overrides in any order."""
    from kd.inspection import batches_parser, parse_batches_args

    return parse_batches_args(batches_parser(__doc__.split("\n\n")[0], 3), argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    print(format_report(loss_values(args.config_file, args.opts, args.batches)))


if __name__ == "__main__":
    from kd.launch import run_guarded

    run_guarded(main)
