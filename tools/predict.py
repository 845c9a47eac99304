#!/usr/bin/env python
"""Run a detector on images and draw its detections with detectron2's ``Visualizer``.

    python tools/predict.py --config-file student.yaml --weights student.pth \\
        --input IMAGE_OR_FOLDER [IMAGE_OR_FOLDER ...] --output DIR \\
        [--score-threshold 0.5] [--class-names NAME ...] [KEY VALUE ...]

The model is any detectron2 config with its weights: a student written by
``tools/extract_student.py`` (``student.yaml`` + ``student.pth``), a plain run's
``OUTPUT_DIR/config.yaml`` + ``model_final.pth``, or a KD config with a distillation checkpoint,
in which case the student alone is built and run (the teacher is not needed). ``--weights``
defaults to ``MODEL.WEIGHTS``; every weight of the model must come from the file (read through
``kd.checkpoint.load_weights``, no code in it runs).

Each image is read with detectron2's ``read_image`` in the config's ``INPUT.FORMAT``, resized as
``DefaultPredictor`` does (``ResizeShortestEdge`` to ``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``), and its detections scoring at least ``--score-threshold`` are drawn with
``Visualizer.draw_instance_predictions`` into ``DIR/<image name>.png`` (the input's size). The
model's own test thresholds (e.g. ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``) apply first; lower them
with ``KEY VALUE`` options to see more. Class names come from the metadata of the config's
``DATASETS.TEST[0]`` when that dataset is registered, else from ``--class-names``
(which also overrides the metadata), else the class numbers are shown.

``DIR/detections.json`` lists the same detections, COCO style:
``[{"image_id", "file_name", "category_id", "bbox": [x, y, w, h], "score"}]``, with ``image_id``
the image's position in the run (from 1) and ``category_id`` the dataset's own id when the
metadata maps it (as ``COCOEvaluator`` writes), else the model's class index.

Bad input: a missing ``--input`` path, a folder without images or unusable weights stop the tool
before any work with one line saying what to fix. An image that cannot be read is skipped: it is
named on stderr, the others are still drawn and written, and the tool ends with the number
skipped and exit status 1.

Example, on the demo's distilled student (``make demo`` writes it)::

    python tools/predict.py --config-file output/demo/chen2017/config.yaml \\
        --weights output/demo/chen2017/model_final.pth \\
        --input datasets/kd_shapes/val --output output/demo/predictions/chen2017
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects"))

from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.data.detection_utils import convert_image_to_rgb, read_image  # noqa: E402
from detectron2.evaluation.coco_evaluation import instances_to_coco_json  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY, build_model  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

import kd  # noqa: E402,F401  (registers the distillers, the DETR family and the datasets)
from kd.checkpoint import WeightsError, export_student_config, load_weights  # noqa: E402
from kd.config import ConfigError, load_config  # noqa: E402
from kd.meta_arch.base import Distiller  # noqa: E402

__all__ = ["setup_cfg", "list_images", "Predictor", "dataset_metadata", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class InputError(Exception):
    """Bad input for the tool; the message says what to fix."""


def setup_cfg(config_file: str, opts: Sequence[str]) -> Tuple[CfgNode, bool]:
    """The plain detector config to run, and whether it is the student of a KD config.

    Args:
        config_file: a detector config, or a KD config (``MODEL.META_ARCHITECTURE`` a distiller).
        opts: ``KEY VALUE`` overrides, applied before a KD config is reduced to its student.
    """
    try:
        cfg = load_config(config_file, opts)
    except ConfigError as e:
        raise InputError(str(e)) from None
    try:
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    except KeyError as e:  # the registry's: names the registered ones
        raise InputError(f"{config_file}: MODEL.META_ARCHITECTURE: {e.args[0]}") from None
    is_distiller = isinstance(arch, type) and issubclass(arch, Distiller)
    if is_distiller:
        # The same student config tools/extract_student.py writes (input scale folded in).
        cfg = export_student_config(cfg)
    cfg.freeze()
    return cfg, is_distiller


def list_images(inputs: Sequence[str]) -> List[str]:
    """The image files named by ``inputs``: files as given, folders' images (by extension)
    sorted by name, not recursing.

    Raises:
        InputError: a path does not exist, or nothing is left to read.
    """
    images = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(path, name))
            )
            if not found:
                raise InputError(
                    f"--input folder '{path}' holds no images "
                    f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
                )
            images += found
        elif os.path.isfile(path):
            images.append(path)
        else:
            raise InputError(f"--input '{path}' does not exist")
    return images


def output_names(images: Sequence[str]) -> List[str]:
    """``<image name>.png`` for each image; refuses two inputs that would write the same file."""
    names = [os.path.splitext(os.path.basename(p))[0] + ".png" for p in images]
    seen: Dict[str, str] = {}
    for path, name in zip(images, names):
        if name in seen:
            raise InputError(
                f"'{seen[name]}' and '{path}' would both be drawn to {name}: "
                "run them into different --output folders"
            )
        seen[name] = path
    return names


def dataset_metadata(cfg: CfgNode, class_names: Optional[Sequence[str]]) -> Metadata:
    """What the pictures are labelled with and how classes map to category ids: the metadata
    of ``DATASETS.TEST[0]`` when registered (its annotations are loaded once if needed, as
    ``register_coco_instances`` datasets set their metadata on loading), with ``--class-names``
    in place of its class names when given.
    """
    metadata = Metadata(name="predict")
    name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    if name is not None and name in DatasetCatalog.list():
        registered = MetadataCatalog.get(name)
        if not hasattr(registered, "thing_classes"):
            try:
                DatasetCatalog.get(name)
            except Exception as e:  # the metadata are a convenience: draw numbers instead
                print(
                    f"[predict] no class names: dataset '{name}' could not be loaded "
                    f"({type(e).__name__}: {e}); pass --class-names",
                    file=sys.stderr,
                )
        metadata = registered
    if class_names is not None:
        fields = {k: v for k, v in metadata.as_dict().items() if k != "name"}
        fields.pop("thing_colors", None)  # those belong to the dataset's classes
        fields["thing_classes"] = list(class_names)
        metadata = Metadata(name="predict", **fields)
    return metadata


class Predictor:
    """``DefaultPredictor``'s steps with weights read through ``kd.checkpoint.load_weights``.

    Args:
        cfg: a plain detector config.
        weights: the weights file; every weight of the model must come from it.
    """

    def __init__(self, cfg: CfgNode, weights: str):
        self.cfg = cfg
        self.model = build_model(cfg)
        self.model.eval()
        load_weights(self.model, weights, complete=True, key="--weights")
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )

    def __call__(self, image: np.ndarray) -> Instances:
        """The detections for one (H, W, C) image in ``cfg.INPUT.FORMAT``, on the CPU, in the
        image's own coordinates."""
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            output = self.model([{"image": tensor, "height": height, "width": width}])[0]
        return output["instances"].to("cpu")


