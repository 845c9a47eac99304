"""The dense per-location view of a detector: anchors (or points) shared by a batch, the
predictions at each, and the label assignment that picks some of them.

One-stage detectors (detectron2's :class:`DenseDetector`: RetinaNet, FCOS) are dense throughout;
a Faster R-CNN's RPN is its dense part. Distillers that compare teacher and student prediction by
prediction (GID's selection and response, Chen et al.'s RPN terms) need the two layouts to
correspond one to one: :func:`dense_layout_problems` says where they do not.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from detectron2.layers import cat
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from kd.families.registry import register_model_class_family

__all__ = [
    "DenseOutputs",
    "DenseView",
    "DenseDetectorView",
    "RetinaNetView",
    "FCOSView",
    "RetinaNetFamily",
    "FCOSFamily",
    "dense_layout_problems",
    "dense_outputs",
    "decode_at",
    "matcher_foreground",
]


class DenseOutputs(NamedTuple):
    """A detector's dense predictions over a batch: row r of every tensor is the r-th anchor (or
    point) of all levels, in the anchor generator's order (the layout of its own losses)."""

    cls: Tensor  # (N, R, C) class logits; an RPN's objectness as C = 1
    deltas: Tensor  # (N, R, 4) box deltas, in the model's own encoding
    anchors: Optional[List[Boxes]]  # per level, shared by the batch (None where not asked for)
    centerness: Optional[Tensor] = None  # (N, R, 1) FCOS's centerness logits


class DenseView:
    """How a distiller reads one detector's dense part (its family's ``dense_view``): the
    anchors, the head's outputs at them, and the detector's own label assignment.

    Subclasses say where the family keeps them; the model is not copied (a view holds it).
    """

    # Points (FCOS), not anchor boxes: "inside a box" is the paper-level assignment rule.
    anchor_free = False

    def __init__(self, model: nn.Module, dense_part: Optional[nn.Module] = None):
        """
        Args:
            model: the detector.
            dense_part: the module holding its ``anchor_generator`` and ``box2box_transform``
                (default: the detector; a Faster R-CNN's RPN).
        """
        self.model = model
        self.dense_part = model if dense_part is None else dense_part

    @property
    def anchor_generator(self) -> nn.Module:
        return self.dense_part.anchor_generator

    @property
    def box2box_transform(self):
        return self.dense_part.box2box_transform

    @property
    def head_in_features(self) -> List[str]:
        """The backbone features the dense head runs on."""
        return list(self.model.head_in_features)

    @property
    def instance_features(self) -> List[str]:
        """The features the detector pools instances from (a distiller's default)."""
        return self.head_in_features

    def outputs(self, features: Dict[str, Tensor], anchors: bool = False) -> DenseOutputs:
        """The dense head on backbone ``features`` (a teacher calls it under ``no_grad``).

        Args:
            features: the model's backbone outputs.
            anchors: also generate the anchors (else :attr:`DenseOutputs.anchors` is None).
        """
        raise NotImplementedError

    def train_step(
        self, images: ImageList, features: Dict[str, Tensor], gt_instances: List[Instances]
    ) -> Tuple[Dict[str, Tensor], DenseOutputs]:
        """The model's own training step from its backbone ``features`` on: its losses,
        unchanged, and the dense outputs (with anchors) they were computed from."""
        raise NotImplementedError

    def foreground(
        self, boxes: List[Boxes], anchors: List[Boxes], image_sizes: List[tuple]
    ) -> Tensor:
        """(N, R) bool: the predictions the model's own label assignment makes foreground when
        ``boxes`` are each image's ground truth."""
        raise NotImplementedError


