"""The Chen et al. 2017 distiller on real (tiny) detectron2 models."""

import copy

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY_DATASET,
    TINY_RCNN_OPTS,
    build_cfg,
    kd_opts,
    load_script,
    save_untrained_teacher,
    without_annotations,
)

pytestmark = pytest.mark.usefixtures("event_storage")

KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"
STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"
# A student at half the teacher's input size; the RPN terms need equal sizes.
LOW_RESOLUTION = [
    "KD.STUDENT.INPUT_SCALE",
    "0.5",
    "KD.CHEN2017.RPN_SOFT_CLS",
    "False",
    "KD.CHEN2017.RPN_BOUNDED_REG",
    "False",
]


@pytest.fixture(scope="module")
def batch(datasets_root):
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    cfg = build_cfg("configs/kd_shapes/faster_rcnn_student.yaml", kd_opts(("", ""), "/tmp"))
    mapper = DatasetMapper(cfg, True)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]
    torch.manual_seed(0)
    np.random.seed(0)  # detectron2's augmentations (the random flip) draw from numpy
    return [mapper(copy.deepcopy(d)) for d in dicts]


def build(tiny_teacher, tmp_path, *extra):
    from detectron2.modeling import build_model

    return build_model(build_cfg(KD_CONFIG, [*kd_opts(tiny_teacher, tmp_path), *extra]))


def test_losses_are_named_and_finite(tiny_teacher, tmp_path, batch):
    model = build(tiny_teacher, tmp_path)
    model.train()
    losses = model(batch)
    for term in ("rpn_soft_cls", "rpn_bounded_reg", "rcn_soft_cls", "rcn_bounded_reg", "hint"):
        assert torch.isfinite(losses[f"loss_kd_chen2017_{term}"])
    for name in ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"):
        assert name in losses


def test_hard_losses_scaled_by_mu(tiny_teacher, tmp_path, batch):
    """With the soft terms on, L_cls = mu * L_hard + ...: the student's own CE is scaled by mu.

    The same RNG seed gives the student alone and the distiller the same anchor and proposal
    samples, so the student's plain losses are the independent reference.
    """
    mu = 0.3
    model = build(tiny_teacher, tmp_path, "KD.CHEN2017.HARD_WEIGHT", str(mu))
    model.train()
    torch.manual_seed(123)
    kd_losses = model(batch)
    torch.manual_seed(123)
    plain = model.student(batch)
    assert kd_losses["loss_cls"].item() == pytest.approx(mu * plain["loss_cls"].item(), rel=1e-5)
    assert kd_losses["loss_rpn_cls"].item() == pytest.approx(
        mu * plain["loss_rpn_cls"].item(), rel=1e-5
    )
    # Regression losses are not scaled: the bound is added on top.
    assert kd_losses["loss_box_reg"].item() == pytest.approx(plain["loss_box_reg"].item(), rel=1e-5)


def test_terms_switch_off(tiny_teacher, tmp_path, batch):
    model = build(
        tiny_teacher,
        tmp_path,
        "KD.CHEN2017.RPN_SOFT_CLS",
        "False",
        "KD.CHEN2017.RPN_BOUNDED_REG",
        "False",
        "KD.CHEN2017.RCN_SOFT_CLS",
        "False",
        "KD.CHEN2017.RCN_BOUNDED_REG",
        "False",
        "KD.CHEN2017.HINT.ENABLED",
        "False",
    )
    model.train()
    torch.manual_seed(5)
    losses = model(batch)
    torch.manual_seed(5)
    plain = model.student(batch)
    assert not [k for k in losses if k.startswith("loss_kd_")]
    assert losses.keys() == plain.keys()
    for k in plain:
        assert losses[k].item() == pytest.approx(plain[k].item(), rel=1e-5)


def test_adapters_receive_gradients_and_teacher_does_not(tiny_teacher, tmp_path, batch):
    model = build(tiny_teacher, tmp_path)
    model.train()
    losses = model(batch)
    losses["loss_kd_chen2017_hint"].backward()
    for name, conv in model.hint_adapters.adapters.items():
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    # Adapters are registered, so the optimizer and the checkpoint see them; the teacher is not.
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("hint_adapters.") for n in names)
    assert not any(n.startswith("teacher.") for n in model.state_dict())


