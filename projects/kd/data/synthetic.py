"""Synthetic COCO-format detection benchmark: textured shapes on cluttered backgrounds.

Each image shows 1-8 objects of seven classes (:data:`CLASSES`) on a textured background, with
unannotated clutter (irregular blobs, bars, cut-off pieces of class shapes) drawn in between. The
classes differ in shape, colour family and texture, but no single cue decides the class: colour
families overlap between neighbouring classes and 10% of objects take an arbitrary hue; 30% of
objects draw their texture at random instead of their class's; small objects show no texture at
all. Object diameters range from 6 px to 60% of the image (log-uniform, skewed towards large). At
128 px about 70% of the objects fall in COCO's "small" range (area < 32^2) and the rest in
"medium"; COCO's "large" (area > 96^2) needs images of about 200 px or more.

Annotation conventions (what a user of the data should know):

* ``bbox`` is the object's full (amodal) extent, also where later objects or clutter cover part
  of it. COCO's own boxes are modal; amodal boxes are used here because they are a function of the
  object alone, so a box target never jumps when an occluder moves.
* An object whose visible part is below :data:`MIN_VISIBLE_FRACTION` of its area is left out of
  the annotations but stays in the image, where it acts as clutter. Its occluders are annotated
  as usual.
* ``area`` is the object's full rendered area in pixels (anti-aliased coverage, holes excluded),
  which is what COCOeval uses for its small/medium/large split. ``visibility`` (extra key, ignored
  by detectron2) is the visible fraction of that area.
* Objects lie fully inside the image; clutter may cross the border; every image has at least one
  annotated object.

Generation is deterministic: every image draws from its own ``numpy.random.Generator`` seeded with
``(seed, split, index)``, so the same arguments give byte-identical files, and an image does not
depend on how many others are generated.
"""

import json
import os
import re
import time
from typing import Any, Dict

import numpy as np
from PIL import Image

from kd.data.shapes import (
    CLASSES,
    DEFAULT_IMAGE_SIZE,
    MIN_VISIBLE_FRACTION,
    ShapeClass,
    render_image,
)

__all__ = [
    "CLASSES",
    "DEFAULT_NAME",
    "DEFAULT_IMAGE_SIZE",
    "MIN_VISIBLE_FRACTION",
    "ShapeClass",
    "generate_dataset",
    "generate_split",
    "render_image",
]

DEFAULT_NAME = "kd_shapes"
# Bump when the rendering changes, so that folders made by different versions can be told apart.
GENERATOR_VERSION = 1
# zlib level 1: noisy images barely compress further, and encoding at 6 costs most of the run time.
PNG_COMPRESS_LEVEL = 1
_SPLIT_CODES = {"train": 0, "val": 1}
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))
    )


