"""The Chen et al. 2017 distiller on real (tiny) detectron2 models."""

import copy

import pytest
import torch
from conftest import (
    REPO,
    TINY_DATASET,
    TINY_RCNN_OPTS,
    build_cfg,
    kd_opts,
    load_script,
    without_annotations,
)

pytestmark = pytest.mark.usefixtures("event_storage")

KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"
STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"


@pytest.fixture(scope="module")
def batch(datasets_root):
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    cfg = build_cfg("configs/kd_shapes/faster_rcnn_student.yaml", kd_opts(("", ""), "/tmp"))
    mapper = DatasetMapper(cfg, True)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]
    torch.manual_seed(0)
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
    model = build(
        tiny_teacher,
        tmp_path,
        "KD.STUDENT.INPUT_SCALE",
        "0.5",
        "KD.CHEN2017.RPN_SOFT_CLS",
        "False",
        "KD.CHEN2017.RPN_BOUNDED_REG",
        "False",
    )
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
