"""Heterogeneous distillation (DETR <-> Faster R-CNN): the class-space maps by hand, the probes
against the models' own forward passes, the distillers' wiring, and both directions through
train_net.py with tiny models."""

import copy
import json
import math

import pytest
import torch
from conftest import (
    TINY_DETR_OPTS,
    TINY_RCNN_OPTS,
    build_cfg,
    run_train_net,
    save_untrained_teacher,
    teacher_opts,
    without_annotations,
)
from detectron2.modeling import build_model
from detectron2.structures import Boxes

from kd.losses.class_space import (
    convert_class_logits,
    sigmoid_logits_of,
    sigmoid_to_softmax_probs,
    softmax_logits_of,
    softmax_to_sigmoid_probs,
)
from kd.modeling.detr import QueryGroup, denormalize_boxes, normalize_boxes
from kd.points.batch import clip_points, pad_points
from kd.points.random import random_points
from kd.probes import ProbeAnswer, probe_detr, probe_rcnn

pytestmark = pytest.mark.usefixtures("one_thread", "event_storage")

DETR_TO_RCNN = "configs/kd_shapes/hetero_detr_to_faster_rcnn.yaml"
RCNN_TO_DETR = "configs/kd_shapes/hetero_faster_rcnn_to_detr.yaml"
TERMS = ("cls", "l1", "giou")

# Tiny two-stage DETRs with denoising (the kd_shapes family) on 64 px images.
TINY_DETR = [*TINY_DETR_OPTS, "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.NUM_QUERIES", "8"]
# Few random points keep the tiny runs fast.
FEW_POINTS = ["KD.HETERO.DETR_STUDENT.NUM_RANDOM_POINTS", "6"]


@pytest.fixture(scope="module")
def detr_teacher(datasets_root, tmp_path_factory):
    return save_untrained_teacher(
        tmp_path_factory.mktemp("hetero_detr_teacher"),
        "configs/kd_shapes/detr_teacher.yaml",
        [*TINY_DETR, "MODEL.DETR.DEC_LAYERS", "3", "MODEL.DETR.NUM_QUERIES", "10"],
        seed=1,
    )


@pytest.fixture(scope="module")
def rcnn_teacher(datasets_root, tmp_path_factory):
    opts = list(TINY_RCNN_OPTS)
    i = opts.index("MODEL.FPN.OUT_CHANNELS")
    opts[i + 1] = "48"  # wider than the tiny student, as the real teacher is
    return save_untrained_teacher(
        tmp_path_factory.mktemp("hetero_rcnn_teacher"),
        "configs/kd_shapes/faster_rcnn_teacher.yaml",
        opts,
        seed=2,
    )


def detr_to_rcnn(teacher, tmp_path, *extra):
    return build_model(
        build_cfg(DETR_TO_RCNN, [*TINY_RCNN_OPTS, *teacher_opts(teacher, tmp_path), *extra])
    )


def rcnn_to_detr(teacher, tmp_path, *extra):
    return build_model(
        build_cfg(RCNN_TO_DETR, [*TINY_DETR, *FEW_POINTS, *teacher_opts(teacher, tmp_path), *extra])
    )


@pytest.fixture(scope="module")
def batch(datasets_root):
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    cfg = build_cfg("configs/kd_shapes/faster_rcnn_student.yaml", TINY_RCNN_OPTS)
    mapper = DatasetMapper(cfg, True)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]
    torch.manual_seed(0)
    return [mapper(copy.deepcopy(d)) for d in dicts]


# ----------------------------------------------------------------------------- class spaces


def test_softmax_to_sigmoid_by_hand():
    # softmax of log([1, 2, 5]) = [0.125, 0.25, 0.625]; background (last) is dropped.
    logits = torch.tensor([1.0, 2.0, 5.0]).log()
    probs = softmax_to_sigmoid_probs(logits)
    torch.testing.assert_close(probs, torch.tensor([0.125, 0.25]))
    # As sigmoid logits: sigmoid of them gives the same probabilities back.
    z = convert_class_logits(logits, "softmax", "sigmoid")
    torch.testing.assert_close(z, torch.tensor([math.log(0.125 / 0.875), math.log(0.25 / 0.75)]))
    torch.testing.assert_close(z.sigmoid(), probs)


