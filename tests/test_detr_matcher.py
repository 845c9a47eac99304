"""The DETR family's Hungarian matcher against brute force, and its cost by hand."""

import itertools
import math

import pytest
import torch

from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from kd.modeling.detr.matcher import HungarianMatcher


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], 1)


def _brute_force(cost: torch.Tensor):
    """The cheapest injective assignment of targets (columns) to predictions (rows)."""
    num_preds, num_targets = cost.shape
    best, best_rows = math.inf, None
    for rows in itertools.permutations(range(num_preds), num_targets):
        total = sum(cost[r, c].item() for c, r in enumerate(rows))
        if total < best:
            best, best_rows = total, rows
    return best, best_rows


@pytest.mark.parametrize("num_targets", [0, 1, 3, 4])
def test_matcher_equals_brute_force(num_targets):
    generator = torch.Generator().manual_seed(num_targets)
    matcher = HungarianMatcher()
    batch, num_preds, num_classes = 2, 5, 3
    logits = torch.randn(batch, num_preds, num_classes, generator=generator)
    boxes = torch.stack([_random_boxes(num_preds, generator) for _ in range(batch)])
    targets = [
        {
            "labels": torch.randint(0, num_classes, (num_targets,), generator=generator),
            "boxes": _random_boxes(num_targets, generator),
        }
        for _ in range(batch)
    ]
    indices = matcher(logits, boxes, targets)
    for b, (rows, cols) in enumerate(indices):
        assert len(rows) == len(cols) == num_targets
        if num_targets == 0:
            continue
        cost = matcher.cost_matrix(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
        best, best_rows = _brute_force(cost)
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)
        # Random costs have a unique optimum: the assignment itself matches.
        assert {(int(r), int(c)) for r, c in zip(rows, cols)} == {
            (r, c) for c, r in enumerate(best_rows)
        }


def test_cost_matrix_by_hand():
    # One prediction with class probabilities (0.8, 0.2) and one target of class 0.
    logits = torch.tensor([[math.log(4.0), math.log(0.25)]])
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    cost = matcher.cost_matrix(logits, pred, torch.tensor([0]), target)
    p = 0.8
    focal = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    l1 = 0.2 + 0.2  # only the sizes differ
    giou = 0.04 / 0.16  # nested boxes: GIoU = IoU
    assert cost.item() == pytest.approx(2 * focal + 5 * l1 - 2 * giou, abs=1e-5)


def test_generalized_box_iou_disjoint_boxes():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    # IoU 0, hull 3, union 2: GIoU = 0 - (3 - 2) / 3.
    assert generalized_box_iou(a, b).item() == pytest.approx(-1.0 / 3.0)
    xyxy = box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    assert generalized_box_iou(xyxy, a).item() == pytest.approx(1.0)
