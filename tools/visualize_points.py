#!/usr/bin/env python
"""Draw a distiller's distillation points on validation images, next to the ground truth.

    python tools/visualize_points.py --config-file configs/kd_shapes/retinanet_kd_gid.yaml \\
        --checkpoint output/kd_shapes/retinanet_kd_gid/model_final.pth --output vis/gid \\
        [--num-images 8] [--dataset kd_shapes_val] [--scale 4] [KEY VALUE ...]

The config is a distiller's (the teacher comes from its ``KD.TEACHER``); the checkpoint is a
distiller checkpoint (``student.*`` keys) or a plain student checkpoint, or empty for the freshly
initialised student. Each point box is coloured by its best IoU with the ground truth: positive
(>= 0.5, green), near-positive (0.3-0.5, orange), background (< 0.3, red). One PNG per image goes
to ``--output`` (ground truth on the left, one panel per set of points), with ``summary.json``
counting the three kinds per set.

Extending it: a distiller whose ``distillation_points(batched_inputs)`` (a hook of
:class:`kd.meta_arch.base.Distiller`, None by default) returns, per image, ``{name: Boxes}`` in the
input image's coordinates (GID: ``"general instances"``) is drawn; where the points are the
student's own samples of the step, register a function with :func:`register_points`.
The student runs in eval mode (its BatchNorm running statistics), the teacher as always.

Answers mode (``--mode answers``; the default for distillers overriding ``distillation_answers``,
i.e. KD-DETR): one panel per point set (KD-DETR: "general", "specific") draws the ``--top-k``
points the teacher is most confident at (grey), the teacher's answer box at each (green) and the
student's (magenta). ``summary.json`` then holds, per set, the number of points, the mean top class
probability of teacher and student, the mean IoU of the two answers at the same point, and how
many teacher answers are positives (IoU >= 0.5 with the ground truth). General points are random:
``--seed`` fixes them.

    python tools/visualize_points.py --config-file configs/kd_shapes/detr_kd_detr.yaml \\
        --checkpoint output/kd_shapes/detr_kd_detr/model_final.pth --output vis/kd_detr

Predictions mode (``--mode predictions``): what the distillation changed. Panels: the ground
truth, the teacher's detections, the baseline student's (``--baseline-checkpoint``, a plain
student checkpoint of the same architecture; its panel is left out without one) and the distilled
student's, each with score >= ``--score-thresh`` and coloured by IoU with the ground truth as in
points mode (classes are not compared). ``summary.json`` counts the three kinds per model, the
ground-truth boxes some detection covers at IoU >= 0.5 and that recall.

    python tools/visualize_points.py --mode predictions \\
        --config-file configs/kd_shapes/faster_rcnn_kd_chen2017.yaml \\
        --checkpoint output/demo/kd_chen2017/model_final.pth \\
        --baseline-checkpoint output/demo/baseline/model_final.pth --output vis/demo
"""

import argparse
import copy
import json
import os
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects"))

from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import DatasetMapper, get_detection_dataset_dicts  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.detection_utils import convert_image_to_rgb  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, pairwise_iou  # noqa: E402

import kd  # noqa: E402,F401  (registers the distillers and datasets)
from kd.checkpoint import load_weights  # noqa: E402
from kd.config import load_config  # noqa: E402
from kd.meta_arch.base import Distiller  # noqa: E402

__all__ = [
    "register_points",
    "points_of",
    "predictions_of",
    "classify",
    "covered",
    "render",
    "render_answers",
    "main",
]

POSITIVE, NEAR = 0.5, 0.3
COLOURS = {"positive": (0, 200, 0), "near": (255, 150, 0), "background": (230, 30, 30)}
SHORT = {"positive": "pos", "near": "near", "background": "bg"}
GT_COLOUR = (40, 120, 255)
POINT_COLOUR, TEACHER_COLOUR, STUDENT_COLOUR = (150, 150, 150), (0, 200, 0), (220, 0, 220)