def generate_split(
    out_dir: str,
    split: str,
    *,
    seed: int,
    num_images: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    name: str = DEFAULT_NAME,
    verbose: bool = True,
    progress_every: int = 250,
) -> Dict[str, Any]:
    """Write one split: images in ``out_dir/SPLIT/``, ``out_dir/annotations/instances_SPLIT.json``.

    The annotation file is written last (atomically), so an interrupted run never leaves a file
    that names missing images. Stale ``NNNNNN.png`` files of a larger earlier run are removed.

    Args:
        out_dir: the dataset folder (``ROOT/NAME``).
        split: "train" or "val"; seeds the images together with ``seed``.
        seed: base seed (non-negative).
        num_images: how many images to draw.
        image_size: side of the square images in pixels.
        name: dataset name, recorded in the file's ``info``.
        verbose: print a progress line every ``progress_every`` images.
        progress_every: see ``verbose``.

    Returns:
        Summary statistics of the split.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    image_dir = os.path.join(out_dir, split)
    ann_dir = os.path.join(out_dir, "annotations")
    json_path = os.path.join(ann_dir, f"instances_{split}.json")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    # Removed first: until the new file exists, the split is absent rather than inconsistent.
    if os.path.exists(json_path):
        os.remove(json_path)

    start = time.perf_counter()
    images, annotations = [], []
    per_class = [0] * len(CLASSES)
    area_ranges = {"small": 0, "medium": 0, "large": 0}
    dropped_total = 0
    for index in range(num_images):
        pixels, anns, dropped = render_image(_image_rng(seed, split, index), image_size)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(
            os.path.join(image_dir, file_name), format="PNG", compress_level=PNG_COMPRESS_LEVEL
        )
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for ann in anns:
            per_class[ann["class_index"]] += 1
            area = ann["area"]
            area_ranges["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ann["class_index"] + 1,
                    "bbox": [round(float(x), 2) for x in ann["bbox"]],
                    "area": round(area, 2),
                    "iscrowd": 0,
                    "visibility": round(ann["visibility"], 3),
                }
            )
        dropped_total += dropped
        if verbose and (index + 1) % progress_every == 0 and index + 1 < num_images:
            elapsed = time.perf_counter() - start
            print(f"[{name}/{split}] {index + 1}/{num_images} images ({elapsed:.1f} s)", flush=True)

    keep = {image["file_name"] for image in images}
    for stale in os.listdir(image_dir):
        if _IMAGE_NAME.match(stale) and stale not in keep:
            os.remove(os.path.join(image_dir, stale))

    coco = {
        "info": {
            "description": f"{name}: synthetic shapes detection benchmark ({split})",
            "generator": "kd.data.synthetic",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "split": split,
            "image_size": image_size,
            "bbox": "amodal (full extent, also when partly occluded)",
            "min_visible_fraction": MIN_VISIBLE_FRACTION,
        },
        "licenses": [],
        "categories": [
            {"id": i + 1, "name": cls.name, "supercategory": "shape"}
            for i, cls in enumerate(CLASSES)
        ],
        "images": images,
        "annotations": annotations,
    }
    tmp_path = json_path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    os.replace(tmp_path, json_path)
    return {
        "split": split,
        "images": num_images,
        "annotations": len(annotations),
        "dropped_occluded": dropped_total,
        "per_class": {cls.name: n for cls, n in zip(CLASSES, per_class)},
        "areas": area_ranges,
        "seconds": time.perf_counter() - start,
        "json_file": json_path,
    }


def generate_dataset(
    root: str,
    name: str = DEFAULT_NAME,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int = DEFAULT_IMAGE_SIZE,
    verbose: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Write the dataset ``root/name`` in the folder convention that :mod:`kd.data` registers.

    Train and val use different seeds derived from ``seed``. A split with zero images is not
    written (an existing one is left as it is).

    Args:
        root: the datasets folder (what ``$DETECTRON2_DATASETS`` points at).
        name: dataset folder name; registered as ``name_train`` / ``name_val``.
        seed: base seed (non-negative); the same arguments give byte-identical files.
        num_train: number of training images.
        num_val: number of validation images.
        image_size: side of the square images in pixels (at least 32).
        verbose: print progress and a summary.

    Returns:
        Per split, the summary statistics of :func:`generate_split`.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be non-negative, got {num_train}, {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 px, got {image_size}")
    out_dir = os.path.join(root, name)
    summaries = {}
    for split, count in (("train", num_train), ("val", num_val)):
        if count == 0:
            continue
        summaries[split] = generate_split(
            out_dir,
            split,
            seed=seed,
            num_images=count,
            image_size=image_size,
            name=name,
            verbose=verbose,
        )
        if verbose:
            _print_summary(name, summaries[split])
    return summaries


def _print_summary(name: str, summary: Dict[str, Any]) -> None:
    n_img, n_ann = summary["images"], summary["annotations"]
    classes = ", ".join(f"{k} {v}" for k, v in summary["per_class"].items())
    areas = ", ".join(f"{k} {v}" for k, v in summary["areas"].items())
    print(
        f"[{name}/{summary['split']}] {n_img} images, {n_ann} objects "
        f"({n_ann / max(n_img, 1):.2f}/image; {summary['dropped_occluded']} hidden objects left "
        f"unannotated) in {summary['seconds']:.1f} s\n"
        f"  classes: {classes}\n  areas: {areas}\n  -> {summary['json_file']}",
        flush=True,
    )
