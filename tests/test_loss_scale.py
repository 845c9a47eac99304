"""tools/loss_scale.py: every loss term on the first training batches, weights applied."""

import math
import subprocess
import sys

import pytest
from conftest import REPO, kd_opts, load_script

CHEN = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"


def test_report_means_ranges_and_sums():
    ls = load_script("tools/loss_scale.py")
    report = ls.format_report(
        {"loss_cls": [1.0, 3.0], "loss_box_reg": [0.5, 0.5], "loss_kd_x": [10.0, 20.0, 30.0]}
    ).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in report[1:]}
    assert [float(v) for v in rows["loss_cls"]] == [2.0, 1.0, 3.0]
    assert [float(v) for v in rows["loss_kd_x"]] == [20.0, 10.0, 30.0]
    assert report[-2].split()[-1] == "2.5"  # model (sum): 2.0 + 0.5
    assert report[-1].split()[-1] == "20"  # distillation: the loss_kd_* terms only


def test_terms_are_reported_with_their_weights(tiny_teacher, tmp_path, one_thread):
    """The same batches and initial model each time: doubling the hint weight doubles the hint
    term and leaves every other term as it was."""
    ls = load_script("tools/loss_scale.py")
    opts = [*kd_opts(tiny_teacher, tmp_path), "KD.CHEN2017.HINT.WEIGHT"]
    one = ls.loss_values(CHEN, [*opts, "1.0"], batches=2)
    two = ls.loss_values(CHEN, [*opts, "2.0"], batches=2)
    assert set(one) == set(two) and "loss_kd_chen2017_hint" in one
    assert all(len(v) == 2 for v in one.values())
    for name in one:
        factor = 2.0 if name == "loss_kd_chen2017_hint" else 1.0
        for a, b in zip(one[name], two[name]):
            assert math.isclose(b, factor * a, rel_tol=1e-5, abs_tol=1e-7), name


@pytest.mark.parametrize(
    "argv",
    [
        ["a.yaml", "--batches", "2", "KD.GID.FEATURE_WEIGHT", "1.0", "SEED", "-1"],
        ["a.yaml", "KD.GID.FEATURE_WEIGHT", "1.0", "--batches", "2", "SEED", "-1"],
        ["--batches", "2", "a.yaml", "KD.GID.FEATURE_WEIGHT", "1.0", "SEED", "-1"],
    ],
)
def test_options_and_overrides_in_any_order(argv):
    """The usage line's order (config, --batches, overrides) and the others read the same."""
    args = load_script("tools/loss_scale.py").parse_args(argv)
    assert (args.config_file, args.batches) == ("a.yaml", 2)
    assert args.opts == ["KD.GID.FEATURE_WEIGHT", "1.0", "SEED", "-1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["configs/kd_shapes/missing.yaml"], "missing.yaml"),
        ([CHEN, "KD.CHEN2017.HINT.WIEGHT", "1"], "WIEGHT"),
    ],
)
def test_bad_input_is_one_line(args, message):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "loss_scale.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