def test_teacher_frozen_in_eval_mode_and_unchanged_after_training(tiny_teacher, tmp_path):
    from kd.engine import Trainer

    cfg = build_cfg(KD_CONFIG, [*kd_opts(tiny_teacher, tmp_path), "DATASETS.TEST", "()"])
    trainer = Trainer(cfg)
    teacher = trainer.model.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # the loop ran to the end
    assert trainer.model.training and trainer.model.student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    teacher.train()  # locked: stays in eval mode
    assert not teacher.training
    after = teacher.state_dict()
    # BatchNorm running statistics included: an eval-mode teacher never updates them.
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ... and still holds exactly the weights of its file.
    stored = torch.load(tiny_teacher[1], weights_only=True)["model"]
    assert torch.equal(stored["backbone.fpn_output2.weight"], after["backbone.fpn_output2.weight"])


def test_eval_mode_is_exactly_the_student(tiny_teacher, tmp_path, batch):
    model = build(tiny_teacher, tmp_path)
    model.eval()
    inputs = [{"image": x["image"], "height": 64, "width": 64} for x in batch]
    with torch.no_grad():
        a = model(inputs)
        b = model.student(inputs)
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_low_resolution_student(tiny_teacher, tmp_path, batch):
    model = build(tiny_teacher, tmp_path, *LOW_RESOLUTION)
    model.train()
    small = model.student_inputs(batch)
    assert small[0]["image"].shape[-2:] == (32, 32)
    big_boxes = batch[0]["instances"].gt_boxes.tensor
    assert torch.allclose(small[0]["instances"].gt_boxes.tensor, big_boxes / 2, atol=1e-4)
    losses = model(batch)
    assert torch.isfinite(losses["loss_kd_chen2017_hint"])
    assert torch.isfinite(losses["loss_kd_chen2017_rcn_soft_cls"])
    # Predictions are reported at the original resolution.
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 64, "width": 64}])
    assert out[0]["instances"].image_size == (64, 64)


def test_low_resolution_pixels_equal_the_loaders_resize(tiny_teacher, tmp_path):
    """The low-resolution student sees, to rounding, what detectron2's data loader gives the
    same student deployed alone at half size (ResizeTransform: PIL's antialiased bilinear), even
    on pixel noise, where plain bilinear sampling (a 2x2 mean at scale 0.5) differs by tens of
    gray levels."""
    from detectron2.data.transforms import ResizeTransform

    model = build(tiny_teacher, tmp_path, *LOW_RESOLUTION)
    hwc = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    image = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    small = model.student_inputs([{"image": image, "height": 48, "width": 64}])[0]["image"]
    loader = ResizeTransform(48, 64, 24, 32).apply_image(hwc).transpose(2, 0, 1)
    assert small.dtype == torch.uint8 and small.shape == (3, 24, 32)
    assert (small.int() - torch.from_numpy(loader.astype(np.int32))).abs().max() <= 1


def test_hint_pairs_student_levels_with_other_teacher_levels(tiny_teacher, tmp_path, batch):
    """KD.CHEN2017.HINT.TEACHER_FEATURES: a half-resolution student's p3, p4 against the
    teacher's p4, p5 (maps of equal size, so nothing is resized). Reference: the two backbones
    and the 1x1 adapters applied by hand, the squared error averaged per level, then over
    levels."""
    import torch.nn.functional as F

    opts = [*LOW_RESOLUTION, "KD.CHEN2017.HINT.FEATURES", "['p3', 'p4']"]
    model = build(
        tiny_teacher, tmp_path, *opts, "KD.CHEN2017.HINT.TEACHER_FEATURES", "['p4', 'p5']"
    )
    model.train()
    losses = model(batch)
    with torch.no_grad():
        s = model.student
        t = model.teacher
        s_feats = s.backbone(s.preprocess_image(model.student_inputs(batch)).tensor)
        t_feats = t.backbone(t.preprocess_image(batch).tensor)
        expected = []
        for s_name, t_name in (("p3", "p4"), ("p4", "p5")):
            conv = model.hint_adapters.adapters[s_name]
            adapted = F.conv2d(s_feats[s_name], conv.weight, conv.bias)
            assert adapted.shape == t_feats[t_name].shape
            expected.append(((adapted - t_feats[t_name]) ** 2).mean())
    gamma = model.hint_weight
    assert losses["loss_kd_chen2017_hint"].item() == pytest.approx(
        gamma * (expected[0] + expected[1]).item() / 2, rel=1e-5
    )
    with pytest.raises(ValueError, match="one teacher feature per"):
        build(tiny_teacher, tmp_path, *opts, "KD.CHEN2017.HINT.TEACHER_FEATURES", "['p4']")
    with pytest.raises(ValueError, match="p7"):
        build(tiny_teacher, tmp_path, *opts, "KD.CHEN2017.HINT.TEACHER_FEATURES", "['p4', 'p7']")


