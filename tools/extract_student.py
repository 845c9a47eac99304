#!/usr/bin/env python
"""Write the student of a distillation checkpoint as a plain detectron2 checkpoint.

    python tools/extract_student.py --config-file KD_CFG --input CKPT --output OUT.pth \
        [KEY VALUE ...]

KD_CFG is the config the run used, with the same KEY VALUE overrides; the run's own
``OUTPUT_DIR/config.yaml`` (everything merged) is the safest choice.

OUT.pth loads with the student's own config in plain detectron2 (no ``kd`` import needed for
detectron2's builtin architectures and backbones) and evaluates to the same AP as the distiller in
eval mode. Next to it, OUT.yaml is the student's config (for a low-resolution student, with the
smaller test size it was trained for). A student built on what ``kd`` registers (FCOS, the DETR
family, the MobileNetV2 backbones of configs/bccd) keeps those keys, and OUT.yaml begins with a
comment saying so: load it after ``import kd`` and ``kd.add_kd_config(cfg)``.
"""

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects"))

from kd.checkpoint import (  # noqa: E402
    WeightsError,
    dump_student_config,
    export_student_config,
    load_checkpoint_file,
    student_state_dict,
)
from kd.config import load_config  # noqa: E402
from kd.weights import atomic_write  # noqa: E402


def check_fits(student_cfg, weights: dict) -> None:
    """Refuse to write a student whose weights do not fit its config (wrong config or options)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import kd  # noqa: F401  (registers the architectures kd provides)

    model = build_model(student_cfg)
    incompatible = DetectionCheckpointer(model)._load_model({"model": dict(weights)})
    if incompatible.missing_keys or incompatible.incorrect_shapes:
        bad = [k for k, *_ in incompatible.incorrect_shapes] + list(incompatible.missing_keys)
        raise SystemExit(
            f"the checkpoint's student does not fit the config ({len(bad)} weights missing or of "
            f"another shape, e.g. {', '.join(bad[:3])}). Pass the config the run used with the "
            "same KEY VALUE overrides; OUTPUT_DIR/config.yaml of the run holds all of it"
        )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, help="the KD config the run used")
    parser.add_argument("--input", required=True, help="the distiller's checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="where to write the student (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the run")
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file, args.opts)
    if not os.path.isfile(args.input):
        raise SystemExit(f"--input '{args.input}' does not exist")
    try:
        state = load_checkpoint_file(args.input)["model"]
    except WeightsError as e:
        raise SystemExit(f"--input: {e}") from None
    student = student_state_dict(state)
    dropped = sorted({k.split(".")[0] for k in state if not k.startswith("student.")})
    student_cfg = export_student_config(cfg)
    check_fits(student_cfg, student)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_write(
        args.output, lambda f: torch.save({"model": student, "__author__": "kd.extract_student"}, f)
    )
    config_path = os.path.splitext(args.output)[0] + ".yaml"
    # The config names the weights written next to it, so `--eval-only` and tools/predict.py
    # take the pair without a MODEL.WEIGHTS override.
    student_cfg.defrost()
    student_cfg.MODEL.WEIGHTS = os.path.abspath(args.output)
    student_cfg.freeze()
    atomic_write(config_path, lambda f: f.write(dump_student_config(student_cfg).encode()))
    print(f"wrote {args.output} ({len(student)} tensors; left out: {dropped or 'nothing'})")
    print(f"wrote {config_path} (the student's config)")


if __name__ == "__main__":
    from kd.launch import run_guarded

    run_guarded(main)
