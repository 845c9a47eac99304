"""Preemption: SIGTERM / SIGUSR1 save a checkpoint after the current step, on every rank, and
the run resumes from it exactly."""

import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RCNN_OPTS

STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"


pytestmark = pytest.mark.usefixtures("rng_left_as_found")


class _Checkpointer:
    def __init__(self):
        self.saved = []

    def save(self, name, **kwargs):
        self.saved.append((name, kwargs))


def _stub_trainer(tmp_path, iteration: int, max_iter: int = 10):
    return types.SimpleNamespace(
        iter=iteration,
        max_iter=max_iter,
        cfg=types.SimpleNamespace(OUTPUT_DIR=str(tmp_path)),
        checkpointer=_Checkpointer(),
    )


def test_sigusr1_saves_after_the_step_and_stops(tmp_path, capsys):
    from kd.preemption import Preempted, PreemptionHook

    before_save = []
    hook = PreemptionHook(lambda: before_save.append(True))
    hook.trainer = _stub_trainer(tmp_path, iteration=4)
    previous = signal.getsignal(signal.SIGUSR1)
    hook.before_train()
    try:
        hook.after_step()  # no signal: nothing happens
        assert not hook.trainer.checkpointer.saved
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal; without the hook: death
        os.kill(os.getpid(), signal.SIGUSR1)  # the same request again (group + forwarded)
        with pytest.raises(Preempted) as stopped:
            hook.after_step()
    finally:
        hook.after_train()
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert before_save == [True]
    assert hook.trainer.checkpointer.saved == [("model_0000004", {"iteration": 4})]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"stopped by SIGUSR1 after iteration 4: saved {tmp_path / 'model_0000004.pth'}; "
        "continue with --resume"
    ]
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_signal_after_the_last_step_lets_the_run_finish(tmp_path):
    from kd.preemption import PreemptionHook

    hook = PreemptionHook(lambda: None)
    hook.trainer = _stub_trainer(tmp_path, iteration=9, max_iter=10)
    hook.before_train()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        hook.after_step()  # the final checkpoint and evaluation follow anyway
    finally:
        hook.after_train()
    assert not hook.trainer.checkpointer.saved


def _train_net(args, env, out: Path, **popen):
    with open(out.parent / f"{out.name}.stdout", "w") as so, open(
        out.parent / f"{out.name}.stderr", "w"
    ) as se:
        return subprocess.Popen(
            [sys.executable, str(REPO / "train_net.py"), *args],
            cwd=REPO,
            env=env,
            stdout=so,
            stderr=se,
            **popen,
        )


def test_sigterm_to_a_two_process_run_saves_and_resumes_exactly(datasets_root, tmp_path):
    """What SLURM and Kubernetes do before killing a job: SIGTERM to the process they started.
    Both ranks stop after the same step, with one checkpoint and one line; --resume ends with the
    weights (parameters and each rank's BatchNorm statistics) of a run never interrupted."""
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(datasets_root),
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
    )
    opts = [*TINY_RCNN_OPTS, "SOLVER.IMS_PER_BATCH", "4", "DATASETS.TEST", "()"]

    def argv(out: Path, max_iter: int, *resume: str):
        return [
            "--num-gpus", "2", "--dist-url", "auto", "--config-file", STUDENT_CONFIG, *resume,
            *opts, "SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(out),
        ]  # fmt: skip

    stopped = tmp_path / "stopped"
    proc = _train_net(argv(stopped, 1000), env, stopped)
    try:
        deadline = time.time() + 300
        log = stopped / "log.txt"
        while "Starting training" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # the handlers are set before that line is logged
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "stopped.stderr").read_text()
    lines = [line for line in err.splitlines() if "SIGTERM" in line or "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(
        r"stopped by SIGTERM after iteration (\d+): saved (\S+); continue with --resume", lines[0]
    )
    assert m, lines
    iteration = int(m.group(1))
    assert Path(m.group(2)) == stopped / f"model_{iteration:07d}.pth"
    assert (stopped / "last_checkpoint").read_text() == f"model_{iteration:07d}.pth"
    assert not (stopped / ".kd_run.lock").exists()

    max_iter = iteration + 2
    straight = tmp_path / "straight"
    # Side by side: most of each run is starting its processes.
    runs = [
        (out, _train_net(argv(out, max_iter, *resume), env, out))
        for out, resume in ((stopped, ("--resume",)), (straight, ()))
    ]
    for out, proc in runs:
        assert proc.wait(timeout=300) == 0, (out.parent / f"{out.name}.stderr").read_text()[-3000:]
    assert f"Starting training from iteration {iteration + 1}" in (stopped / "log.txt").read_text()
    a = torch.load(straight / "model_final.pth", weights_only=True)["model"]
    b = torch.load(stopped / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"the resumed run differs from the uninterrupted one in {different[:5]}"