# Model class name -> function(model, batched_inputs) -> List[Dict[str, Boxes]].
_POINT_FUNCTIONS: Dict[str, Callable] = {}


def register_points(class_name: str):
    """Register ``fn(model, batched_inputs) -> List[Dict[str, Boxes]]`` for a model class."""

    def deco(fn: Callable) -> Callable:
        _POINT_FUNCTIONS[class_name] = fn
        return fn

    return deco


def points_of(model: torch.nn.Module, batched_inputs: List[dict]) -> List[Dict[str, Boxes]]:
    """The named point sets of each image, from the model's method or a registered function."""
    fn = _POINT_FUNCTIONS.get(type(model).__name__)
    if fn is not None:
        return fn(model, batched_inputs)
    points = model.distillation_points(batched_inputs) if isinstance(model, Distiller) else None
    if points is not None:
        return points
    raise SystemExit(
        f"{type(model).__name__} exposes no distillation points: give it a "
        "distillation_points(batched_inputs) method or register a function with register_points"
    )


def predictions_of(
    model: torch.nn.Module,
    x: dict,
    score_thresh: float,
    baseline: Optional[torch.nn.Module] = None,
) -> Dict[str, Boxes]:
    """The detections of the teacher, the baseline student (if given) and the distilled student
    for one input, in the input image's coordinates, those scoring at least ``score_thresh``.

    Args:
        model: a distiller in eval mode.
        x: one mapped input (``image``, ``height``, ``width``).
        score_thresh: the lowest score drawn.
        baseline: a plain student model in eval mode, or None.
    """
    # Ask for the input's own size, so that every model's boxes land on the drawn image.
    h, w = x["image"].shape[-2:]
    x = dict(x, height=h, width=w)
    x.pop("instances", None)
    runs = {"teacher": lambda: model.teacher(model.teacher_inputs([x]))}
    if baseline is not None:
        runs["baseline student"] = lambda: baseline(model.student_inputs([x]))
    runs["distilled student"] = lambda: model([x])
    out = {}
    for name, run in runs.items():
        instances = run()[0]["instances"].to("cpu")
        out[name] = instances.pred_boxes[instances.scores >= score_thresh]
    return out


def covered(boxes: Boxes, gt: Boxes) -> int:
    """How many ``gt`` boxes some box of ``boxes`` covers at IoU >= 0.5."""
    if len(gt) == 0 or len(boxes) == 0:
        return 0
    return int((pairwise_iou(gt, boxes).max(dim=1).values >= POSITIVE).sum())


def classify(points: Boxes, gt: Boxes) -> List[str]:
    """'positive' / 'near' / 'background' for each point box, by its best IoU with ``gt``."""
    if len(points) == 0:
        return []
    if len(gt) == 0:
        return ["background"] * len(points)
    best = pairwise_iou(points, gt).max(dim=1).values
    return [
        "positive" if v >= POSITIVE else "near" if v >= NEAR else "background"
        for v in best.tolist()
    ]


def _panel(
    image: np.ndarray,
    boxes: np.ndarray,
    colours: List[tuple],
    title: str,
    scale: int,
    widths: Optional[List[int]] = None,
) -> Image.Image:
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w * scale, h * scale + 14), (255, 255, 255))
    canvas.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST), (0, 14))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill=(0, 0, 0))
    widths = widths or [2] * len(colours)
    for (x0, y0, x1, y1), colour, width in zip(boxes.tolist(), colours, widths):
        draw.rectangle(
            [x0 * scale, y0 * scale + 14, x1 * scale, y1 * scale + 14], outline=colour, width=width
        )
    return canvas


def _side_by_side(panels: List[Image.Image]) -> Image.Image:
    out = Image.new(
        "RGB",
        (sum(p.width for p in panels) + 4 * (len(panels) - 1), max(p.height for p in panels)),
        (255, 255, 255),
    )
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 4
    return out


