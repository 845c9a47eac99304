"""The DETR family's set losses and denoising queries, on cases computed by hand."""

import math

import pytest
import torch

from kd.modeling.detr.box_ops import box_cxcywh_to_xyxy
from kd.modeling.detr.criterion import SetCriterion
from kd.modeling.detr.denoising import DenoisingQueries
from kd.modeling.detr.matcher import HungarianMatcher
from kd.modeling.detr.structures import DecoderOutput, DETRDetections


def _focal(p: float, positive: bool, alpha: float = 0.25, gamma: float = 2.0) -> float:
    if positive:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def _criterion() -> SetCriterion:
    return SetCriterion(num_classes=2, matcher=HungarianMatcher())


def test_set_losses_by_hand():
    # Query 0 (probabilities 0.5, 0.75) is matched to the target of class 1; query 1
    # (probabilities 0.25, 0.5) is background.
    logits = torch.tensor([[[0.0, math.log(3.0)], [-math.log(3.0), 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    losses = _criterion().set_losses(logits, boxes, targets, indices, num_boxes=1.0)
    focal = _focal(0.5, False) + _focal(0.75, True) + _focal(0.25, False) + _focal(0.5, False)
    assert losses["loss_class"].item() == pytest.approx(2.0 * focal, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * 0.4, rel=1e-5)
    # Nested boxes: GIoU = IoU = 0.04 / 0.16.
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (1 - 0.25), rel=1e-5)
    half = _criterion().set_losses(logits, boxes, targets, indices, num_boxes=2.0)
    for name, value in losses.items():
        assert half[name].item() == pytest.approx(value.item() / 2, rel=1e-6)


def test_criterion_names_every_layer_and_normalises_by_boxes():
    torch.manual_seed(0)
    layers, batch, queries = 3, 2, 4
    outputs = DecoderOutput(
        logits=torch.randn(layers, batch, queries, 2),
        boxes=torch.rand(layers, batch, queries, 4) * 0.5 + 0.25,
        hidden=torch.zeros(layers, batch, queries, 8),
    )
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2)},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.6, 0.3, 0.3]])},
    ]
    criterion = _criterion()
    losses = criterion(DETRDetections(queries=outputs), targets)
    expected = {f"loss_{t}{s}" for t in ("class", "bbox", "giou") for s in ("", "_0", "_1")}
    assert set(losses) == expected
    # The last layer's losses equal set_losses under the matcher's assignment, over 3 boxes.
    logits, boxes = outputs.logits[-1], outputs.boxes[-1]
    direct = criterion.set_losses(
        logits, boxes, targets, criterion.matcher(logits, boxes, targets), 3.0
    )
    for name, value in direct.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-6)


def _targets():
    return [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.6, 0.2, 0.1]])},
    ]


def test_denoising_layout_and_noise_bounds():
    torch.manual_seed(0)
    dn = DenoisingQueries(
        num_classes=3,
        d_model=8,
        nheads=2,
        max_queries=8,
        label_noise_ratio=0.0,
        box_noise_scale=1.0,
    )
    targets = _targets()
    content, anchors, valid, meta = dn(targets)
    # Most GT in an image: 2, so groups of 4 (2 positives, 2 negatives) and 8 // 4 = 2 groups.
    assert (meta.num_groups, meta.group_size, meta.num_queries) == (2, 4, 8)
    assert content.shape == (3, 8, 8) and anchors.shape == (3, 8, 4)
    positives = meta.positive_indices()
    assert positives[0][0].tolist() == [0, 1, 4, 5] and positives[0][1].tolist() == [0, 1, 0, 1]
    assert positives[1][0].numel() == 0
    assert positives[2][0].tolist() == [0, 4] and positives[2][1].tolist() == [0, 0]
    assert valid[0].all() and not valid[1].any()
    assert valid[2].tolist() == [True, False, True, False] * 2

    for b, target in ((0, targets[0]), (2, targets[2])):
        n = len(target["labels"])
        for g in range(meta.num_groups):
            for j in range(n):
                gt = target["boxes"][j]
                half = torch.cat([gt[2:], gt[2:]]) / 2
                for slot, low, high in ((g * 4 + j, 0.0, 1.0), (g * 4 + 2 + j, 1.0, 2.0)):
                    shift = (box_cxcywh_to_xyxy(anchors[b, slot]) - box_cxcywh_to_xyxy(gt)).abs()
                    assert ((shift >= low * half - 1e-6) & (shift <= high * half + 1e-6)).all()
                    # Without label noise the content is the GT label's embedding.
                    expected = dn.label_embed.weight[target["labels"][j]]
                    assert torch.equal(content[b, slot], expected)


def test_denoising_attention_mask():
    dn = DenoisingQueries(
        num_classes=3,
        d_model=8,
        nheads=2,
        max_queries=8,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
    )
    _, _, valid, meta = dn(_targets())
    num_matching = 3
    mask = dn.attention_mask(meta, valid, num_matching)
    total = meta.num_queries + num_matching
    assert mask.shape == (3 * 2, total, total)
    per_image = mask.view(3, 2, total, total)
    assert torch.equal(per_image[:, 0], per_image[:, 1])  # the same for every head
    m = per_image[0, 0]
    # Detection queries see each other, never a denoising query.
    assert m[8:, 8:].logical_not().all() and m[8:, :8].all()
    # Denoising groups see themselves and the detection queries only.
    assert m[:4, :4].logical_not().all() and m[:4, 4:8].all() and m[4:8, :4].all()
    assert m[:8, 8:].logical_not().all()
    # Padding slots (image 2, slots 1 and 3 of each group) are hidden from all but themselves.
    m2 = per_image[2, 0]
    for slot in (1, 3, 5, 7):
        assert m2[:, slot].sum() == total - 1 and not m2[slot, slot]
    assert not m2[0, 2] and not m2[2, 0]


def test_denoising_without_gt_gives_no_queries():
    dn = DenoisingQueries(
        num_classes=3,
        d_model=8,
        nheads=2,
        max_queries=8,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
    )
    assert dn([_targets()[1]]) is None
