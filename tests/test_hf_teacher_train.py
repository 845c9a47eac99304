"""Hugging Face teachers through train_net.py: KD-DETR and DETR -> Faster R-CNN from ``hf://``
folders train, evaluate and resume on the tiny kd_shapes dataset, logging their KD terms; a
teacher with more (and differently ordered, differently cased) classes than the student is mapped
to the student's classes by name, also for its AP check before step 0."""

import json
import math
import os

import pytest
from conftest import (
    REPO,
    TINY_DETR_OPTS,
    TINY_RCNN_OPTS,
    assert_resume_equals_uninterrupted,
    run_train_net,
)
from hf_models import FAMILIES, save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KD_DETR = str(REPO / "configs/kd_shapes/detr_kd_detr_hf.yaml")
HETERO = str(REPO / "configs/kd_shapes/hetero_hf_detr_to_faster_rcnn.yaml")
STUDENT = ["MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.NUM_QUERIES", "8"]
# The teacher of all of kd_shapes' classes and more, in another order (a "COCO" teacher for a
# student on a subset); "N/A" is a hole as in COCO's 91-id spaces.
SUPERSET = ["N/A", "ellipse", "hexagon", "cross", "star", "Triangle", "square", "ring", "disc"]


def _classes():
    from kd.data.synthetic import CLASSES

    return [c.name for c in CLASSES]


@pytest.fixture(scope="module")
def rt_detr_teacher(datasets_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_rt_detr")
    save_tiny("rt_detr", folder, _classes(), size=64)
    return f"hf://{folder}"


@pytest.fixture(scope="module")
def mapped_d_fine_teacher(datasets_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_d_fine")
    save_tiny("d_fine", folder, SUPERSET, size=64)
    return f"hf://{folder}"


def _records(out):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


def _kd_detr_opts(teacher, out):
    return [
        *TINY_DETR_OPTS,
        *STUDENT,
        "KD.TEACHER.CONFIG_FILE", teacher,
        "KD.KD_DETR.NUM_GENERAL_POINTS", "7",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip


def test_kd_detr_with_an_hf_teacher_trains_and_evaluates(rt_detr_teacher, datasets_root, tmp_path):
    out = tmp_path / "run"
    run_train_net(["--config-file", KD_DETR, *_kd_detr_opts(rt_detr_teacher, out)], datasets_root)
    results = json.loads((out / "eval_results.json").read_text())
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])
    last = [r for r in _records(out) if "loss_kd_kd_detr_cls" in r][-1]
    for term in ("cls", "l1", "giou"):
        assert (
            math.isfinite(last[f"loss_kd_kd_detr_{term}"]) and last[f"loss_kd_kd_detr_{term}"] > 0
        )
    assert "loss_class" in last and "loss_class_dn" in last


def test_kd_detr_with_an_hf_teacher_resumes_exactly(rt_detr_teacher, datasets_root, tmp_path):
    assert_resume_equals_uninterrupted(
        KD_DETR, lambda out: _kd_detr_opts(rt_detr_teacher, out), datasets_root, tmp_path
    )


def test_detr_to_faster_rcnn_with_a_class_mapped_hf_teacher(
    mapped_d_fine_teacher, datasets_root, tmp_path
):
    """Trains, measures the mapped teacher's AP before step 0, evaluates, resumes."""
    out = tmp_path / "run"
    opts = [
        *TINY_RCNN_OPTS,
        "SOLVER.MAX_ITER", "2",
        "KD.TEACHER.CONFIG_FILE", mapped_d_fine_teacher,
        "KD.TEACHER.EVALUATE", "True",
        "KD.TEACHER.MIN_AP", "0",
        "KD.HETERO.RCNN_STUDENT.NUM_RANDOM_POINTS", "5",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    proc = run_train_net(["--config-file", HETERO, *opts], datasets_root)
    log = proc.stdout + proc.stderr
    assert "Teacher classes mapped to the student's: 7 of the student's 7 classes" in log
    assert "triangle<-Triangle" in log
    records = _records(out)
    assert "teacher/bbox/AP" in records[0]
    last = [r for r in records if "loss_kd_hetero_cls" in r][-1]
    assert all(math.isfinite(last[f"loss_kd_hetero_{t}"]) for t in ("cls", "l1", "giou"))
    assert (out / "eval_results.json").is_file()
    proc = run_train_net(
        ["--config-file", HETERO, "--resume", *opts[:-2], "OUTPUT_DIR", str(out),
         "SOLVER.MAX_ITER", "3"],
        datasets_root,
    )  # fmt: skip
    assert "teacher_eval.json" in proc.stdout + proc.stderr  # the teacher's AP read back
    assert max(r["iteration"] for r in _records(out) if "loss_kd_hetero_cls" in r) == 2


def test_mapped_classes_are_refused_by_distillers_that_compare_index_by_index(
    mapped_d_fine_teacher, datasets_root
):
    from conftest import build_cfg

    from kd.teacher import TeacherError, TeacherInfo, check_class_agreement

    cfg = build_cfg("configs/kd_shapes/faster_rcnn_kd_chen2017.yaml", TINY_RCNN_OPTS)
    info = TeacherInfo(None, "RGB", len(SUPERSET), (), mapped_d_fine_teacher, tuple(SUPERSET))
    with pytest.raises(TeacherError, match="class-count mismatch.*KD.TEACHER.CLASS_MAP maps"):
        check_class_agreement(cfg, info, "GeneralizedRCNN")


def test_a_teacher_lacking_student_classes_distils_the_others(datasets_root, tmp_path, one_thread):
    """The reverse case: the teacher knows 3 of the student's 7 classes; the other 4 are in no
    class term (mapped as documented, not refused) and the step trains."""
    import copy

    import torch
    from conftest import build_cfg
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    save_tiny("rt_detr", tmp_path / "t", ["square", "disc", "star"], size=64)
    opts = _kd_detr_opts(f"hf://{tmp_path / 't'}", tmp_path / "run")
    cfg = build_cfg("configs/kd_shapes/detr_kd_detr_hf.yaml", opts)
    model = build_model(cfg).train()
    assert model.class_map.pairs() == [("disc", "disc"), ("square", "square"), ("star", "star")]
    assert model.class_map.missing == ["ring", "triangle", "cross", "ellipse"]
    mapper = DatasetMapper(build_cfg("configs/kd_shapes/detr_student.yaml", TINY_DETR_OPTS), True)
    batch = [mapper(copy.deepcopy(d)) for d in get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]]
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(losses[f"loss_kd_kd_detr_{t}"]) for t in ("cls", "l1", "giou"))
    sum(losses.values()).backward()
    assert model.student.decoder.class_heads[0].weight.grad is not None