def test_rpn_terms_refused_for_low_resolution(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="INPUT_SCALE"):
        build(tiny_teacher, tmp_path, "KD.STUDENT.INPUT_SCALE", "0.5")


def test_visualize_predictions_mode(tiny_teacher, datasets_root, tmp_path):
    """``--mode predictions`` draws, per model, exactly the detections that model makes alone
    (detectron2's DefaultPredictor on the image file) above the threshold, and counts the ground
    truth they cover at IoU >= 0.5 (torchvision's box_iou on the annotations)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model
    from detectron2.structures import BoxMode
    from torchvision.ops import box_iou

    threshold = 0.06
    student_cfg = build_cfg(STUDENT_CONFIG, TINY_RCNN_OPTS)
    checkpoints = {}
    for name, seed in (("baseline student", 5), ("distilled student", 6)):
        torch.manual_seed(seed)
        checkpoints[name] = str(tmp_path / f"{seed}.pth")
        torch.save({"model": build_model(student_cfg).state_dict()}, checkpoints[name])
    tool = load_script("tools/visualize_points.py")
    totals = tool.main(
        [
            "--mode",
            "predictions",
            "--config-file",
            str(REPO / KD_CONFIG),
            "--checkpoint",
            checkpoints["distilled student"],
            "--baseline-checkpoint",
            checkpoints["baseline student"],
            "--output",
            str(tmp_path / "vis"),
            "--num-images",
            "3",
            "--score-thresh",
            str(threshold),
            *kd_opts(tiny_teacher, tmp_path),
        ]
    )
    assert list(totals) == ["teacher", "baseline student", "distilled student"]
    assert len(list((tmp_path / "vis").glob("*.png"))) == 3

    teacher_config, teacher_weights = tiny_teacher
    configs = {
        "teacher": (build_cfg(teacher_config, []), teacher_weights),
        "baseline student": (student_cfg, checkpoints["baseline student"]),
        "distilled student": (student_cfg, checkpoints["distilled student"]),
    }
    images = DatasetCatalog.get(f"{TINY_DATASET}_val")[:3]
    for name, (cfg, weights) in configs.items():
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = weights
        predictor = DefaultPredictor(cfg)
        detections = covered = ground_truth = 0
        for d in images:
            found = predictor(read_image(d["file_name"], format=cfg.INPUT.FORMAT))["instances"]
            boxes = found.pred_boxes.tensor[found.scores >= threshold]
            gt = torch.tensor(
                [
                    BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                    for a in d["annotations"]
                ]
            ).reshape(-1, 4)
            detections += len(boxes)
            ground_truth += len(gt)
            if len(boxes) and len(gt):
                covered += int((box_iou(gt, boxes).max(dim=1).values >= 0.5).sum())
        counts = totals[name]
        assert counts["positive"] + counts["near"] + counts["background"] == detections, name
        assert (counts["ground_truth"], counts["covered"]) == (ground_truth, covered), name
    assert sum(totals[n]["positive"] + totals[n]["near"] + totals[n]["background"] for n in totals)


@pytest.mark.parametrize("empty", [(0, 1), (1,)], ids=["no_foreground", "one_image_empty"])
def test_batch_without_foreground(tiny_teacher, tmp_path, batch, empty):
    """Background-only images: every term is finite; with no foreground proposal at all the
    bounded regression terms are 0 and still part of the graph."""
    model = build(tiny_teacher, tmp_path)
    model.train()
    torch.manual_seed(0)
    losses = model(without_annotations(batch, empty))
    for name, value in losses.items():
        assert torch.isfinite(value), name
    if len(empty) == len(batch):
        for term in ("rpn_bounded_reg", "rcn_bounded_reg"):
            value = losses[f"loss_kd_chen2017_{term}"]
            assert value.item() == 0.0 and value.requires_grad, term
    sum(losses.values()).backward()
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- values by hand
# The loss terms recomputed from the models' raw outputs (RPN head, box predictor) with the
# paper's formulas written out here: the R-CNN box encoding, the softmaxes, the bound, the
# normalisers. Nothing of kd.losses or of the distiller's own bookkeeping is called.


def encode(boxes, gt, weights):
    """R-CNN box deltas of ``gt`` relative to ``boxes`` (xyxy), scaled by ``weights``."""
    wx, wy, ww, wh = weights
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    px, py = boxes[:, 0] + 0.5 * pw, boxes[:, 1] + 0.5 * ph
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return torch.stack(
        [
            wx * (gx - px) / pw,
            wy * (gy - py) / ph,
            ww * torch.log(gw / pw),
            wh * torch.log(gh / ph),
        ],
        dim=1,
    )


def decode(deltas, boxes, weights):
    """The inverse of :func:`encode`: xyxy boxes from deltas."""
    wx, wy, ww, wh = weights
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    px, py = boxes[:, 0] + 0.5 * pw, boxes[:, 1] + 0.5 * ph
    cx, cy = px + deltas[:, 0] / wx * pw, py + deltas[:, 1] / wy * ph
    w, h = pw * torch.exp(deltas[:, 2] / ww), ph * torch.exp(deltas[:, 3] / wh)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def bound(student, teacher, targets, margin):
    """Per-sample ||R_s - y||^2 where ||R_s - y||^2 + m > ||R_t - y||^2, else 0 [paper]."""
    s_err = ((student - targets) ** 2).sum(1)
    t_err = ((teacher - targets) ** 2).sum(1)
    return torch.where(s_err + margin > t_err, s_err, torch.zeros_like(s_err))


def record_step(model, batch, seed=0):
    """One training step of the distiller, with the raw outputs it was computed from."""
    student, rec = model.student, {}
    rpn, roi = student.proposal_generator, student.roi_heads
    hooks = [
        rpn.anchor_generator.register_forward_hook(lambda m, a, out: rec.update(anchors=out)),
        rpn.rpn_head.register_forward_hook(lambda m, a, out: rec.update(rpn=out)),
        model.teacher.proposal_generator.rpn_head.register_forward_hook(
            lambda m, a, out: rec.update(t_rpn=out)
        ),
        roi.box_predictor.register_forward_hook(lambda m, a, out: rec.update(box=out)),
    ]
    label_anchors, label_proposals = rpn.label_and_sample_anchors, roi.label_and_sample_proposals

    def anchors_recorded(*args):
        rec["anchor_labels"] = label_anchors(*args)
        return rec["anchor_labels"]

    def proposals_recorded(*args):
        rec["sampled"] = label_proposals(*args)
        return rec["sampled"]

    rpn.label_and_sample_anchors = anchors_recorded
    roi.label_and_sample_proposals = proposals_recorded
    try:
        torch.manual_seed(seed)
        losses = model(batch)
    finally:
        for h in hooks:
            h.remove()
        del rpn.label_and_sample_anchors, roi.label_and_sample_proposals
    return losses, rec


def flat_rpn(logits, deltas):
    """Per level (N, A, H, W) / (N, A*4, H, W) -> (N, sum H*W*A) / (N, sum H*W*A, 4), ordered
    (y, x, anchor) within a level, as detectron2's anchors are."""
    out_l, out_d = [], []
    for z, d in zip(logits, deltas):
        n, a, h, w = z.shape
        out_l.append(z.permute(0, 2, 3, 1).reshape(n, -1))
        out_d.append(d.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(out_l, 1), torch.cat(out_d, 1)


def teacher_box_outputs(model, batch, boxes):
    """The teacher's box head at the given absolute boxes (per image), run here by hand."""
    teacher = model.teacher
    with torch.no_grad():
        images = teacher.preprocess_image(batch)
        features = teacher.backbone(images.tensor)
        roi = teacher.roi_heads
        pooled = roi.box_pooler([features[f] for f in roi.box_in_features], boxes)
        return roi.box_predictor(roi.box_head(pooled))


def reference_terms(
    cfg, teacher_cfg, model, batch, rec, background_column=-1, delta_class=lambda k: k
):
    """The four Chen et al. terms of one step, recomputed (float64) from ``rec``.

    Args:
        background_column: where w_bg goes in the soft CE (detectron2: last).
        delta_class: the class whose deltas are compared, from the ground-truth class (the
            paper: that class itself; another choice shows that the test tells them apart).
    """
    c = cfg.KD.CHEN2017
    mu, T, w_bg = c.HARD_WEIGHT, c.TEMPERATURE, c.BACKGROUND_WEIGHT
    nu, m = c.BOUND_WEIGHT, c.BOUND_MARGIN
    num_images = len(batch)
    out = {}

    # ---- RPN, over the sampled anchors; normaliser M = RPN batch size per image x images.
    M = cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE * num_images
    s_logits, s_deltas = flat_rpn(*rec["rpn"])
    t_logits, t_deltas = flat_rpn(*rec["t_rpn"])
    s_logits, s_deltas = s_logits.double(), s_deltas.double()
    t_logits, t_deltas = t_logits.double(), t_deltas.double()
    labels, matched = rec["anchor_labels"]
    labels = torch.stack(labels)
    anchors = torch.cat([a.tensor for a in rec["anchors"]]).double()
    sampled = labels >= 0
    p_t = torch.sigmoid(t_logits[sampled] / T)
    p_s = torch.sigmoid(s_logits[sampled] / T)
    soft = -(p_t * torch.log(p_s) + w_bg * (1 - p_t) * torch.log(1 - p_s))
    rpn_cls_weight = cfg.MODEL.RPN.LOSS_WEIGHT
    rpn_loc_weight = cfg.MODEL.RPN.LOSS_WEIGHT * cfg.MODEL.RPN.BBOX_REG_LOSS_WEIGHT
    out["rpn_soft_cls"] = (1 - mu) * rpn_cls_weight * soft.sum() / M
    total = torch.zeros((), dtype=torch.float64)
    for i in range(num_images):
        pos = labels[i] == 1
        a, g = anchors[pos], matched[i][pos].double()
        y = encode(a, g, cfg.MODEL.RPN.BBOX_REG_WEIGHTS)
        t = encode(a, decode(t_deltas[i][pos], a, teacher_cfg.MODEL.RPN.BBOX_REG_WEIGHTS),
                   cfg.MODEL.RPN.BBOX_REG_WEIGHTS)  # fmt: skip
        total = total + bound(s_deltas[i][pos], t, y, m).sum()
    out["rpn_bounded_reg"] = nu * rpn_loc_weight * total / M

    # ---- RCN, over the sampled proposals; normaliser N = all sampled proposals.
    sampled_props = rec["sampled"]
    boxes = [p.proposal_boxes for p in sampled_props]
    scores, deltas = (x.double() for x in rec["box"])
    t_scores, t_deltas = (x.double() for x in teacher_box_outputs(model, batch, boxes))
    N = sum(len(p) for p in sampled_props)
    K = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    weights = torch.ones(K + 1, dtype=torch.float64)
    weights[background_column] = w_bg
    q_t = torch.exp(t_scores / T) / torch.exp(t_scores / T).sum(1, keepdim=True)
    log_q_s = torch.log(torch.exp(scores / T) / torch.exp(scores / T).sum(1, keepdim=True))
    out["rcn_soft_cls"] = (1 - mu) * (-(weights * q_t * log_q_s).sum()) / N
    classes = torch.cat([p.gt_classes for p in sampled_props])
    proposals = torch.cat([b.tensor for b in boxes]).double()
    gt = torch.cat(
        [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in sampled_props]
    ).double()
    s_w, t_w = (
        cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS,
        teacher_cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS,
    )
    total = torch.zeros((), dtype=torch.float64)
    for j in range(N):
        k = int(classes[j])
        if k == K:  # background: no regression
            continue
        k = delta_class(k)
        p, y = proposals[j : j + 1], encode(proposals[j : j + 1], gt[j : j + 1], s_w)
        s = deltas[j : j + 1, 4 * k : 4 * k + 4]
        t = encode(p, decode(t_deltas[j : j + 1, 4 * k : 4 * k + 4], p, t_w), s_w)
        total = total + bound(s, t, y, m).sum()
    out["rcn_bounded_reg"] = nu * cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT * total / N
    return out


def value_model(cfg):
    """The distiller of ``cfg``, its student's box deltas scaled up from their 0.001 init (the
    teacher's are too), so that the bound is active on some proposals and not on others."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad():
        model.student.roi_heads.box_predictor.bbox_pred.weight.mul_(100.0)
    return model


def assert_terms(losses, expected, names):
    for name in names:
        got = losses[f"loss_kd_chen2017_{name}"].item()
        assert got == pytest.approx(expected[name].item(), rel=1e-4, abs=1e-7), name


@pytest.fixture(scope="module")
def strong_teacher(datasets_root, tmp_path_factory):
    """An untrained tiny teacher with its own box encodings (RPN and ROI BBOX_REG_WEIGHTS unlike
    the student's) and larger deltas than at initialisation (RPN x30, box head x100, as
    :func:`value_model` scales the student's box head), so that comparing raw and re-encoded deltas
    gates the bound differently."""
    opts = list(TINY_RCNN_OPTS)
    i = opts.index("MODEL.FPN.OUT_CHANNELS")
    opts[i + 1] = "48"
    opts += [
        "MODEL.RPN.BBOX_REG_WEIGHTS", "(4.0, 4.0, 2.0, 2.0)",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "(20.0, 20.0, 2.0, 2.0)",
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("strong_teacher")
    config, weights = save_untrained_teacher(
        out, "configs/kd_shapes/faster_rcnn_teacher.yaml", opts, seed=4
    )
    state = torch.load(weights, weights_only=True)
    state["model"]["proposal_generator.rpn_head.anchor_deltas.weight"] *= 30.0
    state["model"]["roi_heads.box_predictor.bbox_pred.weight"] *= 100.0
    torch.save(state, weights)
    return config, weights


def test_rpn_bounded_term_compares_in_the_students_encoding(strong_teacher, tmp_path, batch):
    """The teacher's RPN deltas are decoded with its own box transform and re-encoded with the
    student's before the bound compares them with the student's targets."""
    cfg = build_cfg(
        KD_CONFIG, [*kd_opts(strong_teacher, tmp_path), "KD.CHEN2017.BOUND_WEIGHT", "0.7"]
    )
    teacher_cfg = build_cfg(strong_teacher[0], [])
    model = value_model(cfg)
    losses, rec = record_step(model, batch)
    expected = reference_terms(cfg, teacher_cfg, model, batch, rec)
    assert expected["rpn_bounded_reg"] > 0
    assert_terms(losses, expected, ["rpn_bounded_reg", "rcn_bounded_reg"])
    # The test tells the encodings apart: the teacher's raw deltas give another value.
    raw = teacher_cfg.clone()
    raw.defrost()
    raw.MODEL.RPN.BBOX_REG_WEIGHTS = cfg.MODEL.RPN.BBOX_REG_WEIGHTS
    other = reference_terms(cfg, raw, model, batch, rec)["rpn_bounded_reg"]
    assert abs(other - expected["rpn_bounded_reg"]) > 1e-3 * expected["rpn_bounded_reg"]


def test_rpn_terms_refuse_other_anchor_layouts(tmp_path):
    """Anchor i is the same box for both models only with the same anchor offset and the same
    padded grid (the backbones' size divisibility); otherwise the RPN terms are refused."""
    opts = [*TINY_RCNN_OPTS, "MODEL.ANCHOR_GENERATOR.OFFSET", "0.5"]
    teacher = save_untrained_teacher(
        tmp_path, "configs/kd_shapes/faster_rcnn_teacher.yaml", opts, seed=0
    )
    with pytest.raises(ValueError, match=r"OFFSET \(student 0.0, teacher 0.5\)"):
        build(teacher, tmp_path)
    rpn_off = ["KD.CHEN2017.RPN_SOFT_CLS", "False", "KD.CHEN2017.RPN_BOUNDED_REG", "False"]
    build(teacher, tmp_path, *rpn_off)  # without the RPN terms the pair is fine

    same = save_untrained_teacher(
        tmp_path, "configs/kd_shapes/faster_rcnn_teacher.yaml", TINY_RCNN_OPTS, seed=0
    )
    model = build(same, tmp_path, *rpn_off)
    # A backbone that pads to a coarser multiple (as a P3-P7 FPN does) makes a larger grid.
    assert model.student.backbone.size_divisibility == 32
    model.teacher.backbone._size_divisibility = 128
    model.rpn_soft_cls = True
    with pytest.raises(ValueError, match=r"size divisibility \(student 32, teacher 128\)"):
        model._check_compatible(())


def test_terms_take_the_detectors_loss_weights(strong_teacher, tmp_path, batch):
    """The bounded terms join L_reg, so they are weighted like detectron2's hard regression
    losses: ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT for the RCN, RPN.LOSS_WEIGHT x
    RPN.BBOX_REG_LOSS_WEIGHT for the RPN (and RPN.LOSS_WEIGHT for its soft CE)."""
    cfg = build_cfg(
        KD_CONFIG,
        [
            *kd_opts(strong_teacher, tmp_path),
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "2.5",
            "MODEL.RPN.BBOX_REG_LOSS_WEIGHT", "1.5",
            "MODEL.RPN.LOSS_WEIGHT", "0.8",
        ],
    )  # fmt: skip
    teacher_cfg = build_cfg(strong_teacher[0], [])
    model = value_model(cfg)
    losses, rec = record_step(model, batch)
    expected = reference_terms(cfg, teacher_cfg, model, batch, rec)
    assert expected["rcn_bounded_reg"] > 0 and expected["rpn_bounded_reg"] > 0
    assert_terms(losses, expected, ["rpn_soft_cls", "rpn_bounded_reg", "rcn_bounded_reg"])


def test_values_by_hand(strong_teacher, tmp_path, batch):
    """All four terms from the raw outputs: the teacher answers at the student's sampled
    proposals; the RPN terms are normalised by M = RPN.BATCH_SIZE_PER_IMAGE x images (not by the
    anchors actually sampled) and the RCN terms by N = the proposals actually sampled (not
    ROI_HEADS.BATCH_SIZE_PER_IMAGE x images), as detectron2's own losses; w_bg weighs the
    background column (the last); the bound compares the ground-truth class's deltas."""
    cfg = build_cfg(
        KD_CONFIG,
        [
            *kd_opts(strong_teacher, tmp_path),
            # More than there are anchors / proposals: the counts sampled differ from M and N.
            "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "2048",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512",
            "KD.CHEN2017.HARD_WEIGHT", "0.3",
            "KD.CHEN2017.TEMPERATURE", "2.0",
            "KD.CHEN2017.BACKGROUND_WEIGHT", "3.0",
            "KD.CHEN2017.BOUND_WEIGHT", "0.7",
            "KD.CHEN2017.BOUND_MARGIN", "0.05",
        ],
    )  # fmt: skip
    teacher_cfg = build_cfg(strong_teacher[0], [])
    model = value_model(cfg)
    asked = []
    hook = model.teacher.roi_heads.box_pooler.register_forward_pre_hook(
        lambda m, args: asked.append([b.tensor.clone() for b in args[1]])
    )
    losses, rec = record_step(model, batch)
    hook.remove()
    # The teacher's box head was asked about exactly the student's sampled proposals.
    sampled = rec["sampled"]
    assert len(asked) == 1
    for a, p in zip(asked[0], sampled):
        assert torch.equal(a, p.proposal_boxes.tensor)
    num_anchors_sampled = int((torch.stack(rec["anchor_labels"][0]) >= 0).sum())
    assert num_anchors_sampled < 2048 * len(batch)
    assert sum(len(p) for p in sampled) < 512 * len(batch)

    expected = reference_terms(cfg, teacher_cfg, model, batch, rec)
    assert all(v > 0 for v in expected.values()), expected
    names = ["rpn_soft_cls", "rpn_bounded_reg", "rcn_soft_cls", "rcn_bounded_reg"]
    assert_terms(losses, expected, names)

    # The reference tells the alternatives apart: w_bg on the first column, or another class's
    # deltas, give other values.
    def differs(name, **alternative):
        other = reference_terms(cfg, teacher_cfg, model, batch, rec, **alternative)[name]
        got = losses[f"loss_kd_chen2017_{name}"].item()
        assert abs(other.item() - got) > 1e-3 * got, alternative

    differs("rcn_soft_cls", background_column=0)
    differs("rcn_bounded_reg", delta_class=lambda k: (k + 1) % cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def test_teacher_asked_at_the_proposals_in_its_own_resolution(tiny_teacher, tmp_path, batch):
    """A half-resolution student: the teacher's box head gets the student's sampled proposals
    scaled to its full-size input."""
    model = build(
        tiny_teacher,
        tmp_path,
        "KD.STUDENT.INPUT_SCALE", "0.5",
        "KD.CHEN2017.RPN_SOFT_CLS", "False",
        "KD.CHEN2017.RPN_BOUNDED_REG", "False",
    ).train()  # fmt: skip
    asked = []
    hook = model.teacher.roi_heads.box_pooler.register_forward_pre_hook(
        lambda m, args: asked.append([b.tensor.clone() for b in args[1]])
    )
    _, rec = record_step(model, batch)
    hook.remove()
    for a, p in zip(asked[0], rec["sampled"]):
        torch.testing.assert_close(a, p.proposal_boxes.tensor * 2.0)