def test_sigmoid_to_softmax_by_hand():
    p = torch.tensor([0.6, 0.2])
    z = torch.logit(p)
    # "max": background 1 - 0.6 = 0.4; foreground 0.6 shared 3:1.
    torch.testing.assert_close(sigmoid_to_softmax_probs(z, "max"), torch.tensor([0.45, 0.15, 0.4]))
    # "prod": background 0.4 * 0.8 = 0.32; foreground 0.68 shared 3:1.
    torch.testing.assert_close(
        sigmoid_to_softmax_probs(z, "prod"), torch.tensor([0.51, 0.17, 0.32])
    )
    # As softmax logits: their softmax is the mapped distribution.
    out = convert_class_logits(z, "sigmoid", "softmax", "max")
    torch.testing.assert_close(out.softmax(-1), torch.tensor([0.45, 0.15, 0.4]))


@pytest.mark.parametrize("background", ["max", "prod"])
def test_class_maps_give_valid_distributions(background):
    torch.manual_seed(0)
    z = torch.randn(4, 5, 7) * 6  # includes very confident and very unconfident answers
    q = sigmoid_to_softmax_probs(z, background)
    assert q.shape == (4, 5, 8) and (q >= 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(4, 5))
    # The foreground order of the sigmoids is kept (where the foreground mass is not ~0).
    kept = q[..., :-1].sum(-1) > 1e-6
    p = z.sigmoid()
    assert torch.equal(q[..., :-1].argmax(-1)[kept], p.argmax(-1)[kept]) and kept.any()
    s = torch.randn(4, 5, 8) * 6
    p = softmax_to_sigmoid_probs(s)
    assert p.shape == (4, 5, 7) and (p >= 0).all() and (p.sum(-1) <= 1 + 1e-6).all()
    # Extreme and underflowing inputs stay finite.
    extreme = torch.tensor([[-200.0, -200.0], [50.0, -50.0]])
    q = sigmoid_to_softmax_probs(extreme, background)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q[0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.isfinite(softmax_logits_of(q)).all()
    assert torch.isfinite(sigmoid_logits_of(torch.tensor([0.0, 1.0]))).all()
    with pytest.raises(ValueError, match="background"):
        sigmoid_to_softmax_probs(z, "mean")
    assert convert_class_logits(z, "sigmoid", "sigmoid") is z


# ----------------------------------------------------------------------------- points


def test_points_clip_pad_and_random():
    pts = clip_points(torch.tensor([[0.9, 0.5, 0.4, 0.2]]))  # sticks out on the right
    torch.testing.assert_close(pts, torch.tensor([[0.85, 0.5, 0.3, 0.2]]))
    points, valid = pad_points([torch.rand(3, 4), torch.rand(1, 4)])
    assert points.shape == (2, 3, 4) and valid.tolist() == [[True] * 3, [True, False, False]]
    torch.testing.assert_close(points[1, 1:], torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2))
    for mode in ("sigmoid_normal", "uniform"):
        r = random_points(2, 50, mode=mode)
        assert r.shape == (2, 50, 4) and (r >= 0).all() and (r <= 1).all()
        torch.testing.assert_close(clip_points(r), r)


# ----------------------------------------------------------------------------- probes


