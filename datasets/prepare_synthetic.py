#!/usr/bin/env python
"""Generate the synthetic kd_shapes benchmark (or another seed/size of it) in COCO format.

Writes ``ROOT/NAME/annotations/instances_{train,val}.json`` and the PNG images under
``ROOT/NAME/{train,val}/``; with ``DETECTRON2_DATASETS=ROOT`` importing ``kd`` registers them as
``NAME_train`` / ``NAME_val``. See datasets/README.md for what the images contain.

Example:
    python datasets/prepare_synthetic.py --root datasets --name kd_shapes --seed 0 \\
        --num-train 2000 --num-val 500
"""

import argparse
import os
import sys
from typing import List, Optional

try:
    from kd.data.synthetic import DEFAULT_IMAGE_SIZE, DEFAULT_NAME, generate_dataset
except ImportError:
    # Run with an interpreter whose path lacks projects/ (the project's .venv adds it).
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects"))
    from kd.data.synthetic import DEFAULT_IMAGE_SIZE, DEFAULT_NAME, generate_dataset


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line options.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
        help="datasets folder (default: $DETECTRON2_DATASETS, else ./datasets)",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="dataset folder name")
    parser.add_argument("--seed", type=int, default=0, help="base seed (non-negative)")
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--num-val", type=int, default=500, help="validation images")
    parser.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="side of the square images"
    )
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    if args.num_train < 0 or args.num_val < 0:
        parser.error("--num-train and --num-val must be non-negative")
    if args.image_size < 32:
        parser.error("--image-size must be at least 32")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    """Generate the dataset described by the command line.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.
    """
    args = parse_args(argv)
    generate_dataset(
        args.root,
        args.name,
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
    )
    root = os.path.abspath(args.root)
    print(
        f"Done. Registered on `import kd` as {args.name}_train / {args.name}_val when "
        f"DETECTRON2_DATASETS={root} (or, for ./datasets, when run from its parent folder)."
    )


if __name__ == "__main__":
    main()
