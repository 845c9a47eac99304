#!/usr/bin/env python
"""Time the dataset check of :mod:`kd.data.validation` on a generated COCO-sized dataset.

    python tools/benchmark_validation.py --root /tmp/valbench [--num-images 40000]
        [--boxes-per-image 5] [--naive]

Writes ``ROOT/annotations.json`` (COCO format, ``num-images x boxes-per-image`` annotations) and one
image file per image under ``ROOT/images/``: hard links to one small PNG, so every file is a real
directory entry that ``os.stat`` must look up, at no disk cost. Then times loading the dicts with
detectron2's ``load_coco_json`` and checking them, and prints the figures. ``--naive`` also times a
Python loop with one ``BoxMode.convert`` call per box, for comparison.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects"))


def generate(root: str, num_images: int, boxes_per_image: int) -> str:
    """Write the annotation file and the image links (kept if already there); return the json."""
    from PIL import Image

    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    source = os.path.join(root, "source.png")
    if not os.path.isfile(source):
        Image.new("RGB", (64, 48)).save(source)
    images, annotations = [], []
    for i in range(num_images):
        name = f"{i:07d}.png"
        path = os.path.join(image_dir, name)
        if not os.path.exists(path):
            os.link(source, path)
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        for j in range(boxes_per_image):
            annotations.append(
                {
                    "id": i * boxes_per_image + j + 1,
                    "image_id": i + 1,
                    "category_id": 1 + (i + j) % 80,
                    "bbox": [10.0 + 3 * j, 20.0 + j, 100.5, 80.25],
                    "area": 100.5 * 80.25,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": f"c{k}"} for k in range(80)]
    json_file = os.path.join(root, "annotations.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file


def naive_check(dicts) -> int:
    """The per-box loop the vectorised check replaces: number of bad boxes."""
    from detectron2.structures import BoxMode

    bad = 0
    for record in dicts:
        for ann in record["annotations"]:
            x1, y1, x2, y2 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            bad += not (0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"])
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder for the generated dataset")
    parser.add_argument("--num-images", type=int, default=40000)
    parser.add_argument("--boxes-per-image", type=int, default=5)
    parser.add_argument("--naive", action="store_true", help="also time a per-box Python loop")
    args = parser.parse_args()

    from detectron2.data.datasets import load_coco_json

    from kd.data.validation import check_dataset_dicts

    json_file = generate(args.root, args.num_images, args.boxes_per_image)
    t0 = time.perf_counter()
    dicts = load_coco_json(json_file, os.path.join(args.root, "images"), "kd_valbench")
    t1 = time.perf_counter()
    report = check_dataset_dicts(dicts, box_tolerance=2.0, num_classes=80)
    t2 = time.perf_counter()
    print(
        f"{report.num_images} images, {report.num_annotations} annotations: "
        f"load_coco_json {t1 - t0:.2f} s, check {t2 - t1:.2f} s, both {t2 - t0:.2f} s "
        f"({report.summary()})"
    )
    if args.naive:
        t3 = time.perf_counter()
        bad = naive_check(dicts)
        print(f"per-box loop with BoxMode.convert: {time.perf_counter() - t3:.2f} s ({bad} bad)")


if __name__ == "__main__":
    main()
