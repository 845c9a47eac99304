"""KD.TEACHER.INPUT_AP_GAP: the teacher evaluated at its own test size too when a run feeds it
another, and a warning when it answers far worse at the run's."""

import json
import logging

import pytest
from conftest import kd_opts, run_train_net

KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"


def test_teacher_measured_at_both_sizes(datasets_root, tiny_teacher, tmp_path):
    """The tiny teacher's config tests at 64 px; this run at 48: two cache entries (the second
    marked own_input, at 64), both logged at iteration 0, and read back by the benchmark's
    reader as teacher_AP (the run's input) and teacher_own_AP."""
    from kd.experiments import read_results

    out = tmp_path / "run"
    argv = [
        "--config-file", KD_CONFIG, *kd_opts(tiny_teacher, out),
        "KD.TEACHER.EVALUATE", "True", "KD.TEACHER.MIN_AP", "0.0", "SOLVER.MAX_ITER", "1",
        "INPUT.MIN_SIZE_TEST", "48", "INPUT.MAX_SIZE_TEST", "48",
    ]  # fmt: skip
    run_train_net(argv, datasets_root)
    cache = json.loads((out / "teacher_eval.json").read_text())
    sizes = [(e["key"]["input"]["min_size_test"], e["key"].get("own_input", False)) for e in cache]
    assert sizes == [(48, False), (64, True)]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    first = next(r for r in rows if "teacher/bbox/AP" in r)
    assert first["iteration"] == 0
    assert first["teacher/own_input/bbox/AP"] == cache[1]["results"]["bbox"]["AP"]
    results = read_results(str(out))
    assert results["teacher_AP"] == round(cache[0]["results"]["bbox"]["AP"], 2)
    assert results["teacher_own_AP"] == round(cache[1]["results"]["bbox"]["AP"], 2)


@pytest.mark.parametrize("fed, own, warned", [(30.0, 40.0, True), (36.0, 40.0, False)])
def test_gap_warning(caplog, fed, own, warned):
    """More than KD.TEACHER.INPUT_AP_GAP (5) AP points below its own: one warning saying what
    to do; within it, none."""
    from detectron2.config import get_cfg

    from kd.config import add_kd_config
    from kd.teacher_eval import TeacherEvalHook

    cfg = get_cfg()
    add_kd_config(cfg)
    with caplog.at_level(logging.WARNING, logger="kd.teacher_eval"):
        TeacherEvalHook._compare(cfg, "bccd_val", fed, own)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == int(warned)
    if warned:
        assert "30.00 AP on bccd_val" in warnings[0] and "40.00 at its own" in warnings[0]
        assert "Train the teacher at the student's input" in warnings[0]
