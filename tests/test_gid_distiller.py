"""The three GID distillers on real (tiny) detectron2 models: losses, gradients, the frozen teacher,
eval mode, and a few iterations through train_net.py."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_DATASET, build_cfg, load_script

FAMILIES = ("retinanet", "fcos", "faster_rcnn")
GID_TERMS = ("feature", "relation", "response_cls", "response_reg")

# Tiny runs: 64 px images, ResNet-18, FPN 32 (student) / 64 (teacher), 2 images per batch.
TINY = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "DATASETS.TRAIN", f"('{TINY_DATASET}_train',)",
    "DATASETS.TEST", "()",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
TRAIN = [
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.005",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", "2",
    "SEED", "7",
]  # fmt: skip


@pytest.fixture(scope="module")
def teachers(datasets_root, tmp_path_factory):
    """family -> (config file, weights) of a tiny teacher: freshly built, saved as a checkpoint.

    Untrained weights are enough here: the loader still verifies every key and shape.
    """
    from detectron2.modeling import build_model

    out = tmp_path_factory.mktemp("gid_teachers")
    result = {}
    for family in FAMILIES:
        cfg = build_cfg(
            f"configs/kd_shapes/{family}_teacher.yaml", [*TINY, "MODEL.FPN.OUT_CHANNELS", "64"]
        )
        config, weights = out / f"{family}.yaml", out / f"{family}.pth"
        config.write_text(cfg.dump())
        torch.manual_seed(1)
        torch.save({"model": build_model(cfg).state_dict()}, weights)
        result[family] = (str(config), str(weights))
    return result


def kd_opts(family, teachers, out_dir):
    config, weights = teachers[family]
    return [
        *TINY,
        *TRAIN,
        "MODEL.FPN.OUT_CHANNELS",
        "32",
        "KD.TEACHER.CONFIG_FILE",
        config,
        "KD.TEACHER.WEIGHTS",
        weights,
        "OUTPUT_DIR",
        str(out_dir),
    ]


@pytest.fixture(scope="module")
def batch(datasets_root):
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    cfg = build_cfg("configs/kd_shapes/retinanet_student.yaml", TINY)
    mapper = DatasetMapper(cfg, True)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]
    torch.manual_seed(0)
    return [mapper(copy.deepcopy(d)) for d in dicts]


@pytest.mark.parametrize("family", FAMILIES)
def test_distiller_step(family, teachers, batch, tmp_path):
    """Named finite losses; trained adapters; a frozen, eval-locked teacher outside the
    checkpoint; and in eval mode exactly the student."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    model = build_model(
        build_cfg(f"configs/kd_shapes/{family}_kd_gid.yaml", kd_opts(family, teachers, tmp_path))
    )
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    state_keys = set(model.state_dict())
    assert not any(k.startswith("teacher.") for k in state_keys)
    assert "gid.adapters.0.weight" in state_keys
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for p in model.gid.adapters.parameters())

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    assert not model.teacher.training
    with EventStorage(0):
        for _ in range(2):
            losses = model(batch)
            for term in GID_TERMS:
                value = losses[f"loss_kd_gid_{term}"]
                assert value.requires_grad and math.isfinite(value.item()), term
            optimizer.zero_grad()
            sum(losses.values()).backward()
            grad = model.gid.adapters[0].weight.grad
            assert grad is not None and grad.abs().sum() > 0
            optimizer.step()
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher {k} changed"
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())

    model.eval()
    with torch.no_grad():
        ours = model(batch)[0]["instances"]
        alone = model.student(batch)[0]["instances"]
    assert torch.equal(ours.pred_boxes.tensor, alone.pred_boxes.tensor)
    assert torch.equal(ours.scores, alone.scores)


def test_terms_switch_off_and_chen_terms_combine(teachers, batch, tmp_path):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    # GIDDistiller is GID alone; GIDFasterRCNNDistiller adds Chen et al.'s terms.
    off = [
        "MODEL.META_ARCHITECTURE",
        "GIDFasterRCNNDistiller",
        "KD.GID.FEATURE_WEIGHT",
        "0.0",
        "KD.GID.RESPONSE_REG_WEIGHT",
        "0.0",
        "KD.CHEN2017.RPN_SOFT_CLS",
        "True",
        "KD.CHEN2017.RPN_BOUNDED_REG",
        "False",
        "KD.CHEN2017.RCN_SOFT_CLS",
        "False",
        "KD.CHEN2017.RCN_BOUNDED_REG",
        "False",
        "KD.CHEN2017.HINT.ENABLED",
        "True",
    ]
    model = build_model(
        build_cfg(
            "configs/kd_shapes/faster_rcnn_kd_gid.yaml",
            [*kd_opts("faster_rcnn", teachers, tmp_path), *off],
        )
    )
    model.train()
    with EventStorage(0):
        losses = model(batch)
    kd_terms = sorted(k for k in losses if k.startswith("loss_kd_"))
    assert kd_terms == [
        "loss_kd_chen2017_hint",
        "loss_kd_chen2017_rpn_soft_cls",
        "loss_kd_gid_relation",
        "loss_kd_gid_response_cls",
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_train_net_runs(family, teachers, tmp_path):
    """Two iterations of each GID student through train_net.py's main, finite GID losses logged."""
    from detectron2.engine import default_argument_parser

    import train_net

    out = tmp_path / "run"
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            str(REPO / f"configs/kd_shapes/{family}_kd_gid.yaml"),
            *kd_opts(family, teachers, out),
        ]
    )
    train_net.main(args)
    assert (out / "model_final.pth").is_file()
    records = [json.loads(line) for line in Path(out / "metrics.json").read_text().splitlines()]
    last = records[-1]
    for term in GID_TERMS:
        assert math.isfinite(last[f"loss_kd_gid_{term}"]), term
    assert last["kd_gid/num_instances"] > 0


def test_visualize_points(teachers, tmp_path):
    """tools/visualize_points.py draws the GI boxes of validation images, classified by IoU."""
    tool = load_script("tools/visualize_points.py")
    out = tmp_path / "vis"
    totals = tool.main(
        [
            "--config-file",
            str(REPO / "configs/kd_shapes/retinanet_kd_gid.yaml"),
            "--output",
            str(out),
            "--num-images",
            "2",
            "--dataset",
            f"{TINY_DATASET}_val",
            *kd_opts("retinanet", teachers, tmp_path),
        ]
    )
    assert len(list(out.glob("*.png"))) == 2
    counts = totals["general instances"]
    assert set(counts) == {"positive", "near", "background"}
    assert 0 < sum(counts.values()) <= 2 * 10
    assert json.loads((out / "summary.json").read_text())["points"] == totals