def _gt_panel(image: np.ndarray, gt: Boxes, scale: int) -> Image.Image:
    return _panel(
        image, gt.tensor.cpu().numpy(), [GT_COLOUR] * len(gt), f"ground truth ({len(gt)})", scale
    )


def render(image: np.ndarray, gt: Boxes, point_sets: Dict[str, Boxes], scale: int = 4):
    """The ground truth and each point set side by side.

    Args:
        image: (H, W, 3) uint8 RGB, the model's input image.
        gt: ground-truth boxes in the same coordinates.
        point_sets: name -> point boxes.
        scale: upsampling factor of the drawing.

    Returns:
        (PIL image, {name: {"positive": n, "near": n, "background": n}}).
    """
    panels = [_gt_panel(image, gt, scale)]
    counts = {}
    for name, boxes in point_sets.items():
        boxes = boxes.to("cpu")
        kinds = classify(boxes, gt.to("cpu"))
        counts[name] = {k: kinds.count(k) for k in COLOURS}
        title = f"{name}: " + " / ".join(f"{counts[name][k]} {SHORT[k]}" for k in COLOURS)
        panels.append(
            _panel(image, boxes.tensor.numpy(), [COLOURS[k] for k in kinds], title, scale)
        )
    return _side_by_side(panels), counts


def render_answers(
    image: np.ndarray, gt: Boxes, answers: Dict[str, dict], top_k: int = 10, scale: int = 4
):
    """The ground truth, then per point set its top-k points with both models' answers.

    Args:
        image: (H, W, 3) uint8 RGB, the model's input image.
        gt: ground-truth boxes in the same coordinates.
        answers: set name -> the distiller's ``distillation_answers`` entry for this image.
        top_k: points drawn per set, those with the highest teacher score.
        scale: upsampling factor of the drawing.

    Returns:
        (PIL image, {set name: statistics over all its points}).
    """
    panels = [_gt_panel(image, gt, scale)]
    stats = {}
    gt = gt.to("cpu")
    for name, entry in answers.items():
        entry = {k: v.to("cpu") for k, v in entry.items()}
        t_boxes, s_boxes = entry["teacher_boxes"], entry["student_boxes"]
        agreement = pairwise_iou(t_boxes, s_boxes).diagonal()
        positive = 0
        if len(gt) and len(t_boxes):
            positive = int((pairwise_iou(t_boxes, gt).max(dim=1).values >= POSITIVE).sum())
        stats[name] = {
            "points": len(t_boxes),
            "teacher_score": float(entry["teacher_scores"].mean()),
            "student_score": float(entry["student_scores"].mean()),
            "answer_iou": float(agreement.mean()),
            "teacher_positive": positive,
        }
        keep = entry["teacher_scores"].argsort(descending=True)[:top_k]
        boxes, colours, widths = [], [], []
        for key, colour, width in (
            ("points", POINT_COLOUR, 1),
            ("teacher_boxes", TEACHER_COLOUR, 2),
            ("student_boxes", STUDENT_COLOUR, 1),
        ):
            boxes.append(entry[key].tensor[keep])
            colours += [colour] * len(keep)
            widths += [width] * len(keep)
        title = f"{name}: top {len(keep)}/{len(t_boxes)}, IoU(t,s) {stats[name]['answer_iou']:.2f}"
        panels.append(_panel(image, torch.cat(boxes).numpy(), colours, title, scale, widths=widths))
    return _side_by_side(panels), stats


