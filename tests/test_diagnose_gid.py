"""tools/diagnose_gid.py: GISM's instances and each GID term's pull, per class."""

import pytest
import torch
from conftest import TINY_DATASET, build_cfg, load_script

CONFIG = "configs/kd_shapes/retinanet_kd_gid.yaml"
TINY = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.RESNETS.NORM", "FrozenBN",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "DATASETS.TRAIN", f"('{TINY_DATASET}_train',)",
    "DATASETS.TEST", "()",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SEED", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def twin(datasets_root, tmp_path_factory):
    """A teacher that is the student itself: the student's architecture and the same weights,
    with frozen BatchNorms (the teacher runs in eval mode, the student in training mode)."""
    from detectron2.modeling import build_model

    out = tmp_path_factory.mktemp("twin")
    cfg = build_cfg("configs/kd_shapes/retinanet_student.yaml", TINY)
    torch.manual_seed(1)
    (out / "teacher.yaml").write_text(cfg.dump())
    torch.save({"model": build_model(cfg).state_dict()}, out / "weights.pth")
    return str(out / "teacher.yaml"), str(out / "weights.pth")


def run(twin, *extra):
    tool = load_script("tools/diagnose_gid.py")
    config, weights = twin
    opts = [*TINY, "KD.TEACHER.CONFIG_FILE", config, "KD.TEACHER.WEIGHTS", weights, *extra]
    return tool, tool.diagnose(CONFIG, opts, batches=2)


def test_twin_teacher_pulls_nothing_and_counts_add_up(twin):
    """Teacher = student: the same probabilities everywhere, so the response BCE's gradient
    (sigmoid(s) - sigmoid(t)) is 0 at every prediction, while the student's own focal loss
    raises the score of every true object (a positive pull on the class's own logit). GT boxes
    per class are those of the batches the training loader gives (counted here from a loader
    built the same way); the report has a row per figure."""
    from detectron2.data import MetadataCatalog
    from detectron2.utils.env import seed_all_rng

    from kd.engine import Trainer

    tool, figures = run(twin, "MODEL.WEIGHTS", twin[1])
    classes = [c for c, f in figures.items() if f.get("anchors")]
    assert classes
    for c in classes:
        f = figures[c]
        assert f["p_t"] == pytest.approx(f["p_s"], abs=1e-6)
        assert f["pull loss_kd_gid_response_cls"] == pytest.approx(0.0, abs=1e-9)
        assert f["pull loss_cls"] > 0
        assert 0.0 <= f["in mask"] <= 1.0 and 0.0 <= f["covered"] <= 1.0

    cfg = build_cfg(CONFIG, [*TINY, "KD.TEACHER.CONFIG_FILE", twin[0]])
    seed_all_rng(cfg.SEED)
    loader = iter(Trainer.build_train_loader(cfg))
    names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
    expected = {}
    for _ in range(2):
        for x in next(loader):
            for k in x["instances"].gt_classes.tolist():
                expected[names[k]] = expected.get(names[k], 0) + 1
    assert {c: f["GT"] for c, f in figures.items() if "GT" in f} == expected
    report = tool.format_report(figures)
    assert "pull loss_kd_gid_response_cls" in report and "cos loss_kd_gid_feature" in report
