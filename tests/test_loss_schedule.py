"""KD.LOSS_SCHEDULE: the factor of the KD terms per iteration (kd/schedule.py), applied by every
distiller, resume-exact."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import assert_resume_equals_uninterrupted, build_cfg, kd_opts

KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"


def schedule(**kw):
    from kd.schedule import KDLossSchedule

    return KDLossSchedule(**kw)


def test_factors_by_hand():
    """Warm-up from 0, a constant 1, then stop / linear / cosine to MAX_ITER (values by hand)."""
    warm = schedule(warmup_iters=100)
    assert [warm(i) for i in (0, 25, 99, 100, 5000)] == [0.0, 0.25, 0.99, 1.0, 1.0]
    stop = schedule(warmup_iters=10, end_iter=800, after_end="stop", max_iter=1000)
    assert [stop(i) for i in (5, 10, 799, 800, 999)] == [0.5, 1.0, 1.0, 0.0, 0.0]
    linear = schedule(end_iter=800, after_end="linear", max_iter=1000)
    assert [linear(i) for i in (799, 800, 850, 900, 1000)] == [1.0, 1.0, 0.75, 0.5, 0.0]
    cosine = schedule(end_iter=800, after_end="cosine", max_iter=1000)
    # (1 + cos(pi/4)) / 2 = (1 + 0.70710678) / 2
    assert cosine(850) == pytest.approx(0.8535533906, abs=1e-9)
    assert cosine(900) == pytest.approx(0.5, abs=1e-12) and cosine(1000) == pytest.approx(0.0)
    assert math.isclose(cosine(800), 1.0)


def test_default_is_constant_one():
    """The defaults keep today's behaviour: 1 everywhere, flagged constant (nothing applied)."""
    from detectron2.config import get_cfg

    from kd.config import add_kd_config
    from kd.schedule import KDLossSchedule

    cfg = get_cfg()
    add_kd_config(cfg)
    s = KDLossSchedule(cfg)
    assert s.constant and all(s(i) == 1.0 for i in (0, 1, 10**6))


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(after_end="exponential"), "AFTER_END"),
        (dict(warmup_iters=-1), "WARMUP_ITERS"),
        (dict(end_iter=900, after_end="linear", max_iter=900), "below SOLVER.MAX_ITER"),
        (dict(warmup_iters=500, end_iter=400), "ends after END_ITER"),
    ],
)
def test_bad_schedules_are_one_clear_error(kw, words):
    with pytest.raises(ValueError, match=words):
        schedule(**kw)


@pytest.fixture(scope="module")
def batch(datasets_root):
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    cfg = build_cfg("configs/kd_shapes/faster_rcnn_student.yaml", kd_opts(("", ""), "/tmp"))
    mapper = DatasetMapper(cfg, True)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]
    np.random.seed(0)
    return [mapper(copy.deepcopy(d)) for d in dicts]


def test_distiller_scales_only_its_kd_terms(tiny_teacher, tmp_path, batch):
    """At iteration 30 of a 100-iteration warm-up, every loss_kd_* term is 0.3 times the one the
    same distiller returns without a schedule (same RNG draws), the student's losses equal, and
    the factor is logged; outside a trainer (no EventStorage) nothing is scaled."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    cfg = build_cfg(
        KD_CONFIG, [*kd_opts(tiny_teacher, tmp_path), "KD.LOSS_SCHEDULE.WARMUP_ITERS", "100"]
    )
    model = build_model(cfg)
    model.train()
    with EventStorage(30) as storage:
        torch.manual_seed(5)
        scheduled = model(batch)
        factor = storage.latest()["kd/loss_factor"][0]
        torch.manual_seed(5)
        plain = model.forward_train(batch)
    assert factor == 0.3
    kd = [k for k in plain if k.startswith("loss_kd_")]
    assert len(kd) == 5
    for k, v in plain.items():
        expected = 0.3 * v.item() if k in kd else v.item()
        assert scheduled[k].item() == pytest.approx(expected, rel=1e-6), k
    torch.manual_seed(5)
    with EventStorage(0):
        outside = model.forward_train(batch)
    torch.manual_seed(5)
    model.loss_schedule = None  # as a distiller built without one
    with EventStorage(0):
        assert model(batch)["loss_kd_chen2017_hint"].item() == pytest.approx(
            outside["loss_kd_chen2017_hint"].item(), rel=1e-6
        )


def test_schedule_is_resume_exact(datasets_root, tiny_teacher, tmp_path):
    """Warm-up over 4 iterations and a stop at 5: a run interrupted at 3 and resumed ends with
    the uninterrupted run's weights (a factor counted from the process start would not)."""
    schedule_opts = ["KD.LOSS_SCHEDULE.WARMUP_ITERS", "4", "KD.LOSS_SCHEDULE.END_ITER", "5"]
    assert_resume_equals_uninterrupted(
        KD_CONFIG,
        lambda out: [*kd_opts(tiny_teacher, out), *schedule_opts],
        datasets_root,
        tmp_path,
    )
