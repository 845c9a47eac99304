#!/usr/bin/env python
"""Time COCO box evaluation: pycocotools against the fast evaluator ``kd.compat`` installs.

    python tools/benchmark_coco_eval.py [--num-images 5000] [--detections-per-image 100] \\
        [--num-classes 80] [--seed 0]

Both run detectron2's own ``_evaluate_predictions_on_coco`` (what ``COCOEvaluator`` runs:
``loadRes``, ``evaluate``, ``accumulate``, ``summarize``) on the same detections, once with
``use_fast_impl=False`` (pycocotools) and once with ``use_fast_impl=True`` after
``kd.compat.install_fast_coco_eval()`` (faster-coco-eval without detectron2's compiled ``_C``,
detectron2's ``COCOeval_opt`` with it). It prints both times (CPU time of the process, which
other jobs on the machine disturb less, and wall time), the speed-ups, the part both pay
(pycocotools' ``loadRes``) and the largest difference between the two sets of 12 COCO stats.

The data are a synthetic COCO val (:func:`synthetic_coco`): by default 5000 640x480 images with
about 7 objects each (Poisson) of 80 classes, 1% crowd, sizes log-uniform over 4-400 px (about
45% small, 25% medium, 30% large), and 100 detections per image, 30% of them jittered copies of a
ground-truth box (a fifth with another class) and the rest background boxes with lower scores.
"""

import argparse
import contextlib
import copy
import io
import os
import sys
import time
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects"))

from kd import compat  # noqa: E402

__all__ = ["synthetic_coco", "evaluate", "main"]

_WIDTH, _HEIGHT = 640, 480


def _random_box(rng: np.random.Generator) -> Tuple[float, float]:
    size = np.exp(rng.uniform(np.log(4), np.log(400)))
    aspect = np.exp(rng.uniform(-1, 1))
    return min(size * aspect, _WIDTH - 1), min(size / aspect, _HEIGHT - 1)


def synthetic_coco(
    num_images: int,
    detections_per_image: int,
    num_classes: int,
    seed: int = 0,
    crowd_fraction: float = 0.01,
) -> Tuple[Dict, List[Dict]]:
    """A COCO ground-truth dict and detections for it, shaped like COCO val (see module doc).

    Ground-truth ``area`` is 50-100% of the box, as a segment's area is, so the area ranges of
    ground truth (annotation area) and detections (box area) differ as they do on COCO.

    Args:
        num_images: images in the set.
        detections_per_image: detections per image.
        num_classes: categories, with ids 1..num_classes.
        seed: seed of the generator.
        crowd_fraction: the share of ground-truth boxes marked ``iscrowd``.

    Returns:
        (ground truth in COCO format, detections in COCO results format).
    """
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append(
            {"id": image_id, "width": _WIDTH, "height": _HEIGHT, "file_name": f"{image_id}.jpg"}
        )
        objects = []
        for _ in range(rng.poisson(7)):
            w, h = _random_box(rng)
            x, y = rng.uniform(0, _WIDTH - w), rng.uniform(0, _HEIGHT - h)
            category = int(rng.integers(1, num_classes + 1))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h * rng.uniform(0.5, 1.0),
                    "iscrowd": int(rng.random() < crowd_fraction),
                }
            )
            objects.append((x, y, w, h, category))
        for _ in range(detections_per_image):
            if objects and rng.random() < 0.3:
                x, y, w, h, category = objects[int(rng.integers(len(objects)))]
                jitter = rng.normal(0, 0.1, 4)
                box = [
                    x + jitter[0] * w,
                    y + jitter[1] * h,
                    w * np.exp(jitter[2]),
                    h * np.exp(jitter[3]),
                ]
                if rng.random() < 0.2:
                    category = int(rng.integers(1, num_classes + 1))
                score = rng.beta(5, 2)
            else:
                w, h = _random_box(rng)
                box = [rng.uniform(0, _WIDTH - 1), rng.uniform(0, _HEIGHT - 1), w, h]
                category = int(rng.integers(1, num_classes + 1))
                score = rng.beta(2, 5)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def evaluate(ground_truth: Dict, detections: List[Dict], fast: bool):
    """detectron2's ``_evaluate_predictions_on_coco`` on fresh copies of the data, its printing
    silenced; returns (COCOeval, wall seconds, CPU seconds of the call)."""
    from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _coco(ground_truth)
        results = copy.deepcopy(detections)
        wall, cpu = time.perf_counter(), time.process_time()
        coco_eval = _evaluate_predictions_on_coco(coco_gt, results, "bbox", use_fast_impl=fast)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return coco_eval, wall, cpu


def _coco(ground_truth: Dict):
    from pycocotools.coco import COCO

    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(ground_truth)
    coco_gt.createIndex()
    return coco_gt


def load_results_seconds(ground_truth: Dict, detections: List[Dict]) -> float:
    """CPU seconds of pycocotools' ``loadRes``, which both paths pay (detectron2 calls it)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, results = _coco(ground_truth), copy.deepcopy(detections)
        cpu = time.process_time()
        coco_gt.loadRes(results)
        return time.process_time() - cpu


def fast_name() -> str:
    if compat.has_compiled_ops():
        return "detectron2 COCOeval_opt"
    import faster_coco_eval

    return f"faster-coco-eval {faster_coco_eval.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--detections-per-image", type=int, default=100)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.num_images, args.detections_per_image, args.num_classes) < 1:
        raise SystemExit("--num-images, --detections-per-image and --num-classes must be >= 1")
    ground_truth, detections = synthetic_coco(
        args.num_images, args.detections_per_image, args.num_classes, args.seed
    )
    crowd = sum(a["iscrowd"] for a in ground_truth["annotations"])
    print(
        f"{args.num_images} images, {len(ground_truth['annotations'])} ground-truth boxes "
        f"({crowd} crowd), {len(detections)} detections, {args.num_classes} classes"
    )
    reference, slow_wall, slow = evaluate(ground_truth, detections, fast=False)
    print(f"{'':<32}{'CPU':>9}{'wall':>9}")
    print(f"{'pycocotools':<32}{slow:8.1f}s{slow_wall:8.1f}s")
    if not compat.install_fast_coco_eval():
        raise SystemExit("no fast evaluator: pip install faster-coco-eval (see requirements.txt)")
    result, fast_wall, fast = evaluate(ground_truth, detections, fast=True)
    difference = np.abs(np.asarray(result.stats[:12]) - np.asarray(reference.stats[:12])).max()
    print(f"{fast_name():<32}{fast:8.1f}s{fast_wall:8.1f}s")
    print(f"{'speed-up':<32}{slow / fast:8.1f}x{slow_wall / fast_wall:8.1f}x")
    shared = load_results_seconds(ground_truth, detections)
    print(f"of which pycocotools' loadRes, in both: {shared:.1f} s CPU")
    print(f"largest difference of the 12 stats: {difference:.1e} (AP {reference.stats[0]:.4f})")


if __name__ == "__main__":
    main()