class DenseDetectorView(DenseView):
    """detectron2's one-stage ``DenseDetector``: its head's per-level outputs, transposed."""

    names = ("cls", "deltas")

    def _dims(self) -> List[int]:
        return [self.model.num_classes, 4]

    def _outputs(self, head_features: List[Tensor], predictions, anchors: bool) -> DenseOutputs:
        dense = dense_outputs(self.model, predictions, self._dims(), self.names)
        return DenseOutputs(
            dense["cls"],
            dense["deltas"],
            self.model.anchor_generator(head_features) if anchors else None,
            dense.get("ctr"),
        )

    def outputs(self, features, anchors=False):
        head_features = [features[f] for f in self.model.head_in_features]
        return self._outputs(head_features, self.model.head(head_features), anchors)

    def train_step(self, images, features, gt_instances):
        model = self.model
        head_features = [features[f] for f in model.head_in_features]
        predictions = model.head(head_features)
        losses = model.forward_training(images, head_features, predictions, gt_instances)
        return losses, self._outputs(head_features, predictions, anchors=True)


class RetinaNetView(DenseDetectorView):
    """RetinaNet: anchors, class logits and deltas; its ``anchor_matcher`` assigns labels."""

    def foreground(self, boxes, anchors, image_sizes):
        return matcher_foreground(self.model.anchor_matcher, boxes, Boxes.cat(anchors))


class FCOSView(DenseDetectorView):
    """FCOS: points (as zero-size anchors), class, box and centerness logits; its own assignment
    (``match_anchors``: centre sampling and scale ranges)."""

    anchor_free = True
    names = ("cls", "deltas", "ctr")

    def _dims(self) -> List[int]:
        return [self.model.num_classes, 4, 1]

    def foreground(self, boxes, anchors, image_sizes):
        num = sum(len(a) for a in anchors)
        masks = []
        for b, size in zip(boxes, image_sizes):
            if not len(b):  # FCOS's match_anchors cannot take an image without boxes
                masks.append(torch.zeros(num, dtype=torch.bool, device=b.tensor.device))
                continue
            gt = Instances(size)
            gt.gt_boxes = b
            masks.append(self.model.match_anchors(anchors, [gt])[0] >= 0)
        return torch.stack(masks)


RetinaNetFamily = register_model_class_family("RetinaNet", RetinaNet, RetinaNetView)
FCOSFamily = register_model_class_family("FCOS", FCOS, FCOSView)


def dense_layout_problems(
    student: nn.Module, teacher: nn.Module, anchor_generator_of: Callable[[nn.Module], nn.Module]
) -> List[str]:
    """What keeps prediction i of the student from being prediction i of the teacher: anchors
    on other strides or cells, another offset, other padding, other classes.

    Args:
        student, teacher: the two detectors.
        anchor_generator_of: returns a model's anchor generator (a RetinaNet's own, a Faster
            R-CNN's RPN's).

    Returns:
        One phrase per difference (empty when the layouts match).
    """
    sa, ta = anchor_generator_of(student), anchor_generator_of(teacher)
    problems = []
    if list(sa.strides) != list(ta.strides):
        problems.append(
            f"the anchors' strides (student {list(sa.strides)}, teacher " f"{list(ta.strides)})"
        )
    if list(sa.num_cell_anchors) != list(ta.num_cell_anchors) or not all(
        torch.allclose(a.cpu(), b.cpu()) for a, b in zip(sa.cell_anchors, ta.cell_anchors)
    ):
        problems.append("the anchors per location (MODEL.ANCHOR_GENERATOR SIZES / ASPECT_RATIOS)")
    if sa.offset != ta.offset:
        problems.append(f"MODEL.ANCHOR_GENERATOR.OFFSET (student {sa.offset}, teacher {ta.offset})")
    s_div, t_div = student.backbone.size_divisibility, teacher.backbone.size_divisibility
    if s_div != t_div:
        # Each model pads its batch to its backbone's size divisibility: other grids.
        problems.append(f"the backbones' size divisibility (student {s_div}, teacher {t_div})")
    s_cls, t_cls = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if s_cls != t_cls:
        problems.append(f"the classes (student {s_cls}, teacher {t_cls})")
    return problems


def dense_outputs(
    model: nn.Module, predictions, dims: Sequence[int], names: Sequence[str]
) -> Dict[str, torch.Tensor]:
    """A dense head's per-level outputs as (N, R, K) tensors, R = every level's predictions in
    the anchor generator's order (the layout of the detector's own losses).

    Args:
        model: a detectron2 ``DenseDetector``.
        predictions: its head's outputs (one list of per-level tensors per output).
        dims: the last dimension of each output (classes, 4, ...).
        names: a name for each output.
    """
    per_level = model._transpose_dense_predictions(predictions, list(dims))
    return {name: cat(p, dim=1) for name, p in zip(names, per_level)}