def to_coco(instances: Instances, image_id: int, file_name: str, metadata: Metadata) -> List[dict]:
    """COCO-style records of one image's detections, with the dataset's category ids."""
    records = instances_to_coco_json(instances, image_id)
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    reverse = {v: k for k, v in mapping.items()} if mapping else None
    for r in records:
        r["file_name"] = file_name
        if reverse is not None:
            r["category_id"] = reverse[r["category_id"]]
    return records


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, help="detector or KD config")
    parser.add_argument("--weights", default=None, help="weights file (default: MODEL.WEIGHTS)")
    parser.add_argument(
        "--input", required=True, nargs="+", help="image files and/or folders of images"
    )
    parser.add_argument("--output", required=True, help="folder for the pictures and JSON")
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="lowest score drawn and written"
    )
    parser.add_argument(
        "--class-names", nargs="+", default=None, help="class names, in the model's class order"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Tuple[int, int]:
    """Draw and write every image; returns (images written, images skipped)."""
    if not 0.0 <= args.score_threshold <= 1.0:
        raise InputError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    images = list_images(args.input)
    names = output_names(images)
    cfg, is_distiller = setup_cfg(args.config_file, args.opts)
    weights = args.weights if args.weights is not None else cfg.MODEL.WEIGHTS
    if not weights:
        raise InputError("no weights: pass --weights FILE (MODEL.WEIGHTS is empty)")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' but no CUDA device is available: "
            "add 'MODEL.DEVICE cpu' to the command"
        )
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise InputError(f"INPUT.FORMAT '{cfg.INPUT.FORMAT}' is not RGB or BGR")
    predictor = Predictor(cfg, weights)
    metadata = dataset_metadata(cfg, args.class_names)
    classes = getattr(metadata, "thing_classes", None)
    if is_distiller:
        print(f"[predict] {args.config_file} is a KD config: running its student")
    os.makedirs(args.output, exist_ok=True)
    records, skipped = [], []
    for image_id, (path, name) in enumerate(zip(images, names), start=1):
        try:
            image = read_image(path, format=cfg.INPUT.FORMAT)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable files
            skipped.append(path)
            print(f"[predict] skipped '{path}': not a readable image ({e})", file=sys.stderr)
            continue
        instances = predictor(image)
        instances = instances[instances.scores >= args.score_threshold]
        if (
            classes is not None
            and len(instances)
            and int(instances.pred_classes.max()) >= len(classes)
        ):
            raise InputError(
                f"the model predicts class {int(instances.pred_classes.max())} but only "
                f"{len(classes)} class names are known: pass one name per class (--class-names)"
            )
        records += to_coco(instances, image_id, path, metadata)
        rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        picture = Visualizer(rgb, metadata).draw_instance_predictions(instances)
        picture.save(os.path.join(args.output, name))
        print(f"[predict] {path}: {len(instances)} detections -> {os.path.join(args.output, name)}")
    json_path = os.path.join(args.output, "detections.json")
    with open(json_path, "w") as f:
        json.dump(records, f)
    written = len(images) - len(skipped)
    print(f"[predict] wrote {written} pictures and {json_path} ({len(records)} detections)")
    return written, len(skipped)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        written, skipped = run(args)
    except (InputError, WeightsError) as e:
        raise SystemExit(f"predict.py: error: {e}") from None
    if skipped:
        raise SystemExit(
            f"predict.py: error: {skipped} of {written + skipped} images could not be read "
            "(named above) and were skipped"
        )


if __name__ == "__main__":
    main()
