"""What stops a run is one line on the console and a non-zero exit status, never a traceback:
config mistakes, a resume with nothing to resume from, a diverging loss, and any other error of
the training loop, in one process or several (the traceback is in the rank's log file)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY_RCNN_OPTS, run_train_net

from kd.config import ConfigError, merge_config

STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"


def _cfg():
    from detectron2.config import get_cfg

    from kd.config import add_kd_config

    cfg = get_cfg()
    add_kd_config(cfg)
    return cfg


def _error_lines(proc: subprocess.CompletedProcess):
    return [line for line in proc.stderr.splitlines() if "error: " in line]


def test_unknown_key_on_the_command_line_names_the_closest():
    with pytest.raises(ConfigError) as e:
        merge_config(_cfg(), str(REPO / STUDENT_CONFIG), ["KD.TEACHER.WEIGHT", "t.pth"])
    assert str(e.value) == (
        "unknown config key KD.TEACHER.WEIGHT on the command line: did you mean "
        "KD.TEACHER.WEIGHTS?"
    )


def test_unknown_key_in_a_base_file_names_that_file(tmp_path):
    base, top = tmp_path / "base.yaml", tmp_path / "top.yaml"
    base.write_text("MODEL:\n  RESNET:\n    DEPTH: 18\n")
    top.write_text("_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.1\n")
    with pytest.raises(ConfigError) as e:
        merge_config(_cfg(), str(top))
    # yacs stops at the first level that does not exist: MODEL.RESNET.
    assert str(e.value) == (
        f"unknown config key MODEL.RESNET in {base}: did you mean MODEL.RESNETS or "
        "MODEL.RETINANET?"
    )


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ["SOLVER.BASE_LR", "fast"],
            "SOLVER.BASE_LR fast on the command line: SOLVER.BASE_LR takes a float (now 0.01), "
            "not the str fast",
        ),
        (
            ["SOLVER.BASE_LR"],
            "the overrides on the command line must be KEY VALUE pairs, got 1 words (the last, "
            "'SOLVER.BASE_LR', has no value)",
        ),
    ],
)
def test_bad_overrides(opts, message):
    with pytest.raises(ConfigError) as e:
        merge_config(_cfg(), str(REPO / STUDENT_CONFIG), opts)
    assert str(e.value) == message


def test_config_typo_is_one_line_before_any_process_starts(capsys):
    """train_net.py's entry: the config is read before any of the 2 processes starts."""
    from detectron2.engine import default_argument_parser

    import train_net

    argv = [
        "--num-gpus",
        "2",
        "--config-file",
        str(REPO / STUDENT_CONFIG),
        "KD.TEACHER.WEIGHT",
        "x",
    ]
    args = default_argument_parser().parse_args(argv)
    started = []
    assert train_net.launch(started.append, args, check=train_net.load_config) == 2
    assert not started
    assert capsys.readouterr().err.splitlines() == [
        "error: unknown config key KD.TEACHER.WEIGHT on the command line: did you mean "
        "KD.TEACHER.WEIGHTS?"
    ]


def test_resume_with_nothing_readable_is_one_line(datasets_root, tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")  # deleted since
    argv = [
        "--config-file",
        STUDENT_CONFIG,
        "--resume",
        *TINY_RCNN_OPTS,
        "OUTPUT_DIR",
        str(tmp_path),
    ]
    proc = run_train_net(argv, datasets_root, check=False)
    assert proc.returncode == 1
    lines = _error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"error: --resume: no checkpoint in {tmp_path}")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_diverging_loss_is_one_line_with_what_to_try(datasets_root, tmp_path):
    argv = ["--config-file", STUDENT_CONFIG, *TINY_RCNN_OPTS, "OUTPUT_DIR", str(tmp_path)]
    argv += ["SOLVER.BASE_LR", "1000.0", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "8"]
    argv += ["SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()"]
    proc = run_train_net(argv, datasets_root, check=False)
    assert proc.returncode == 1
    lines = _error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: training diverged at iteration ")
    iteration = int(lines[0].split("iteration ")[1].split(":")[0])
    for advice in ("SOLVER.BASE_LR (now 1000.0)", "SOLVER.WARMUP_ITERS", "SOLVER.CLIP_GRADIENTS"):
        assert advice in lines[0]
    # Checkpoints 0 .. iteration-1 were written after their iterations; none after the failure.
    kept = sorted(n for n in os.listdir(tmp_path) if n.startswith("model_"))
    assert kept == [f"model_{i:07d}.pth" for i in range(iteration)]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (tmp_path / "log.txt").read_text().count("Traceback") == 1


def test_error_in_the_training_loop_of_two_processes(datasets_root, tmp_path):
    """Rank 1 fails at iteration 1: its one line names the iteration and its log file, which holds
    the traceback; rank 0, left waiting in a collective, says at most one line; no tracebacks."""
    out = tmp_path / "run"
    argv = ["--num-gpus", "2", "--config-file", STUDENT_CONFIG, *TINY_RCNN_OPTS]
    argv += ["SOLVER.IMS_PER_BATCH", "4", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    code = (
        "import sys; sys.path.insert(0, 'tests'); from dist_worker import main; "
        f"sys.exit(main({str(out)!r}, {argv!r}, fail_at=(1, 1)))"
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1
    lines = _error_lines(proc)
    assert (
        f"[rank 1] error: training stopped at iteration 1: RuntimeError: injected failure on "
        f"rank 1; full traceback in {out / 'log.txt.rank1'}"
    ) in lines
    others = [line for line in lines if not line.startswith("[rank 1]")]
    assert len(lines) <= 2 and all("lost contact" in line for line in others), lines
    assert "Traceback" not in proc.stdout + proc.stderr
    log = (out / "log.txt.rank1").read_text()
    assert log.count("Traceback") == 1 and "injected failure on rank 1" in log


KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"
TYPO = ["KD.CHEN2017.HINT.WIEGHT", "1"]
IMAGE = "docs/images/bccd_benchmark.png"  # any image
TYPO_LINE = "unknown config key KD.CHEN2017.HINT.WIEGHT on the command line: did you mean"


@pytest.mark.parametrize(
    "tool, args, message",
    [
        ("benchmark_kd.py", ["--configs", KD_CONFIG, "--iters", "1", *TYPO], TYPO_LINE),
        (
            "benchmark_kd.py",
            ["--configs", KD_CONFIG, *TYPO],
            "--configs KD.CHEN2017.HINT.WIEGHT 1: not config files (.yaml); write KEY VALUE "
            "overrides after the other options",
        ),
        (
            "extract_student.py",
            ["--config-file", KD_CONFIG, "--input", "x.pth", "--output", "y.pth", *TYPO],
            TYPO_LINE,
        ),
        (
            "predict.py",
            ["--config-file", KD_CONFIG, "--input", IMAGE, "--output", "unused", *TYPO],
            TYPO_LINE,
        ),
        (
            "visualize_points.py",
            ["--config-file", KD_CONFIG, "--output", "unused", *TYPO],
            TYPO_LINE,
        ),
        (
            "probe_quality.py",
            ["--config-file", "configs/missing.yaml", "--weights", "x.pth"],
            "--config-file 'configs/missing.yaml' does not exist",
        ),
        (
            "probe_quality.py",
            ["--config-file", "hf://output/teacher"],
            "--data-config: an hf:// teacher is asked on that config's test data",
        ),
    ],
)
def test_tools_read_configs_as_train_net_does(tool, args, message):
    """Every tool reads its config through kd.config.load_config: a misspelt key or a missing
    file is one line naming it (with the closest keys), a non-zero status, no traceback."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode != 0
    errors = _error_lines(proc)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