def decode_at(
    transform, deltas: torch.Tensor, anchors: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """(N, T, 4) boxes: the (N, R, 4) deltas decoded on the (R, 4) anchors shared by the batch,
    at the (N, T) predictions ``index`` only (decoding is row by row: the same values as decoding
    all and picking them)."""
    deltas = deltas.gather(1, index[..., None].expand(-1, -1, 4))
    boxes = transform.apply_deltas(deltas.reshape(-1, 4), anchors[index].reshape(-1, 4))
    return boxes.view_as(deltas)


def matcher_foreground(matcher: Matcher, gi_boxes: List[Boxes], anchors: Boxes) -> torch.Tensor:
    """(N, R) bool: the anchors ``matcher`` labels foreground (1) in each image, GI boxes as its
    ground truth; detectron2's :class:`Matcher` (thresholds, labels, low-quality matches with ties)
    for every image of the batch at once instead of one call per image.

    Args:
        matcher: the detector's own anchor matcher.
        gi_boxes: N ``Boxes``, the GI boxes of each image (any number, also none).
        anchors: the R anchors shared by the batch.
    """
    n, r = len(gi_boxes), len(anchors)
    m = max((len(b) for b in gi_boxes), default=0)
    a = anchors.tensor
    if m == 0:  # no ground truth anywhere: every anchor gets the first label, as in Matcher
        return torch.full((n, r), matcher.labels[0] == 1, dtype=torch.bool, device=a.device)
    gt = a.new_zeros((n, m, 4))
    valid = torch.zeros((n, m), dtype=torch.bool, device=a.device)
    for i, b in enumerate(gi_boxes):
        gt[i, : len(b)] = b.tensor
        valid[i, : len(b)] = True
    # detectron2's pairwise_iou, one GI box of every image at a time: (N, R) planes that stay in
    # cache, instead of an (N, M, R) tensor whose every temporary is fresh memory (5x slower per
    # operation on CPU). Its ``where(inter > 0, inter / union, 0)`` is left out: an anchor has an
    # area, so union > 0 and inter / union is already exactly 0 where inter is.
    ax1, ay1, ax2, ay2 = (c.contiguous() for c in a.unbind(dim=1))
    area = anchors.area()
    best = torch.full((n, r), float("-inf"), dtype=a.dtype, device=a.device)
    low_quality = torch.zeros((n, r), dtype=torch.bool, device=a.device)
    for j in range(m):
        gx1, gy1, gx2, gy2 = (c[:, None] for c in gt[:, j].unbind(dim=-1))  # (N, 1) each
        inter = torch.min(gx2, ax2).sub_(torch.max(gx1, ax1)).clamp_(min=0)
        inter.mul_(torch.min(gy2, ay2).sub_(torch.max(gy1, ay1)).clamp_(min=0))
        iou = inter.div_(((gx2 - gx1) * (gy2 - gy1) + area).sub_(inter))
        # A padding row (an image with fewer boxes) takes part in nothing.
        iou.masked_fill_(~valid[:, j, None], float("-inf"))
        torch.max(best, iou, out=best)
        if matcher.allow_low_quality_matches:
            # Each GI box's best anchors, ties included, become foreground.
            low_quality |= (iou == iou.max(dim=1, keepdim=True).values) & valid[:, j, None]
    # An image without boxes keeps -inf: the lowest bin, as Matcher labels an empty ground truth.
    labels = torch.ones((n, r), dtype=torch.int8, device=a.device)
    # masked_fill_, not labels[mask] = ...: the same values without waiting for the GPU.
    for label, low, high in zip(matcher.labels, matcher.thresholds[:-1], matcher.thresholds[1:]):
        labels.masked_fill_((best >= low) & (best < high), label)
    if matcher.allow_low_quality_matches:
        labels.masked_fill_(low_quality, 1)
    return labels == 1
