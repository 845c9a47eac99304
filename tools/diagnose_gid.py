#!/usr/bin/env python
"""What GID does to each class: the instances GISM selects and each term's pull, per class.

    python tools/diagnose_gid.py CONFIG.yaml [--batches 8] [--json OUT.json] [KEY VALUE ...]

For a GID config on a one-stage dense detector (``GIDDistiller`` with RetinaNet or FCOS, or the
older names ``GIDRetinaNetDistiller``, ``GIDFCOSDistiller``), with its teacher
(``KD.TEACHER.WEIGHTS``) and a student (``MODEL.WEIGHTS``, e.g. a checkpoint of the distilled
run at some iteration; ImageNet-initialised without), runs the distiller's own training forward
on ``--batches`` training batches (the training loader, its augmentation and ``SEED``), without
optimizer steps, and reports per ground-truth class:

* ``GT``: ground-truth boxes; ``covered``: the fraction of them that a GI box overlaps with IoU >=
  0.5; ``GIs``: GI boxes whose best ground truth (IoU >= 0.5) has that class (``none``: GI boxes
  on no object, i.e. on background or a box neither model gets right);
* ``anchors``: the predictions the student's own label assignment makes foreground for that
  class; ``p_t`` / ``p_s``: the teacher's and the student's mean probability of the class there;
  ``in mask``: the fraction of them in GID's response mask;
* for each term that reaches the classification logits (the student's ``loss_cls`` and GID's
  ``response_cls``): the mean of ``-dL/dlogit`` of the class's own logit at those predictions
  (weights applied, per prediction and batch): what a gradient step does to the score of a
  true object of the class (positive raises it);
* for each term, the cosine between its gradient and the student's own losses' gradient on the
  FPN features at the locations inside the class's boxes (negative: the term pulls those
  features against what the student's own losses ask), and its gradient's norm there relative
  to the own losses' (how strong the pull is).

The distiller is used as it is (its methods observed through hooks), so the figures are those of
the training step itself.
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))

OWN = "own losses"  # the student's own losses, summed: the reference of the cosines
TOTALS = ("GT", "GIs", "anchors")  # counted over the batches; every other figure is a mean


def _inside(centers, boxes):
    """(P, G) bool: point p lies inside box g."""
    x, y = centers[:, None, 0], centers[:, None, 1]
    return (
        (x >= boxes[None, :, 0])
        & (x <= boxes[None, :, 2])
        & (y >= boxes[None, :, 1])
        & (y <= boxes[None, :, 3])
    )


def diagnose(config_file: str, opts: Sequence[str], batches: int) -> Dict[str, Dict[str, float]]:
    """The per-class figures of the module docstring, averaged over ``batches`` batches.

    Args:
        config_file: a GID config of a dense detector.
        opts: ``KEY VALUE`` overrides (teacher and student weights).
        batches: how many training batches.

    Returns:
        ``{class name: {figure: value}}``, with a ``"none"`` entry for GI boxes on no object.
    """
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, pairwise_iou
    from detectron2.utils.events import EventStorage

    from kd.families.dense import DenseDetectorView
    from kd.inspection import training_model
    from kd.meta_arch.gid import GIDDistiller

    cfg, model, loader = training_model(config_file, opts)
    if not isinstance(model, GIDDistiller) or not isinstance(model.views[0], DenseDetectorView):
        raise ValueError(
            f"{config_file}: diagnose_gid needs a GID config of RetinaNet or FCOS "
            f"(MODEL.META_ARCHITECTURE GIDDistiller), got {type(model).__name__}"
            + (
                f" with a {type(model.views[0]).__name__}"
                if isinstance(model, GIDDistiller)
                else ""
            )
        )
    student = model.student

    seen: Dict[str, object] = {}
    hooks = [
        student.head.register_forward_hook(lambda m, i, o: seen.__setitem__("predictions", o)),
        student.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o)),
        student.anchor_generator.register_forward_hook(
            lambda m, i, o: seen.__setitem__("anchors", o)
        ),
    ]
    gid = model.gid
    select, response_mask, teacher_dense = gid.select, gid.response_mask, model._teacher_trace

    def record_select(*a, **k):
        seen["gi_boxes"] = select(*a, **k)
        return seen["gi_boxes"]

    def record_mask(*a, **k):
        seen["mask"] = response_mask(*a, **k)
        return seen["mask"]

    def record_teacher(*a, **k):
        seen["teacher_dense"] = teacher_dense(*a, **k)
        return seen["teacher_dense"]

    # Instance attributes shadow the methods the step calls (removed again below).
    gid.select, gid.response_mask = record_select, record_mask
    model._teacher_trace = record_teacher
    sums: Dict[str, Dict[str, float]] = {}
    counts: Dict[str, Dict[str, int]] = {}

    def add(cls: str, key: str, value: float, n: int = 1) -> None:
        sums.setdefault(cls, {})[key] = sums.get(cls, {}).get(key, 0.0) + value
        counts.setdefault(cls, {})[key] = counts.get(cls, {}).get(key, 0) + n

    # Known once the loader has read the dataset (COCO files register their classes then).
    names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
    num_classes = len(names)
    try:
        with EventStorage(0):
            for _ in range(batches):
                batch = next(loader)
                seen.clear()
                losses = model.forward_train(batch)
                _diagnose_batch(
                    model, batch, losses, seen, names, num_classes, add, Boxes, pairwise_iou
                )
    finally:
        for h in hooks:
            h.remove()
        for name in ("select", "response_mask"):
            del gid.__dict__[name]
        del model.__dict__["_teacher_trace"]
    return {
        cls: {k: v if k in TOTALS else v / max(counts[cls][k], 1) for k, v in figures.items()}
        for cls, figures in sums.items()
    }


def _diagnose_batch(model, batch, losses, seen, names, num_classes, add, Boxes, pairwise_iou):
    import torch
    from detectron2.layers import cat

    student = model.student
    gt = [x["instances"].to(model.device) for x in batch]
    anchors = seen["anchors"]
    cls_levels = list(seen["predictions"][0])
    features = seen["features"]
    feature_names = [f for f in student.head_in_features]
    feature_levels = [features[f] for f in feature_names]
    own = sum(v for k, v in losses.items() if not k.startswith("loss_kd_"))
    terms = {OWN: own, "loss_cls": losses["loss_cls"]}
    terms.update({k: v for k, v in losses.items() if k.startswith("loss_kd_")})

    # Labels of every prediction by the student's own assignment: (N, R), num_classes = bg.
    labels = torch.stack(student.label_anchors(anchors, gt)[0])

    def dense_grad(term):
        g = torch.autograd.grad(term, cls_levels, retain_graph=True, allow_unused=True)
        if all(x is None for x in g):
            return None
        g = [torch.zeros_like(c) if x is None else x for x, c in zip(g, cls_levels)]
        return cat(student._transpose_dense_predictions([g], [num_classes])[0], dim=1)

    def feature_grad(term):
        g = torch.autograd.grad(term, feature_levels, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(f) if x is None else x for x, f in zip(g, feature_levels)]

    t_probs = seen["teacher_dense"][1].cls.sigmoid()
    s_probs = cat(
        student._transpose_dense_predictions([cls_levels], [num_classes])[0], dim=1
    ).sigmoid()
    mask = seen.get("mask")
    gi_boxes = seen["gi_boxes"]
    dense_grads = {k: dense_grad(v) for k, v in terms.items() if k != OWN}
    feature_grads = {k: feature_grad(v) for k, v in terms.items()}

    for i, inst in enumerate(gt):
        gt_boxes, gt_classes = inst.gt_boxes, inst.gt_classes
        iou = pairwise_iou(gi_boxes[i], gt_boxes) if len(gt_boxes) else None
        for g in range(len(gt_boxes)):
            c = names[int(gt_classes[g])]
            add(c, "GT", 1.0)
            add(
                c, "covered", float(iou is not None and len(gi_boxes[i]) and iou[:, g].max() >= 0.5)
            )
        for b in range(len(gi_boxes[i])):
            if iou is not None and iou[b].max() >= 0.5:
                add(names[int(gt_classes[iou[b].argmax()])], "GIs", 1.0)
            else:
                add("none", "GIs", 1.0)
        for k, c in enumerate(names):
            fg = labels[i] == k
            n = int(fg.sum())
            if not n:
                continue
            add(c, "anchors", float(n))
            add(c, "p_t", float(t_probs[i, fg, k].sum()), n)
            add(c, "p_s", float(s_probs[i, fg, k].sum()), n)
            if mask is not None:
                add(c, "in mask", float(mask[i, fg].sum()), n)
            for name, grad in dense_grads.items():
                if grad is not None:
                    add(c, f"pull {name}", float(-grad[i, fg, k].sum()), n)
        # Feature gradients inside each class's boxes, level by level.
        for k, c in enumerate(names):
            boxes = gt_boxes.tensor[gt_classes == k]
            if not len(boxes):
                continue
            vecs: Dict[str, List] = {name: [] for name in feature_grads}
            for lvl, f in enumerate(feature_levels):
                h, w = f.shape[-2:]
                ys, xs = torch.meshgrid(
                    torch.arange(h, device=f.device),
                    torch.arange(w, device=f.device),
                    indexing="ij",
                )
                step = student.backbone.output_shape()[feature_names[lvl]].stride
                centers = torch.stack([(xs.flatten() + 0.5) * step, (ys.flatten() + 0.5) * step], 1)
                inside = _inside(centers, boxes).any(dim=1)
                for name, grads in feature_grads.items():
                    vecs[name].append(grads[lvl][i].flatten(1)[:, inside].flatten())
            ref = torch.cat(vecs[OWN])
            if float(ref.norm()) == 0:
                continue
            for name, parts in vecs.items():
                if name == OWN:
                    continue
                v = torch.cat(parts)
                cos = float(torch.nn.functional.cosine_similarity(v, ref, dim=0))
                add(c, f"cos {name}", cos)
                add(c, f"norm {name}", float(v.norm() / ref.norm()))


def format_report(figures: Dict[str, Dict[str, float]]) -> str:
    """One row per figure, one column per class (and ``none``)."""
    classes = [c for c, f in figures.items() if f]
    keys = list(dict.fromkeys(k for c in classes for k in figures[c]))
    width = max(len(k) for k in keys)
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>11}" for c in classes)]
    for k in keys:
        cells = [f"{figures[c][k]:11.4g}" if k in figures[c] else f"{'':>11}" for c in classes]
        lines.append(f"{k:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line: the config, ``--batches``, ``--json`` and ``KEY VALUE`` overrides in
    any order."""
    from kd.inspection import batches_parser, parse_batches_args

    parser = batches_parser(__doc__.split("\n\n")[0], 8)
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    return parse_batches_args(parser, argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    figures = diagnose(args.config_file, args.opts, args.batches)
    print(format_report(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    from kd.launch import run_guarded

    run_guarded(main)
