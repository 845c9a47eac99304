"""GID inside the detectors, on hand-built cases: which anchors / locations / FPN levels a GI box
selects, instance selection on real dense outputs, and the construction-time checks.

No dataset and no trained weights: tiny models are built from the kd_shapes configs (64 px).
GISM and the pure losses are covered by tests/test_losses_gid.py.
"""

import pytest
import torch
from conftest import build_cfg

# Narrow ResNet-18 FPN models on 64 px images (the teacher wider, so the adapter maps channels).
TINY = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
]  # fmt: skip
# One square anchor per location (sizes 8..128 on P2-P6): every IoU below is easy to verify.
SQUARE_ANCHORS = [
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]",
]  # fmt: skip
GID_56 = ["KD.GID.CANONICAL_BOX_SIZE", "56"]


def _pair(family: str, *extra: str):
    """A GID distiller built from parts (no checkpoint): tiny student (FPN 32), teacher (FPN 64)."""
    from detectron2.modeling import build_model

    from kd.meta_arch.gid import GIDFCOSDistiller, GIDRetinaNetDistiller
    from kd.meta_arch.gid_rcnn import GIDFasterRCNNDistiller
    from kd.meta_arch.gid_terms import GeneralInstanceDistillation
    from kd.teacher import freeze

    torch.manual_seed(0)
    s_cfg = build_cfg(
        f"configs/kd_shapes/{family}_student.yaml", [*TINY, "MODEL.FPN.OUT_CHANNELS", "32", *extra]
    )
    t_cfg = build_cfg(
        f"configs/kd_shapes/{family}_teacher.yaml", [*TINY, "MODEL.FPN.OUT_CHANNELS", "64", *extra]
    )
    student, teacher = build_model(s_cfg), freeze(build_model(t_cfg))
    if family == "faster_rcnn":
        cls, in_features = GIDFasterRCNNDistiller, student.roi_heads.box_in_features
        chen_off = dict(
            rpn_soft_cls=False, rpn_bounded_reg=False, rcn_soft_cls=False, rcn_bounded_reg=False
        )
    else:
        cls = GIDRetinaNetDistiller if family == "retinanet" else GIDFCOSDistiller
        in_features, chen_off = student.head_in_features, {}
    gid = GeneralInstanceDistillation(
        s_cfg,
        in_features=in_features,
        student_shapes=student.backbone.output_shape(),
        teacher_shapes=teacher.backbone.output_shape(),
    )
    return cls(
        student=student,
        teacher=teacher,
        teacher_input_format="BGR",
        student_input_format="BGR",
        gid=gid,
        **chen_off,
    )