def _batch(cfg_file, opts):
    import copy

    from conftest import build_cfg
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    cfg = build_cfg(cfg_file, opts)
    mapper = DatasetMapper(cfg, True)
    return [mapper(copy.deepcopy(d)) for d in get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_teaches_both_distillers_a_step(family, datasets_root, tmp_path, one_thread):
    """One KD-DETR step (general points, and the teacher's own queries as specific points with
    its own content) and one DETR -> Faster R-CNN step per family: finite terms, gradients."""
    import torch
    from conftest import build_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    save_tiny(family, tmp_path / "t", _classes(), size=64)
    teacher = f"hf://{tmp_path / 't'}"
    kd = [*_kd_detr_opts(teacher, tmp_path / "a"), "KD.KD_DETR.SPECIFIC_TEACHER_CONTENT", "learned"]
    hetero = [
        *TINY_RCNN_OPTS,
        "KD.TEACHER.CONFIG_FILE", teacher,
        "KD.HETERO.RCNN_STUDENT.NUM_RANDOM_POINTS", "3",
        "OUTPUT_DIR", str(tmp_path / "b"),
    ]  # fmt: skip
    for config, opts, prefix in (
        ("configs/kd_shapes/detr_kd_detr_hf.yaml", kd, "loss_kd_kd_detr_"),
        ("configs/kd_shapes/hetero_hf_detr_to_faster_rcnn.yaml", hetero, "loss_kd_hetero_"),
    ):
        model = build_model(build_cfg(config, opts)).train()
        with EventStorage(0):
            losses = model(_batch(config, opts))
        terms = [losses[prefix + t] for t in ("cls", "l1", "giou")]
        assert all(torch.isfinite(t) for t in terms) and float(sum(terms)) > 0, (config, losses)
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.teacher.parameters())
