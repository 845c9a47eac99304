#!/usr/bin/env python
"""How good are a trained detector's answers at distillation points? (kd.probes)

Asks the model about boxes whose truth is known, on the first N images of its test set:

* foreground points: each ground-truth box jittered 4 times (corners moved by up to 15% of the
  box size, IoU ~0.75 with the box);
* random points: 16 random boxes per image (``kd.points.random.random_points``).

and prints, per probe variant (for a DETR every ``content`` x ``isolation`` choice), the top-class
accuracy and the mean probability of the true class at foreground points, the mean IoU of the
refined boxes with their ground truth (against that of the points themselves), and the mean top
class probability at random points. Used to choose ``KD.HETERO.DETR_CONTENT`` and
``KD.HETERO.RCNN_STUDENT.DETR_ISOLATION``.

    python tools/probe_quality.py --config-file configs/kd_shapes/detr_teacher.yaml \
        --weights output/kd_shapes/detr_teacher/model_final.pth [--num-images 64]

A Hugging Face teacher (``--config-file hf://<folder>``, no ``--weights``) is asked as the
distillers ask it (:class:`kd.families.hf_detr.HFDETRTeacher`), on the images and test mapper of
``--data-config`` (e.g. its student's config).
"""

import argparse
import copy
from typing import Dict, Optional, Sequence

import torch
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, pairwise_iou

import kd  # noqa: F401  (registers the models and the datasets)
from kd.checkpoint import load_weights
from kd.config import load_config
from kd.families.hf_detr import HFDETRTeacher
from kd.families.hf_source import HF_PREFIX
from kd.modeling.detr import DETR, denormalize_boxes, normalize_boxes
from kd.points.batch import pad_points
from kd.points.random import random_points
from kd.probes import DETR_CONTENTS, DETR_ISOLATIONS, probe_detr, probe_rcnn

JITTERS, RANDOM = 4, 16


def _answers(model, batch, points) -> "tuple[Dict[str, object], list]":
    if isinstance(model, (DETR, HFDETRTeacher)):
        encoded = model.encode(batch)
        # A Hugging Face teacher makes a box's query its own way: zero content only.
        contents = ("zeros",) if isinstance(model, HFDETRTeacher) else DETR_CONTENTS
        answers = {
            f"content={c} isolation={i}": probe_detr(model, encoded, points, content=c, isolation=i)
            for c in contents
            for i in DETR_ISOLATIONS
        }
        return answers, encoded.image_sizes
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    return {"box head": probe_rcnn(model, features, images.image_sizes, points)}, (
        images.image_sizes
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="(none for an hf:// teacher)")
    parser.add_argument(
        "--data-config",
        default="",
        help="for an hf:// teacher: the config of the data it is asked on",
    )
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    hf = args.config_file.startswith(HF_PREFIX)
    if hf and not args.data_config:
        raise SystemExit("--data-config: an hf:// teacher is asked on that config's test data")
    cfg = load_config(args.data_config if hf else args.config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    if hf:
        model = HFDETRTeacher.from_source(args.config_file[len(HF_PREFIX) :]).eval()
    else:
        model = build_model(cfg).eval()
        load_weights(model, args.weights, complete=True, key="--weights")
    mapper = DatasetMapper(cfg, False)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TEST)[: args.num_images]
    g = torch.Generator().manual_seed(0)
    stats: Dict[str, Dict[str, float]] = {}
    for start in range(0, len(dicts), args.batch_size):
        chunk = dicts[start : start + args.batch_size]
        batch = [mapper(copy.deepcopy(d)) for d in chunk]
        if hf and cfg.INPUT.FORMAT == "BGR":  # the Hugging Face teacher takes RGB
            batch = [{**x, "image": x["image"].flip(0)} for x in batch]
        per_image, truth = [], []
        for x, d in zip(batch, chunk):
            h, w = x["image"].shape[-2:]
            sy, sx = h / d["height"], w / d["width"]
            gt = torch.tensor(
                [
                    BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                    for a in d["annotations"]
                ],
                dtype=torch.float32,
            ).view(-1, 4) * torch.tensor([sx, sy, sx, sy])
            classes = torch.tensor([a["category_id"] for a in d["annotations"]], dtype=torch.long)
            gt, classes = gt.repeat(JITTERS, 1), classes.repeat(JITTERS)
            size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
            jittered = gt + (torch.rand(gt.shape, generator=g) - 0.5) * 0.3 * size
            points = normalize_boxes(jittered[None], [(h, w)])[0]
            per_image.append(torch.cat([points, random_points(1, RANDOM, generator=g)[0]]))
            truth.append((gt, classes, jittered))
        points, _ = pad_points(per_image)
        with torch.no_grad():
            answers, sizes = _answers(model, batch, points)
        for name, answer in answers.items():
            probs = answer.foreground_probs()[-1]
            boxes = answer.class_boxes()[-1]
            s = stats.setdefault(
                name, dict.fromkeys(("fg", "acc", "p", "iou_in", "iou", "bg", "p_bg"), 0.0)
            )
            for b, (gt, classes, jittered) in enumerate(truth):
                n = len(gt)
                p = probs[b, :n]
                s["fg"] += n
                s["acc"] += float((p.argmax(-1) == classes).sum())
                s["p"] += float(p.gather(1, classes[:, None]).sum())
                out = denormalize_boxes(boxes[b : b + 1, :n], [sizes[b]])[0]
                s["iou_in"] += float(torch.diag(pairwise_iou(Boxes(jittered), Boxes(gt))).sum())
                s["iou"] += float(torch.diag(pairwise_iou(Boxes(out), Boxes(gt))).sum())
                s["bg"] += RANDOM
                s["p_bg"] += float(probs[b, n : n + RANDOM].max(-1).values.sum())
    print(
        "| probe | top-class acc | p(true class) | IoU points -> answers | max p at random boxes |"
    )
    print("|---|---|---|---|---|")
    for name, s in stats.items():
        print(
            f"| {name} | {s['acc'] / s['fg']:.3f} | {s['p'] / s['fg']:.3f} | "
            f"{s['iou_in'] / s['fg']:.3f} -> {s['iou'] / s['fg']:.3f} | {s['p_bg'] / s['bg']:.3f} |"
        )
    print(f"({int(s['fg'])} foreground points, {int(s['bg'])} random points)")


if __name__ == "__main__":
    from kd.launch import run_guarded

    run_guarded(main)