def test_rcnn_probe_equals_box_head_in_a_normal_forward(batch):
    """The probe at the proposals the box head saw gives the box head's own outputs."""
    cfg = build_cfg("configs/kd_shapes/faster_rcnn_student.yaml", TINY_RCNN_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen = {}
    roi = model.roi_heads
    pooler = roi.box_pooler.register_forward_pre_hook(
        lambda m, args: seen.update(boxes=[b.tensor.clone() for b in args[1]])
    )
    predictor = roi.box_predictor.register_forward_hook(
        lambda m, args, out: seen.update(scores=out[0], deltas=out[1])
    )
    inputs = [{"image": x["image"]} for x in batch]
    with torch.no_grad():
        model(inputs)
        pooler.remove()
        predictor.remove()
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        m = min(len(b) for b in seen["boxes"])
        boxes = torch.stack([b[:m] for b in seen["boxes"]])
        answer = probe_rcnn(
            model, features, images.image_sizes, normalize_boxes(boxes, images.image_sizes)
        )
    n = len(seen["boxes"][0])
    scores = torch.stack([seen["scores"][:m], seen["scores"][n : n + m]])
    assert answer.class_space == "softmax" and answer.logits.shape == (1, 2, m, 8)
    torch.testing.assert_close(answer.logits[0], scores, atol=1e-4, rtol=1e-4)
    # Boxes: the predictor's deltas decoded on the same proposals, normalised and clipped.
    deltas = torch.stack([seen["deltas"][:m], seen["deltas"][n : n + m]])
    decoded = roi.box_predictor.box2box_transform.apply_deltas(
        deltas.flatten(0, 1), boxes.flatten(0, 1)
    ).view(2, m, 7, 4)
    h, w = images.image_sizes[0]
    decoded = decoded.clamp(min=0).minimum(torch.tensor([w, h, w, h]).float())
    expected = normalize_boxes(decoded.flatten(1, 2), images.image_sizes).view(2, m, 7, 4)
    assert answer.boxes.shape == (1, 2, m, 7, 4)
    torch.testing.assert_close(answer.boxes[0], expected, atol=1e-4, rtol=1e-4)
    # class_boxes picks each point's box of the requested class.
    classes = torch.randint(0, 7, (2, m))
    picked = answer.class_boxes(classes)[0]
    torch.testing.assert_close(picked[1, 3], answer.boxes[0, 1, 3, classes[1, 3]])


def test_probes_at_no_points(batch):
    """M = 0 points (no proposal to ask about) is an empty answer, not a crash."""
    rcnn = build_model(build_cfg("configs/kd_shapes/faster_rcnn_student.yaml", TINY_RCNN_OPTS))
    detr = build_model(build_cfg("configs/kd_shapes/detr_student.yaml", TINY_DETR))
    inputs = [{"image": x["image"]} for x in batch]
    none = torch.zeros(2, 0, 4)
    with torch.no_grad():
        images = rcnn.preprocess_image(inputs)
        answer = probe_rcnn(rcnn.eval(), rcnn.backbone(images.tensor), images.image_sizes, none)
        assert answer.logits.shape == (1, 2, 0, 8) and answer.boxes.shape == (1, 2, 0, 7, 4)
        encoded = detr.eval().encode(inputs)
        for isolation in ("point", "group"):
            answer = probe_detr(detr, encoded, none, isolation=isolation)
            assert answer.logits.shape == (2, 2, 0, 7), isolation


def test_detr_probe_equals_decoding_the_anchors():
    cfg = build_cfg("configs/kd_shapes/detr_student.yaml", TINY_DETR)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = [{"image": torch.rand(3, 64, 64) * 255}, {"image": torch.rand(3, 64, 48) * 255}]
    points = random_points(2, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = model.encode(inputs)
        group = probe_detr(model, encoded, points, isolation="group")
        reference = model.decode_groups(encoded, [QueryGroup(points)])[0]
        point = probe_detr(model, encoded, points, isolation="point")
        # "point" isolation = every point its own group.
        singles = model.decode_groups(encoded, [QueryGroup(points[:, i : i + 1]) for i in range(5)])
        # ... so adding points changes nothing about the others' answers.
        more = probe_detr(model, encoded, torch.cat([points, random_points(2, 3)], 1))
        anchor = probe_detr(model, encoded, points, content="anchor", isolation="group")
        anchor_ref = model.decode_groups(
            encoded, [QueryGroup(points, model.anchors_to_queries(points))]
        )[0]
    assert group.class_space == "sigmoid" and group.logits.shape == (2, 2, 5, 7)
    assert group.boxes.shape == (2, 2, 5, 1, 4)
    torch.testing.assert_close(group.logits, reference.logits)
    torch.testing.assert_close(group.boxes[..., 0, :], reference.boxes)
    torch.testing.assert_close(point.logits, torch.cat([s.logits for s in singles], 2))
    torch.testing.assert_close(point.boxes[..., 0, :], torch.cat([s.boxes for s in singles], 2))
    torch.testing.assert_close(more.logits[:, :, :5], point.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(anchor.logits, anchor_ref.logits)
    assert not torch.allclose(anchor.logits, group.logits)
    last = point.last()
    assert last.num_layers == 1 and torch.equal(last.class_boxes()[0], point.boxes[-1, ..., 0, :])


def test_detr_group_probe_hides_padding():
    """With isolation "group", a real point's answer is the answer to its image's real points
    alone: it does not change with how much, or with what, another image's set was padded."""
    cfg = build_cfg("configs/kd_shapes/detr_student.yaml", TINY_DETR)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = [{"image": torch.rand(3, 64, 64) * 255}, {"image": torch.rand(3, 64, 48) * 255}]
    g = torch.Generator().manual_seed(1)
    first, second = random_points(1, 3, generator=g)[0], random_points(1, 5, generator=g)[0]
    with torch.no_grad():
        encoded = model.encode(inputs)
        # Reference: each image decoded with exactly its real points (the other image's points
        # are in the same pass but never attend across images).
        alone_first = model.decode_groups(encoded, [QueryGroup(first.expand(2, -1, -1))])[0]
        alone_second = model.decode_groups(encoded, [QueryGroup(second.expand(2, -1, -1))])[0]
        points, valid = pad_points([first, second])  # the first image padded by 2
        answer = probe_detr(model, encoded, points, isolation="group", valid=valid)
        # More padding, and padding that is not the whole-image box.
        more = torch.cat([points, random_points(2, 4, generator=g)], 1)
        more_valid = torch.cat([valid, torch.zeros(2, 4, dtype=torch.bool)], 1)
        more_answer = probe_detr(model, encoded, more, isolation="group", valid=more_valid)
    for out in (answer, more_answer):
        torch.testing.assert_close(out.logits[:, 0, :3], alone_first.logits[:, 0])
        torch.testing.assert_close(out.boxes[:, 0, :3, 0], alone_first.boxes[:, 0])
        torch.testing.assert_close(out.logits[:, 1, :5], alone_second.logits[:, 1])
        torch.testing.assert_close(out.boxes[:, 1, :5, 0], alone_second.boxes[:, 1])
    # Without the mask the padding is attended to: the answers move (what was fixed).
    unmasked = probe_detr(model, encoded, more, isolation="group")
    assert not torch.allclose(unmasked.logits[:, 0, :3], alone_first.logits[:, 0], atol=1e-4)
    with pytest.raises(ValueError, match="valid"):
        probe_detr(model, encoded, points, isolation="group", valid=valid[:, :2])


def test_probe_gradients_reach_the_student_only_where_asked():
    cfg = build_cfg("configs/kd_shapes/detr_student.yaml", TINY_DETR)
    model = build_model(cfg).train()
    encoded = model.encode([{"image": torch.rand(3, 64, 64) * 255}])
    answer = probe_detr(model, encoded, random_points(1, 4))
    answer.logits.sum().backward()
    assert model.decoder.class_heads[-1].weight.grad is not None
    with pytest.raises(TypeError, match="DETR"):
        probe_detr(torch.nn.Linear(1, 1), encoded, random_points(1, 4))
    with pytest.raises(TypeError, match="R-CNN"):
        probe_rcnn(model, {}, [(64, 64)], random_points(1, 4))


def test_probe_answer_foreground_probs():
    logits = torch.zeros(1, 1, 2, 3)
    soft = ProbeAnswer(logits, torch.zeros(1, 1, 2, 1, 4), "softmax")
    assert soft.num_classes == 2
    torch.testing.assert_close(soft.foreground_probs(), torch.full((1, 1, 2, 2), 1 / 3))
    sig = ProbeAnswer(logits, torch.zeros(1, 1, 2, 1, 4), "sigmoid")
    assert sig.num_classes == 3
    torch.testing.assert_close(sig.foreground_probs(), torch.full((1, 1, 2, 3), 0.5))


# ----------------------------------------------------------------------------- distillers


def test_detr_to_rcnn_losses_student_unchanged_teacher_frozen(detr_teacher, tmp_path, batch):
    model = detr_to_rcnn(detr_teacher, tmp_path).train()
    torch.manual_seed(11)
    losses = model(batch)
    torch.manual_seed(11)
    plain = model.student(batch)
    for term in TERMS:
        assert torch.isfinite(losses[f"loss_kd_hetero_{term}"]), term
    # The student's own losses are exactly those of the student alone (same samples).
    for k, v in plain.items():
        assert losses[k].item() == pytest.approx(v.item(), rel=1e-5), k
    sum(losses.values()).backward()
    assert model.student.roi_heads.box_predictor.cls_score.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not any(k.startswith("teacher.") for k in model.state_dict())
    assert not model.teacher.training


@pytest.mark.parametrize("class_target", ["foreground", "full"])
def test_detr_to_rcnn_background_only_batch(detr_teacher, tmp_path, batch, class_target):
    """Images without any object (no foreground proposal): finite losses and gradients."""
    model = detr_to_rcnn(
        detr_teacher, tmp_path, "KD.HETERO.RCNN_STUDENT.CLASS_TARGET", class_target
    ).train()
    losses = model(without_annotations(batch, (0, 1)))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_detr_to_rcnn_options(detr_teacher, tmp_path, batch):
    model = detr_to_rcnn(
        detr_teacher,
        tmp_path,
        "KD.HETERO.RCNN_STUDENT.NUM_RANDOM_POINTS", "5",
        "KD.HETERO.RCNN_STUDENT.CLASS_TARGET", "full",
        "KD.HETERO.RCNN_STUDENT.DETR_ISOLATION", "point",
        "KD.HETERO.GIOU_WEIGHT", "0.0",
        "KD.STUDENT.INPUT_SCALE", "0.5",
    ).train()  # fmt: skip
    losses = model(batch)
    assert "loss_kd_hetero_giou" not in losses
    assert torch.isfinite(losses["loss_kd_hetero_cls"]) and torch.isfinite(
        losses["loss_kd_hetero_l1"]
    )
    with pytest.raises(ValueError, match="CLASS_TARGET"):
        detr_to_rcnn(detr_teacher, tmp_path, "KD.HETERO.RCNN_STUDENT.CLASS_TARGET", "all")


def test_rcnn_to_detr_losses_student_unchanged_teacher_frozen(rcnn_teacher, tmp_path, batch):
    model = rcnn_to_detr(rcnn_teacher, tmp_path).train()
    torch.manual_seed(11)
    losses = model(batch)
    torch.manual_seed(11)
    plain = model.student(batch)
    for term in TERMS:
        assert torch.isfinite(losses[f"loss_kd_hetero_{term}"]), term
    for k, v in plain.items():
        assert losses[k].item() == pytest.approx(v.item(), rel=1e-5), k
    losses["loss_kd_hetero_cls"].backward()
    assert model.student.decoder.class_heads[0].weight.grad.abs().sum() > 0  # every layer
    assert all(p.grad is None for p in model.teacher.parameters())
    model.eval()
    inputs = [{"image": x["image"], "height": 64, "width": 64} for x in batch]
    with torch.no_grad():
        a, b = model(inputs), model.student(inputs)
    assert torch.equal(a[0]["instances"].scores, b[0]["instances"].scores)


def test_detr_to_rcnn_point_decoding(detr_teacher, tmp_path, batch):
    """tools/benchmark_kd.py's hook: the closure decodes the KD step's points (the student's
    sampled proposals, then random boxes) with the teacher, and runs the student's box head at
    the random points only (its own training step already ran it at the proposals)."""
    model = detr_to_rcnn(
        detr_teacher, tmp_path, "KD.HETERO.RCNN_STUDENT.NUM_RANDOM_POINTS", "5"
    ).train()
    torch.manual_seed(5)
    decode = model.prepare_point_decoding(batch)
    assert callable(decode)
    with torch.no_grad():
        points, valid, teacher, student = decode()
    b, m, _ = points.shape
    assert b == 2 and valid.shape == (2, m) and valid[:, -5:].all()
    assert teacher.logits.shape == (1, 2, m, 7) and student.logits.shape == (1, 2, 5, 8)
    # The same points as a KD step from the same RNG state.
    probed = []
    probe = model._teacher_probe

    def recording(encoded, at, valid):
        probed.append(at)
        return probe(encoded, at, valid)

    model._teacher_probe = recording
    torch.manual_seed(5)
    model(batch)
    torch.testing.assert_close(probed[0], points)
    # The teacher's answer: its decoding of the points as one isolated group (DETR_ISOLATION).
    with torch.no_grad():
        encoded = model.teacher.encode(model.teacher_inputs(batch))
        expected = model.teacher.decode_groups(encoded, [QueryGroup(points)])[0]
    torch.testing.assert_close(teacher.logits[0], expected.logits[-1])
    torch.testing.assert_close(teacher.boxes[0, ..., 0, :], expected.boxes[-1])


def test_detr_to_rcnn_teacher_answers_ignore_padding(detr_teacher, tmp_path, batch):
    """The images' sampled proposals differ in number, so the shorter sets are padded; the
    teacher's answer at each image's proposals equals its decoding of those proposals alone."""
    # Every proposal sampled (512 > proposals + ground truth), so the counts differ per image.
    model = detr_to_rcnn(
        detr_teacher, tmp_path, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512"
    ).train()
    torch.manual_seed(5)
    with torch.no_grad():
        points, valid, teacher, _ = model.prepare_point_decoding(batch)()
        encoded = model.teacher.encode(model.teacher_inputs(batch))
        counts = valid.sum(1).tolist()
        assert counts[0] != counts[1], counts  # padding present
        for i, n in enumerate(counts):
            alone = model.teacher.decode_groups(encoded, [QueryGroup(points[:, :n])])[0]
            torch.testing.assert_close(teacher.logits[0, i, :n], alone.logits[-1, i])
            torch.testing.assert_close(teacher.boxes[0, i, :n, 0], alone.boxes[-1, i])


@pytest.mark.parametrize("class_target", ["foreground", "full"])
def test_detr_to_rcnn_loss_by_hand(detr_teacher, tmp_path, batch, class_target):
    """The three terms recomputed (float64) from the student's raw box-predictor outputs at its
    sampled proposals and the teacher's decoding of each image's proposals alone, with the
    KD-DETR loss, the class mapping and the box conversions written out here."""
    from torchvision.ops import generalized_box_iou

    T = 2.0
    cfg = build_cfg(
        DETR_TO_RCNN,
        [
            *TINY_RCNN_OPTS,
            *teacher_opts(detr_teacher, tmp_path),
            "KD.HETERO.RCNN_STUDENT.CLASS_TARGET", class_target,
            "KD.HETERO.RCNN_STUDENT.TEMPERATURE", str(T),
            # Every proposal sampled: the images' point counts differ (padding in the batch).
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512",
        ],
    )  # fmt: skip
    h = cfg.KD.HETERO
    assert h.RCNN_STUDENT.NORMALIZE == "weight_sum" and h.BACKGROUND == "max"
    torch.manual_seed(0)
    model = build_model(cfg).train()
    roi, rec = model.student.roi_heads, {}
    hook = roi.box_predictor.register_forward_hook(lambda m, a, out: rec.update(box=out))
    label = roi.label_and_sample_proposals

    def recorded(*args):
        rec["sampled"] = label(*args)
        return rec["sampled"]

    roi.label_and_sample_proposals = recorded
    try:
        torch.manual_seed(3)
        losses = model(batch)
    finally:
        hook.remove()
        del roi.label_and_sample_proposals

    sampled = rec["sampled"]
    assert len({len(p) for p in sampled}) == 2  # unequal counts
    scores, deltas = (x.detach().double() for x in rec["box"])
    K = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    wx, wy, ww, wh = cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS
    with torch.no_grad():
        encoded = model.teacher.encode(model.teacher_inputs(batch))
    kl, l1, giou, weight = [], [], [], []
    start = 0
    for i, p in enumerate(sampled):
        ih, iw = p.image_size
        size = torch.tensor([iw, ih, iw, ih], dtype=torch.float64)
        boxes = p.proposal_boxes.tensor.double()
        n = len(boxes)
        corners = (boxes / size).clamp(0, 1)
        points = torch.cat(
            [(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1
        )
        with torch.no_grad():
            alone = model.teacher.decode_groups(
                encoded, [QueryGroup(points.float()[None].expand(len(batch), -1, -1))]
            )[0]
        t_logits, t_boxes = alone.logits[-1, i].double(), alone.boxes[-1, i].double()
        s_logits = scores[start : start + n]
        top = t_logits.sigmoid().argmax(1)
        # The student's box for the teacher's top class: its deltas decoded on the proposal,
        # clipped to the image, normalised.
        d = deltas[start : start + n].view(n, K, 4)[torch.arange(n), top]
        pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        cx = boxes[:, 0] + 0.5 * pw + d[:, 0] / wx * pw
        cy = boxes[:, 1] + 0.5 * ph + d[:, 1] / wy * ph
        bw, bh = pw * torch.exp(d[:, 2] / ww), ph * torch.exp(d[:, 3] / wh)
        s_xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
        s_xyxy = (s_xyxy / size).clamp(0, 1)
        t_xyxy = torch.cat(
            [t_boxes[:, :2] - t_boxes[:, 2:] / 2, t_boxes[:, :2] + t_boxes[:, 2:] / 2], 1
        )
        if class_target == "foreground":
            # KL over the K object classes: the student's softmax without its background logit.
            p_t = torch.softmax(t_logits / T, 1)
            log_p_s = torch.log_softmax(s_logits[:, :K] / T, 1)
            w = t_logits.sigmoid().max(1).values
        else:
            # The teacher's sigmoids as K + 1 classes, background 1 - max_k p_k, the foreground
            # mass shared in proportion to the sigmoids; at temperature T.
            sig = t_logits.sigmoid()
            bg = 1 - sig.max(1, keepdim=True).values
            q = torch.cat([(1 - bg) * sig / sig.sum(1, keepdim=True), bg], 1)
            p_t = q ** (1 / T) / (q ** (1 / T)).sum(1, keepdim=True)
            log_p_s = torch.log_softmax(s_logits / T, 1)
            w = q[:, :K].max(1).values
        kl.append((p_t * (p_t.log() - log_p_s)).sum(1) * T**2)
        s_cxcywh = torch.cat(
            [(s_xyxy[:, :2] + s_xyxy[:, 2:]) / 2, s_xyxy[:, 2:] - s_xyxy[:, :2]], 1
        )
        l1.append((s_cxcywh - t_boxes).abs().sum(1))
        giou.append(1 - generalized_box_iou(s_xyxy, t_xyxy).diag())
        weight.append(w)
        start += n
    w = torch.cat(weight)
    expected = {
        "cls": h.CLS_WEIGHT * (w * torch.cat(kl)).sum() / w.sum(),
        "l1": h.L1_WEIGHT * (w * torch.cat(l1)).sum() / w.sum(),
        "giou": h.GIOU_WEIGHT * (w * torch.cat(giou)).sum() / w.sum(),
    }
    for term in TERMS:
        got = losses[f"loss_kd_hetero_{term}"].item()
        assert got == pytest.approx(expected[term].item(), rel=1e-4, abs=1e-6), term


def test_rcnn_to_detr_point_decoding(rcnn_teacher, tmp_path, batch):
    """tools/benchmark_kd.py's hook: the student decodes its point sets and the teacher's box
    head answers at them, as in the KD step (checked against the box head by hand)."""
    model = rcnn_to_detr(rcnn_teacher, tmp_path).train()
    decode = model.prepare_point_decoding(batch)
    assert callable(decode)
    with torch.no_grad():
        sets, teacher, student = decode()
    # 6 random boxes and the student's 8 detection anchors per image.
    assert [tuple(s.shape) for s in sets] == [(2, 6, 4), (2, 8, 4)]
    assert teacher.logits.shape == (1, 2, 14, 8)
    assert [tuple(a.logits.shape) for a in student] == [(2, 2, 6, 7), (2, 2, 8, 7)]
    with torch.no_grad():
        s_encoded = model.student.encode(model.student_inputs(batch))
        images = model.teacher.preprocess_image(model.teacher_inputs(batch))
        features = model.teacher.backbone(images.tensor)
        roi = model.teacher.roi_heads
        absolute = denormalize_boxes(torch.cat(sets, 1), images.image_sizes)
        pooled = roi.box_pooler(
            [features[f] for f in roi.box_in_features], [Boxes(x) for x in absolute]
        )
        scores, _ = roi.box_predictor(roi.box_head(pooled))
        # DETR_ISOLATION "point": each point decoded alone, as a group of one.
        alone = model.student.decode_groups(
            s_encoded, [QueryGroup(sets[0][:, j : j + 1]) for j in range(6)]
        )
    torch.testing.assert_close(sets[1], clip_points(s_encoded.anchors))
    torch.testing.assert_close(teacher.logits[0].flatten(0, 1), scores)
    torch.testing.assert_close(student[0].logits, torch.cat([o.logits for o in alone], 2))
    torch.testing.assert_close(student[0].boxes[..., 0, :], torch.cat([o.boxes for o in alone], 2))


def test_wrong_family_is_refused(detr_teacher, rcnn_teacher, tmp_path):
    with pytest.raises(ValueError, match="DETR teacher into a Faster R-CNN student"):
        detr_to_rcnn(rcnn_teacher, tmp_path)
    with pytest.raises(ValueError, match="Faster R-CNN teacher into a DETR student"):
        rcnn_to_detr(detr_teacher, tmp_path)


# ----------------------------------------------------------------------------- train_net.py


@pytest.mark.parametrize("direction", ["detr_to_rcnn", "rcnn_to_detr"])
def test_train_net_distils_and_evaluates(
    direction, detr_teacher, rcnn_teacher, datasets_root, tmp_path
):
    if direction == "detr_to_rcnn":
        args = ["--config-file", DETR_TO_RCNN, *TINY_RCNN_OPTS]
        args += teacher_opts(detr_teacher, tmp_path)
    else:
        args = ["--config-file", RCNN_TO_DETR, *TINY_DETR, *FEW_POINTS]
        args += teacher_opts(rcnn_teacher, tmp_path)
    run_train_net([*args, "SOLVER.MAX_ITER", "2"], datasets_root)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    logged = {k for m in metrics for k in m}
    assert {f"loss_kd_hetero_{t}" for t in TERMS} <= logged
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])