def _anchors(model, size=64):
    """The dense layout's anchors (or FCOS points) for a size x size input, per level."""
    strides = model.anchor_generator.strides
    feats = [torch.zeros(1, 1, max(1, -(-size // s)), max(1, -(-size // s))) for s in strides]
    return model.anchor_generator(feats)


def _boxes(*rows):
    from detectron2.structures import Boxes

    return Boxes(torch.tensor(rows, dtype=torch.float32))


# ---------------------------------------------------------------- response masks


def test_retinanet_mask_uses_the_anchor_matcher():
    distiller = _pair("retinanet", *SQUARE_ANCHORS, *GID_56)
    anchors = _anchors(distiller.student, size=128)  # P2 32x32, P3 16x16, P4 8x8, P5 4x4, P6 2x2
    # Anchors are centred on multiples of their stride (offset 0). GI box 0 is the P3 anchor
    # centred at (48, 48): IoU 1 with it, 0.25 or less with any other, so only that anchor passes
    # (IoU >= 0.5). GI box 1 overlaps no anchor by 0.4 or more: its best IoU, 144 / 368, is shared
    # by the four P3 anchors centred at (8 or 16, 8 or 16), and the matcher's low-quality rule
    # makes every tied best anchor foreground. In image 1, the P4 anchor centred at (32, 32).
    gi = [_boxes([40, 40, 56, 56], [4, 4, 20, 20]), _boxes([16, 16, 48, 48])]
    mask = distiller.response_mask(anchors, gi, [(128, 128)] * 2)

    def p3(row, col):  # after all P2 anchors
        return 32 * 32 + row * 16 + col

    p4_32_32 = 32 * 32 + 16 * 16 + (2 * 8 + 2)
    assert mask.shape == (2, sum(len(a) for a in anchors))
    assert torch.nonzero(mask[0]).flatten().tolist() == [
        p3(1, 1),
        p3(1, 2),
        p3(2, 1),
        p3(2, 2),
        p3(6, 6),
    ]
    assert torch.nonzero(mask[1]).flatten().tolist() == [p4_32_32]


def test_fcos_mask_inside_and_fcos_rule():
    distiller = _pair("fcos", *GID_56)
    # FCOS's points sit at the cell centres, (k + 0.5) * stride: at 64 px, P3 is 8 x 8 points at
    # 4, 12, ..., 60 and P4 4 x 4 points at 8, 24, 40, 56.
    anchors = _anchors(distiller.student)
    gi = [_boxes([2, 2, 46, 14])]  # centre (24, 8)
    # "inside": every point strictly inside the box. P3: x in 4..44 (6 columns) on rows y = 4, 12;
    # P4: x in 8, 24, 40 on row y = 8.
    mask = distiller.response_mask(anchors, gi, [(64, 64)])
    p3_inside = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert torch.nonzero(mask[0]).flatten().tolist() == p3_inside + [64, 65, 66]
    # FCOS's own rule adds the centre sampling radius (1.5 strides = 12 px on P3: only x = 20,
    # 28) and the scale range of each level (the P4 points are at most 38 px from the box's
    # edges, below P4's range of 64-128 px).
    distiller.gid.fcos_assignment = "fcos"
    mask = distiller.response_mask(anchors, gi + [_boxes()], [(64, 64)] * 2)
    assert torch.nonzero(mask[0]).flatten().tolist() == [2, 3, 10, 11]
    assert not mask[1].any()  # an image without GIs selects nothing


def test_faster_rcnn_mask_uses_the_rpn_matcher_on_rpn_anchors():
    distiller = _pair("faster_rcnn", *GID_56)
    rpn = distiller.student.proposal_generator
    strides = rpn.anchor_generator.strides
    anchors = rpn.anchor_generator([torch.zeros(1, 1, 64 // s or 1, 64 // s or 1) for s in strides])
    flat = torch.cat([a.tensor for a in anchors])
    # The 16 x 16 square anchor of P3 (stride 8, anchors at multiples of it) centred at (16, 16):
    # row 2, column 2, 3 ratios per location of which 1.0 is the middle one. Every other anchor
    # has IoU < 0.7 with it (the same centre with ratio 0.5: 0.55).
    gi = _boxes([8, 8, 24, 24])
    expected = 16 * 16 * 3 + (2 * 8 + 2) * 3 + 1
    mask = distiller.response_mask(anchors, [gi])
    assert torch.nonzero(mask[0]).flatten().tolist() == [expected]
    assert flat[expected].tolist() == [8, 8, 24, 24]


# ---------------------------------------------------------------- feature level + selection


def test_feature_level_assignment_and_pooling():
    distiller = _pair("retinanet", *GID_56)
    gid = distiller.gid
    assert gid.in_features == ["p2", "p3", "p4", "p5", "p6"]
    # detectron2's rule, canonical 56 px -> P4: floor(4 + log2(sqrt(area) / 56)), clamped to
    # P2..P6; level indices count from P2.
    sizes = [5, 28, 55, 56, 112, 300]
    boxes = _boxes(*[[0, 0, s, s] for s in sizes])
    assert gid.levels_of([boxes]).tolist() == [0, 1, 1, 2, 3, 4]
    # ROIAlign reads the assigned level: give each level a constant value, its level index.
    feats = {
        f: torch.full((1, 32, 128 // s, 128 // s), float(i))
        for i, (f, s) in enumerate(zip(gid.in_features, [4, 8, 16, 32, 64]))
    }
    pooled = gid.pooler([feats[f] for f in gid.in_features], [boxes])
    assert pooled.shape == (len(sizes), 32, 10, 10)
    assert torch.allclose(pooled.amax(dim=(1, 2, 3)), torch.tensor([0.0, 1, 1, 2, 3, 4]))


def test_per_level_adapters_each_get_gradients():
    distiller = _pair("retinanet", *GID_56, "KD.GID.ADAPTER", "per_level")
    gid = distiller.gid
    assert len(gid.adapters) == 5
    boxes = _boxes([0, 0, 20, 20], [0, 0, 60, 60], [0, 0, 120, 120])
    s_feats = {
        f: torch.randn(1, 32, 128 // s, 128 // s, requires_grad=True)
        for f, s in zip(gid.in_features, [4, 8, 16, 32, 64])
    }
    t_feats = {
        f: torch.randn(1, 64, 128 // s, 128 // s)
        for f, s in zip(gid.in_features, [4, 8, 16, 32, 64])
    }
    losses = gid.feature_losses(s_feats, t_feats, [boxes])
    assert set(losses) == {"loss_kd_gid_feature", "loss_kd_gid_relation"}
    sum(losses.values()).backward()
    used = gid.levels_of([boxes]).tolist()
    assert used == [0, 2, 3]  # P2, P4, P5
    for level, adapter in enumerate(gid.adapters):
        has_grad = adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
        assert has_grad == (level in used)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_fast_roi_align_gradient_equals_torchvision(aligned, sampling_ratio):
    """kd.roi_align's ROIAlign: torchvision's forward to the bit, and the input gradient of
    torchvision's own backward (up to float rounding), on rois of every size, also partly or
    wholly outside the map and degenerate, in float32 and float64."""
    from detectron2.layers import ROIAlign
    from torchvision.ops import roi_align

    from kd.roi_align import ROIAlignFastGrad, with_fast_roi_align_grad

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 5, 12, 17, dtype=dtype, generator=gen)
        # Image coordinates at scale 1/4: the map covers 68 x 48.
        xy = torch.rand(60, 2, generator=gen) * torch.tensor([90.0, 64]) - torch.tensor([10, 8])
        wh = torch.rand(60, 2, generator=gen) ** 3 * torch.tensor([80.0, 60])
        boxes = torch.cat([xy, xy + wh], dim=1)
        boxes[0] = torch.tensor([10.0, 10, 10, 30])  # zero width
        boxes[1] = torch.tensor([-30.0, -30, -20, -20])  # outside the map
        rois = torch.cat([torch.randint(3, (60, 1), generator=gen), boxes], dim=1).to(dtype)
        grad = torch.randn(60, 5, 3, 4, dtype=dtype, generator=gen)
        expected = {}
        for name, layer in (
            ("torchvision", ROIAlign((3, 4), 0.25, sampling_ratio, aligned)),
            ("fast", ROIAlignFastGrad((3, 4), 0.25, sampling_ratio, aligned)),
        ):
            inp = x.clone().requires_grad_()
            out = layer(inp, rois)
            out.backward(grad)
            expected[name] = (out.detach(), inp.grad)
        ref = roi_align(x, rois, (3, 4), 0.25, sampling_ratio, aligned)
        assert torch.equal(expected["fast"][0], ref)
        assert torch.equal(expected["torchvision"][0], ref)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(
            expected["fast"][1], expected["torchvision"][1], rtol=tol, atol=tol
        )
    # Only detectron2's ROIAlign layers are replaced, with the same settings.
    layers = with_fast_roi_align_grad(torch.nn.ModuleList([ROIAlign((3, 4), 0.5, 0, aligned)]))
    assert type(layers[0]) is ROIAlignFastGrad
    assert (layers[0].output_size, layers[0].spatial_scale, layers[0].aligned) == (
        (3, 4),
        0.5,
        aligned,
    )


def test_gid_pooler_gradient_equals_detectron2_pooler():
    """GID's pooler (the fast-gradient ROIAlign) against detectron2's own ROIPooler of the same
    settings: equal pooled features, and equal gradients of every FPN level."""
    from detectron2.modeling.poolers import ROIPooler

    gid = _pair("retinanet", *GID_56).gid
    ref = ROIPooler(
        output_size=10,
        scales=[1 / s for s in (4, 8, 16, 32, 64)],
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
        canonical_box_size=56,
    )
    torch.manual_seed(0)
    feats = [torch.randn(2, 32, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    boxes = [_boxes([0, 0, 20, 20], [3, 5, 60, 70], [10, 0, 128, 100]), _boxes([7, 9, 30, 27])]
    results = []
    for pooler in (gid.pooler, ref):
        inputs = [f.clone().requires_grad_() for f in feats]
        out = pooler(inputs, boxes)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append((out.detach(), [i.grad for i in inputs]))
    assert torch.equal(results[0][0], results[1][0])
    for fast, expected in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[4, 4, 4], [4, 2, 5, 3]])
def test_relation_loss_is_the_mean_over_images_with_enough_instances(counts):
    """Equal counts take the batched pass, unequal ones the per-image one: both are the mean of
    each image's own relation loss (computed here with torch.cdist) over images with >= 3 GIs."""
    import torch.nn.functional as F

    gid = _pair("retinanet", *GID_56).gid
    torch.manual_seed(0)
    student = torch.randn(sum(counts), 3, 2, 2, dtype=torch.float64)
    teacher = torch.randn(sum(counts), 5, 2, 2, dtype=torch.float64)

    def normalised(x):
        d = torch.cdist(x.flatten(1), x.flatten(1))
        return d / (d.sum() / (len(x) ** 2 - len(x)))

    expected = [
        F.smooth_l1_loss(normalised(s), normalised(t), reduction="sum") / (len(s) ** 2 - len(s))
        for s, t in zip(student.split(counts), teacher.split(counts))
        if len(s) >= 3
    ]
    got = gid.relation_loss(student, teacher, counts)
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-9)
    assert gid.relation_loss(student[:4], teacher[:4], [2, 2]).item() == 0.0


def test_selection_clips_and_drops_boxes_outside_the_image():
    distiller = _pair("retinanet", *GID_56)
    t_probs = torch.tensor([[[0.9], [0.8], [0.1]]])
    s_probs = torch.tensor([[[0.1], [0.1], [0.7]]])
    # Prediction 0 is the best, but its (teacher's) box lies outside the 64 x 64 image.
    t_boxes = torch.tensor([[[70.0, 70, 90, 90], [50, 50, 80, 80], [0, 0, 10, 10]]])
    s_boxes = torch.tensor([[[0.0, 0, 5, 5], [0, 0, 5, 5], [0, 0, 30, 30]]])
    (boxes,) = distiller.gid.selector.select(t_probs, s_probs, t_boxes, s_boxes, [(64, 64)])
    assert boxes.tensor.tolist() == [[50, 50, 64, 64], [0, 0, 30, 30]]


@pytest.mark.parametrize("agreeing", [False, True])
@pytest.mark.parametrize("candidates", [10, 40, 200, 999, 5000])
def test_selection_among_the_best_candidates_equals_selection_among_all(
    candidates, agreeing, monkeypatch
):
    """GISM first selects among each image's best-scoring predictions (GeneralInstanceSelector
    .candidates), decoding only their boxes, and over all predictions when that cannot decide:
    the GI boxes are those of the selection over every prediction (written out here as it ran
    before), to the bit, with ties in the scores and boxes lying outside the image."""
    from detectron2.modeling.box_regression import Box2BoxTransform

    from kd.families.dense import decode_at
    from kd.points.gism import select_general_instances_batched

    gid = _pair("retinanet", *GID_56).gid.selector
    gen = torch.Generator().manual_seed(3)
    n, r = 3, 1000
    t_probs = torch.rand(n, r, 2, generator=gen)
    s_probs = torch.rand(n, r, 2, generator=gen)
    # Equal scores: a block of exact ties (also across the candidates' boundary), and maybe an
    # image whose predictions nearly all agree (score 0), which needs every prediction.
    t_probs[0, 100:400] = s_probs[0, 100:400] + 0.25
    if agreeing:
        t_probs[2, 20:] = s_probs[2, 20:]
    xy = torch.rand(r, 2, generator=gen) * 120 - 20
    anchors = torch.cat([xy, xy + 4 + torch.rand(r, 2, generator=gen) * 40], dim=1)
    transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    t_deltas = torch.randn(n, r, 4, generator=gen) * 0.3
    s_deltas = torch.randn(n, r, 4, generator=gen) * 0.3
    sizes = [(64, 96), (80, 80), (64, 64)]

    # Before: every box decoded, clipped, and GISM over all of them.
    def decode_all(deltas):
        return transform.apply_deltas(deltas.reshape(-1, 4), anchors.repeat(n, 1)).view(n, r, 4)

    upper = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32)[:, None]
    expected = select_general_instances_batched(
        t_probs,
        s_probs,
        torch.min(decode_all(t_deltas).clamp(min=0), upper),
        torch.min(decode_all(s_deltas).clamp(min=0), upper),
        top_k=gid.top_k,
        nms_iou=gid.nms_thresh,
    )
    gid.candidates = candidates
    passes = []
    select_at = type(gid)._select_at

    def spy(self, index, *args):
        passes.append(None if index is None else index.shape[1])
        return select_at(self, index, *args)

    monkeypatch.setattr(type(gid), "_select_at", spy)
    lazy = gid.select(
        t_probs,
        s_probs,
        lambda index: decode_at(transform, t_deltas, anchors, index),
        lambda index: decode_at(transform, s_deltas, anchors, index),
        sizes,
    )
    eager = gid.select(t_probs, s_probs, decode_all(t_deltas), decode_all(s_deltas), sizes)
    for (boxes, _, _), got, got_eager in zip(expected, lazy, eager):
        assert len(boxes) == gid.top_k
        assert torch.equal(got.tensor, boxes) and torch.equal(got_eager.tensor, boxes)
    # Among the best 200 the selection is decided, unless an image's scores are nearly all 0:
    # then 4 x 200, then all of them.
    if candidates == 200:
        assert passes == ([200, 800, None] * 2 if agreeing else [200] * 2)
    if candidates >= r:
        assert passes == [None] * 2


# ---------------------------------------------------------------- construction checks


def test_different_dense_layouts_are_refused():
    from detectron2.modeling import build_model

    from kd.meta_arch.gid import GIDRetinaNetDistiller
    from kd.teacher import freeze

    distiller = _pair("retinanet", *GID_56)
    t_cfg = build_cfg(
        "configs/kd_shapes/retinanet_teacher.yaml",
        [*TINY, "MODEL.FPN.OUT_CHANNELS", "64", *SQUARE_ANCHORS],
    )
    with pytest.raises(ValueError, match="same dense layout"):
        GIDRetinaNetDistiller(
            student=distiller.student,
            teacher=freeze(build_model(t_cfg)),
            teacher_input_format="BGR",
            student_input_format="BGR",
            gid=distiller.gid,
        )
    with pytest.raises(ValueError, match="needs a RetinaNet teacher"):
        GIDRetinaNetDistiller(
            student=distiller.student,
            teacher=_pair("fcos").teacher,
            teacher_input_format="BGR",
            student_input_format="BGR",
            gid=distiller.gid,
        )


def test_one_distiller_for_every_dense_family_and_a_line_for_the_others():
    """GIDDistiller takes RetinaNet, FCOS and Faster R-CNN pairs (their dense views); a pair of
    two families, or a family without dense predictions (DETR), is refused in one line."""
    from detectron2.modeling import build_model

    from kd.families.dense import FCOSView, RetinaNetView
    from kd.families.rcnn import RPNView
    from kd.meta_arch.gid import GIDDistiller
    from kd.teacher import freeze

    pairs = {f: _pair(f, *GID_56) for f in ("retinanet", "fcos", "faster_rcnn")}

    def build(student, teacher, gid):
        return GIDDistiller(
            student=student,
            teacher=teacher,
            teacher_input_format="BGR",
            student_input_format="BGR",
            gid=gid,
        )

    for family, view in (
        ("retinanet", RetinaNetView),
        ("fcos", FCOSView),
        ("faster_rcnn", RPNView),
    ):
        p = pairs[family]
        views = build(p.student, p.teacher, p.gid).views
        assert [type(v) for v in views] == [view, view]
        assert views[0].model is p.student and views[1].model is p.teacher
    r, f = pairs["retinanet"], pairs["fcos"]
    with pytest.raises(ValueError, match="needs one family; got a RetinaNet student and a FCOS"):
        build(r.student, f.teacher, r.gid)
    detr = freeze(build_model(build_cfg("configs/kd_shapes/detr_teacher.yaml", TINY)))
    with pytest.raises(ValueError) as e:
        build(detr, detr, r.gid)
    assert "\n" not in str(e.value)
    assert "the student (DETR) does not make; families that do: FCOS, Faster R-CNN, RetinaNet" in (
        str(e.value)
    )


@pytest.mark.parametrize(
    "thresholds, low_quality", [([0.4, 0.5], True), ([0.3, 0.7], True), ([0.4, 0.5], False)]
)
def test_batched_matcher_equals_detectron2_matcher_per_image(thresholds, low_quality):
    """matcher_foreground (one batched pass) against detectron2's Matcher called per image."""
    from detectron2.modeling.matcher import Matcher
    from detectron2.structures import Boxes, pairwise_iou

    from kd.families.dense import matcher_foreground

    g = torch.Generator().manual_seed(0)

    def boxes(n, grid=False):
        if grid:  # anchors on a grid: many exact IoU ties, as with real anchors
            xy = torch.stack(torch.meshgrid(torch.arange(0.0, 64, 4), torch.arange(0.0, 64, 4)))
            xy = xy.reshape(2, -1).T
            return Boxes(torch.cat([xy - 6, xy + 6], dim=1))
        xy = torch.rand(n, 2, generator=g) * 60
        return Boxes(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 2], dim=1))

    anchors = boxes(0, grid=True)
    matcher = Matcher(thresholds, [0, -1, 1], allow_low_quality_matches=low_quality)
    gi = [boxes(10), boxes(3), Boxes(torch.zeros(0, 4)), boxes(7)]
    got = matcher_foreground(matcher, gi, anchors)
    for i, b in enumerate(gi):
        expected = matcher(pairwise_iou(b, anchors))[1] == 1
        assert torch.equal(got[i], expected), i
    assert got[0].any() and not got[2].any()
    assert not matcher_foreground(matcher, [Boxes(torch.zeros(0, 4))] * 2, anchors).any()