def setup(args) -> CfgNode:
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def load_baseline(model: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    """A copy of the distiller's student with a baseline run's (plain student) weights."""
    if not path:
        return None
    baseline = copy.deepcopy(model.student)
    load_weights(baseline, path, complete=True, key="--baseline-checkpoint")
    return baseline.eval()


def main(argv=None) -> Dict[str, Dict[str, int]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="a distiller's config")
    parser.add_argument("--checkpoint", default="", help="distiller or student weights")
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--dataset", default="", help="default: the config's first test set")
    parser.add_argument("--scale", type=int, default=4, help="drawing upsampling factor")
    parser.add_argument(
        "--mode",
        choices=("auto", "points", "answers", "predictions"),
        default="auto",
        help="points: boxes coloured by IoU with the ground truth; answers: points with the "
        "teacher's and student's answers (KD-DETR); auto: answers when the distiller has them; "
        "predictions: the teacher's, baseline's and distilled student's detections",
    )
    parser.add_argument(
        "--baseline-checkpoint",
        default="",
        help="predictions mode: a baseline student's weights (same architecture as the student)",
    )
    parser.add_argument(
        "--score-thresh", type=float, default=0.5, help="predictions mode: lowest score drawn"
    )
    parser.add_argument("--top-k", type=int, default=10, help="answers mode: points drawn per set")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (random general points)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    cfg = setup(args)
    model = build_model(cfg)
    load_weights(model, args.checkpoint, complete=True, key="--checkpoint")
    model.eval()
    predictions_mode = args.mode == "predictions"
    baseline = load_baseline(model, args.baseline_checkpoint) if predictions_mode else None
    has_answers = isinstance(model, Distiller) and (
        type(model).distillation_answers is not Distiller.distillation_answers
    )
    answers_mode = args.mode == "answers" or (args.mode == "auto" and has_answers)
    if answers_mode and not has_answers:
        raise SystemExit(f"{type(model).__name__} has no distillation_answers: use --mode points")
    torch.manual_seed(args.seed)

    dataset = args.dataset or cfg.DATASETS.TEST[0]
    dicts = get_detection_dataset_dicts([dataset], filter_empty=False)[: args.num_images]
    # The test-time resize, but keeping the annotations (is_train=True without random flips).
    mapper = DatasetMapper(
        cfg,
        is_train=True,
        augmentations=[
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
        ],
    )
    os.makedirs(args.output, exist_ok=True)
    totals: Dict[str, Dict[str, float]] = {}
    for d in dicts:
        x = mapper(copy.deepcopy(d))
        image = convert_image_to_rgb(x["image"].permute(1, 2, 0).numpy(), cfg.INPUT.FORMAT)
        image = image.astype(np.uint8)
        gt = x["instances"].gt_boxes
        with torch.no_grad():
            if answers_mode:
                picture, counts = render_answers(
                    image, gt, model.distillation_answers([x])[0], args.top_k, args.scale
                )
            elif predictions_mode:
                detections = predictions_of(model, x, args.score_thresh, baseline)
                picture, counts = render(image, gt, detections, args.scale)
                for name, boxes in detections.items():
                    counts[name]["ground_truth"] = len(gt)
                    counts[name]["covered"] = covered(boxes.to("cpu"), gt.to("cpu"))
            else:
                picture, counts = render(image, gt, points_of(model, [x])[0], args.scale)
        name = os.path.splitext(os.path.basename(d["file_name"]))[0]
        picture.save(os.path.join(args.output, f"{name}.png"))
        for set_name, c in counts.items():
            t = totals.setdefault(set_name, dict.fromkeys(c, 0))
            for k, v in c.items():
                t[k] += v
    for t in totals.values():
        if answers_mode:  # per-image means -> means over the images; counts stay totals
            for k in ("teacher_score", "student_score", "answer_iou"):
                t[k] /= max(len(dicts), 1)
        if predictions_mode:
            t["recall"] = t["covered"] / max(t["ground_truth"], 1)
    key = "answers" if answers_mode else "predictions" if predictions_mode else "points"
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump({"images": len(dicts), key: totals}, f, indent=1)
    print(json.dumps({"images": len(dicts), key: totals}))
    return totals


if __name__ == "__main__":
    from kd.launch import run_guarded

    run_guarded(main)
