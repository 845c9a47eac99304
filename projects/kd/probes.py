"""Per-family probes: "what are your class scores and boxes here?", asked at distillation points.

**Points** are boxes, ``(cx, cy, w, h)`` in ``[0, 1]`` of each image's own unpadded input size, a
``(B, M, 4)`` batch with a ``(B, M)`` validity mask (:mod:`kd.points.batch`; the samplers are in
:mod:`kd.points`): the same numbers name the same region for two models that see the image at
different sizes or paddings, so points pass between families unchanged.

**Probes** answer at points, batched over images and points (no per-box Python loops):

* :func:`probe_rcnn`: an R-CNN pools its own FPN features at the boxes with its ``box_pooler``
  (ROIAlign), runs ``box_head`` and ``box_predictor`` and decodes the deltas with its own
  ``box2box_transform``: softmax logits over K + 1 and refined boxes, one per class or one
  class-agnostic, as its config says. Exactly ``StandardROIHeads._forward_box`` on those boxes.
* :func:`probe_detr`: a DETR decodes the boxes as anchor queries over its encoder memory, isolated
  from its detection queries: sigmoid logits over K and refined boxes, at every decoder layer.
  A Hugging Face DETR teacher (:class:`~kd.families.hf_detr.HFDETRTeacher`) answers the same way,
  with the box queries its own family makes (zero content).

A probe is a plain function of the model and its features: under ``torch.no_grad()`` for a
teacher, with gradients for a student (whose own box head output *is* its probe at its sampled
proposals). Answers are :class:`ProbeAnswer` records; :mod:`kd.losses.class_space` maps between
the two class spaces.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.structures import Boxes
from torch import Tensor, nn

from kd.families.hf_detr import HFDETRTeacher, HFEncoded
from kd.families.rcnn import rcnn_box_predictions, rcnn_decoded_boxes
from kd.modeling.detr import DETR, DETREncoded, QueryGroup, denormalize_boxes, normalize_boxes
from kd.points.batch import clip_points

__all__ = [
    "ProbeAnswer",
    "DETR_CONTENTS",
    "DETR_ISOLATIONS",
    "probe_rcnn",
    "probe_detr",
]

DETR_CONTENTS = ("zeros", "anchor")
DETR_ISOLATIONS = ("point", "group")


@dataclass
class ProbeAnswer:
    """A detector's answers at M points per image, at each of its L prediction stages.

    Attributes:
        logits: (L, B, M, C) class logits in the model's own space: "softmax" (C = K + 1,
            background last) or "sigmoid" (C = K).
        boxes: (L, B, M, R, 4) refined boxes, cxcywh in [0, 1] of each image; R = 1 for
            class-agnostic regression (every DETR), R = K for per-class R-CNN heads.
        class_space: "softmax" or "sigmoid".

    An R-CNN has one stage (L = 1); a DETR has one per decoder layer, the last one last.
    """

    logits: Tensor
    boxes: Tensor
    class_space: str

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]

    @property
    def num_classes(self) -> int:
        """K, the object classes (without background)."""
        return self.logits.shape[-1] - (1 if self.class_space == "softmax" else 0)

    def last(self) -> "ProbeAnswer":
        """The answer of the final stage only (L = 1)."""
        return ProbeAnswer(self.logits[-1:], self.boxes[-1:], self.class_space)

    def foreground_probs(self) -> Tensor:
        """(L, B, M, K) per-class object probabilities (softmax without background, or sigmoid)."""
        if self.class_space == "softmax":
            return self.logits.softmax(dim=-1)[..., :-1]
        return self.logits.sigmoid()

    def class_boxes(self, classes: Optional[Tensor] = None) -> Tensor:
        """One box per point: the box of a given class for per-class heads.

        Args:
            classes: (B, M) long in [0, K), the class whose box to take at each point; None takes
                the model's own top class. Ignored for class-agnostic answers (R = 1).

        Returns:
            (L, B, M, 4) cxcywh in [0, 1].
        """
        if self.boxes.shape[-2] == 1:
            return self.boxes[..., 0, :]
        if classes is None:
            classes = self.foreground_probs()[-1].argmax(dim=-1)
        index = classes[None, :, :, None, None].expand(self.boxes.shape[0], -1, -1, 1, 4)
        return self.boxes.gather(-2, index)[..., 0, :]


# ------------------------------------------------------------------------------------- R-CNN


def _check_rcnn(model: nn.Module) -> None:
    roi = getattr(model, "roi_heads", None)
    if roi is None or not all(hasattr(roi, a) for a in ("box_pooler", "box_head", "box_predictor")):
        raise TypeError(
            f"probe_rcnn needs an R-CNN with a box head (GeneralizedRCNN with StandardROIHeads); "
            f"got {type(model).__name__}"
        )


def _to_points(boxes_xyxy: Tensor, image_sizes: List[Tuple[int, int]]) -> Tensor:
    """(B, M, R, 4) absolute xyxy -> normalised cxcywh, clipped to each image."""
    b, m, r, _ = boxes_xyxy.shape
    flat = normalize_boxes(boxes_xyxy.reshape(b, m * r, 4), image_sizes)
    return clip_points(flat).view(b, m, r, 4)


def probe_rcnn(
    model: nn.Module,
    features: Dict[str, Tensor],
    image_sizes: List[Tuple[int, int]],
    points: Tensor,
) -> ProbeAnswer:
    """An R-CNN's answer at points: ROIAlign on its own features, box head, box predictor.

    Args:
        model: a GeneralizedRCNN with StandardROIHeads (teacher or student).
        features: its backbone outputs for the batch.
        image_sizes: (h, w) of its input images before padding (its ``ImageList.image_sizes``).
        points: (B, M, 4) normalised cxcywh.

    Returns:
        "softmax" answer, L = 1: logits (1, B, M, K + 1); boxes (1, B, M, R, 4), the decoded
        boxes clipped to the image (as detectron2's inference clips them).
    """
    _check_rcnn(model)
    if points.dim() != 3 or points.shape[0] != len(image_sizes) or points.shape[-1] != 4:
        raise ValueError(
            f"points must be ({len(image_sizes)}, M, 4) normalised cxcywh, got "
            f"{tuple(points.shape)}"
        )
    b, m, _ = points.shape
    absolute = denormalize_boxes(points, image_sizes)
    scores, deltas = rcnn_box_predictions(model, features, [Boxes(x) for x in absolute])
    decoded = rcnn_decoded_boxes(model, deltas, absolute.reshape(b * m, 4))
    # Sizes spelled out (no -1): M = 0 points is a valid, empty question.
    boxes = _to_points(decoded.view(b, m, decoded.shape[1], 4), image_sizes)
    return ProbeAnswer(scores.view(1, b, m, scores.shape[-1]), boxes[None], "softmax")


# ------------------------------------------------------------------------------------- DETR


def probe_detr(
    model: DETR,
    encoded: DETREncoded,
    points: Tensor,
    *,
    content: str = "zeros",
    isolation: str = "point",
    valid: Optional[Tensor] = None,
) -> ProbeAnswer:
    """A DETR's answer at points: the boxes decoded as anchor queries over its encoder memory.

    The detection (and denoising) queries are never part of the pass.

    Args:
        model: a :class:`~kd.modeling.detr.DETR` (teacher or student).
        encoded: its :meth:`~kd.modeling.detr.DETR.encode` output for the batch.
        points: (B, M, 4) normalised cxcywh.
        content: the content queries. "zeros": the box alone asks the question; every decoder
            layer still reads it through the anchor-to-query encoding (sine embedding + MLP) as
            its positional query, which is how a DETR reads any anchor (KD-DETR decodes the
            teacher's anchors with zero content [paper]). "anchor": the anchor-to-query encoding
            is also the content (it is then seen twice).
        isolation: "point": each point attends only to itself in self-attention (one pass, a
            diagonal mask), so its answer does not depend on the other points, as an R-CNN's box
            head answers each box alone; a DETR's self-attention otherwise suppresses duplicates,
            and overlapping proposals would get low scores for being near each other. "group":
            all M points of an image attend to each other (one isolated group, KD-DETR's
            distillation queries).
        valid: (B, M) bool, True on real points (:func:`pad_points`); None: all are real. With
            "group", padded points are hidden from every other point's self-attention, so a real
            point's answer does not depend on how much another image's point set was padded.

    Returns:
        "sigmoid" answer: logits (L, B, M, K), boxes (L, B, M, 1, 4), one per decoder layer.
        Answers at padded points are meaningless.
    """
    if isinstance(model, HFDETRTeacher):
        return _probe_hf_detr(model, encoded, points, content, isolation, valid)
    if not isinstance(model, DETR):
        raise TypeError(f"probe_detr needs a kd.modeling.detr.DETR, got {type(model).__name__}")
    if content not in DETR_CONTENTS:
        raise ValueError(f"content must be one of {DETR_CONTENTS}, got {content!r}")
    if isolation not in DETR_ISOLATIONS:
        raise ValueError(f"isolation must be one of {DETR_ISOLATIONS}, got {isolation!r}")
    anchors = points.to(encoded.memory.dtype)
    queries = model.anchors_to_queries(anchors) if content == "anchor" else None
    if valid is not None and valid.shape != anchors.shape[:2]:
        raise ValueError(
            f"valid must be {tuple(anchors.shape[:2])} like the points, got {tuple(valid.shape)}"
        )
    if isolation == "group" and (valid is None or bool(valid.all())):
        out = model.decode_groups(encoded, [QueryGroup(anchors, queries)])[0]
    elif isolation == "group":
        # One group per image without its padding: keys that are padding are blocked for every
        # query, except for a padded query itself (a softmax row needs one visible key).
        b, m, _ = anchors.shape
        if queries is None:
            queries = encoded.memory.new_zeros(b, m, model.hidden_dim)
        mask = (~valid)[:, None, :].expand(b, m, m).clone()
        mask[:, torch.arange(m), torch.arange(m)] = False
        nheads = model.decoder.layers[0].self_attn.num_heads
        mask = mask.repeat_interleave(nheads, dim=0)  # (B * heads, M, M), as MultiheadAttention
        out = model.decoder(queries, anchors.clamp(0.0, 1.0), encoded, mask)
    else:
        # M groups of one query each, built as one diagonal mask rather than M QueryGroups
        # (decode_groups' block mask is built group by group). True = blocked.
        b, m, _ = anchors.shape
        if queries is None:
            queries = encoded.memory.new_zeros(b, m, model.hidden_dim)
        mask = ~torch.eye(m, dtype=torch.bool, device=anchors.device)
        out = model.decoder(queries, anchors.clamp(0.0, 1.0), encoded, mask)
    return ProbeAnswer(out.logits, out.boxes[..., None, :], "sigmoid")


def _probe_hf_detr(
    model: HFDETRTeacher,
    encoded: HFEncoded,
    points: Tensor,
    content: str,
    isolation: str,
    valid: Optional[Tensor],
) -> ProbeAnswer:
    """:func:`probe_detr` for a Hugging Face DETR teacher: the same isolation masks, its own
    box queries."""
    if content != "zeros":
        raise ValueError(
            f"KD.HETERO.DETR_CONTENT {content!r}: a Hugging Face DETR teacher makes its box "
            "queries its own way (kd.families.hf_detr); use 'zeros'"
        )
    if isolation not in DETR_ISOLATIONS:
        raise ValueError(f"isolation must be one of {DETR_ISOLATIONS}, got {isolation!r}")
    anchors = points.to(encoded.memory.dtype)
    b, m, _ = anchors.shape
    if valid is not None and valid.shape != (b, m):
        raise ValueError(f"valid must be {(b, m)} like the points, got {tuple(valid.shape)}")
    eye = torch.eye(m, dtype=torch.bool, device=anchors.device)
    if isolation == "point":
        blocked = ~eye
    elif valid is None or bool(valid.all()):
        blocked = None
    else:
        # As for a DETR: padding keys hidden from every query except a padded query itself.
        blocked = (~valid)[:, None, :].expand(b, m, m) & ~eye
    out = model.decode(encoded, None, anchors, blocked)
    return ProbeAnswer(out.logits, out.boxes[..., None, :], "sigmoid")
