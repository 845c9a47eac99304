"""Runs of ``train_net.py`` for the demo and the benchmarks: one schedule rule, skip and resume.

Every run goes through ``train_net.py`` in a subprocess (what the figures show is what users
run) and evaluates with COCOEvaluator; a run whose ``eval_results.json`` exists is not repeated
and an interrupted one resumes from its last checkpoint, so an interrupted demo or benchmark can
simply be started again.
"""

import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import yaml

from kd.teacher_eval import CACHE_FILE

__all__ = [
    "ROOT",
    "KEEP_FREED_MEMORY",
    "schedule_opts",
    "prepare_kd_shapes",
    "read_results",
    "train_and_evaluate",
    "train_hf_teacher_and_evaluate",
]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Which lines of train_net.py's output to show: iteration progress and the final AP table.
_PROGRESS_MARKS = ("eta:", "Evaluation results for bbox", "error:", "train_hf_teacher]")

# glibc's malloc maps big blocks (a detector's activations) anew for each allocation and gives
# freed memory back to the OS, so on CPU every training step pays page faults for them again.
# With no block mapped on its own (mmap threshold 4 GiB) and nothing given back (trim threshold
# 64 GiB) a process keeps its peak memory and steps are much cheaper (docs/cost.md, "Training on
# CPU"). Only glibc reads these variables; values set in the environment win.
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str((4 << 30) - 1),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
}


def schedule_opts(iters: int, evals: int = 0) -> List[str]:
    """``KEY VALUE`` overrides for a run of ``iters`` iterations.

    LR steps at 75% and 92%, warmup of a fifth (at most 100 iterations), a checkpoint every
    quarter, at most every 500 iterations (what an interrupted run resumes from: a long run
    killed at the end of a session loses at most 500 iterations).

    Args:
        iters: the run's iterations.
        evals: evaluations during the run (``TEST.EVAL_PERIOD`` ``iters // evals``; the curve
            :func:`read_results` returns); 0 evaluates once, at the end.
    """
    periodic = ["TEST.EVAL_PERIOD", str(max(iters // evals, 1))] if evals else []
    return periodic + [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({int(iters * 0.75)},{int(iters * 0.92)})",
        "SOLVER.CHECKPOINT_PERIOD",
        str(min(max(iters // 4, 1), 500)),
        "SOLVER.WARMUP_ITERS",
        str(min(100, iters // 5)),
    ]


def prepare_kd_shapes(datasets: str, num_train: int, num_val: int, seed: int = 0) -> None:
    """Generate kd_shapes under ``datasets`` unless it is there."""
    if os.path.isfile(os.path.join(datasets, "kd_shapes", "annotations", "instances_val.json")):
        print(f"[kd] kd_shapes found under {datasets}")
        return
    print(f"[kd] generating kd_shapes under {datasets} ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            "datasets/prepare_synthetic.py",
            "--root",
            datasets,
            "--name",
            "kd_shapes",
            "--seed",
            str(seed),
            "--num-train",
            str(num_train),
            "--num-val",
            str(num_val),
        ],
        cwd=ROOT,
        check=True,
    )


def read_results(out_dir: str) -> Dict[str, float]:
    """AP, AP50, AP75 and each class's AP (``AP-<class>``, COCOEvaluator's names; a class
    without a figure, e.g. absent from the evaluation set, is left out) of a finished run (its
    ``eval_results.json``), and for a distilled student the box AP its teacher scored before
    the first step, on the student's input (``teacher_AP``, from ``teacher_eval.json``) and at
    its own test size where that differs (``teacher_own_AP``), and
    for a run evaluated periodically its ``curve``: ``[[iteration, AP], ...]`` from
    ``metrics.json`` (the iteration an evaluation followed, counted from 1)."""
    with open(os.path.join(out_dir, "eval_results.json")) as f:
        bbox = json.load(f)["bbox"]
    results = {
        k: round(float(v), 2)
        for k, v in bbox.items()
        if (k in ("AP", "AP50", "AP75") or k.startswith("AP-")) and math.isfinite(float(v))
    }
    teacher_eval = os.path.join(out_dir, CACHE_FILE)
    if os.path.isfile(teacher_eval):
        with open(teacher_eval) as f:
            entries = json.load(f)
        # The last evaluation: the teacher this run resumed with; at the run's input, and at
        # the teacher's own test size where it was measured too (KD.TEACHER.INPUT_AP_GAP).
        for name, own in (("teacher_AP", False), ("teacher_own_AP", True)):
            fed = [e for e in entries if bool(e["key"].get("own_input")) == own]
            if fed:
                results[name] = round(float(fed[-1]["results"]["bbox"]["AP"]), 2)
    curve = ap_curve(out_dir)
    if len(curve) > 1:
        results["curve"] = curve
    return results


def ap_curve(out_dir: str) -> List[List[float]]:
    """``[[iteration, AP], ...]`` of every evaluation a run logged in ``metrics.json`` (a resumed
    run's repeated iterations keep the last value), in iteration order; empty without any."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    # The evaluation after the last step is logged at MAX_ITER itself (detectron2's trainer
    # counts one past the loop when it has finished), the periodic ones one before their count.
    last = _max_iter(out_dir)
    by_iter: Dict[int, float] = {}
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            ap = entry.get("bbox/AP")
            if ap is not None and math.isfinite(float(ap)):
                it = int(entry["iteration"])
                by_iter[it if it == last else it + 1] = round(float(ap), 2)
    return [[i, by_iter[i]] for i in sorted(by_iter)]


def _max_iter(out_dir: str) -> Optional[int]:
    """``SOLVER.MAX_ITER`` of the run's ``config.yaml`` (train_net.py writes it), if readable."""
    try:
        with open(os.path.join(out_dir, "config.yaml")) as f:
            return int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _shorten(line: str) -> str:
    # "[time d2.utils.events]:  eta: ... iter: N  total_loss: ..." -> from "eta:" on, 150 chars
    line = line.rstrip()
    return line[line.find("eta:") :][:150] if "eta:" in line else line[-150:]


def train_and_evaluate(
    name: str, config: str, out_dir: str, iters: int, opts: Sequence[str] = (), evals: int = 0
) -> Dict[str, float]:
    """Train ``config`` for ``iters`` iterations into ``out_dir`` and return its AP figures.

    Args:
        name: what the progress lines call the run.
        config: config file, relative to the repository root.
        out_dir: the run's OUTPUT_DIR.
        iters: iterations (the schedule follows :func:`schedule_opts`).
        opts: more ``KEY VALUE`` overrides (teacher weights, seed, method switches).
        evals: evaluations during training (:func:`schedule_opts`), 0 for one at the end.
    """
    cmd = [sys.executable, "train_net.py", "--config-file", config, "--resume"]
    cmd += ["OUTPUT_DIR", out_dir, *schedule_opts(iters, evals), *opts]
    return _train_once(name, cmd, out_dir, iters, f"{out_dir}/log.txt")


def train_hf_teacher_and_evaluate(
    name: str, out_dir: str, iters: int, opts: Sequence[str] = ()
) -> Dict[str, float]:
    """Train a Hugging Face RT-DETR teacher with ``tools/train_hf_teacher.py`` into ``out_dir``
    (resumed when interrupted) and return its AP figures on ``<dataset>_val``.

    Args:
        name: what the progress lines call the run.
        out_dir: the folder it writes (an ``hf://`` teacher).
        iters: iterations.
        opts: more arguments of the tool (``--dataset``, ``--size``, ``--seed``, ...).
    """
    cmd = [sys.executable, os.path.join("tools", "train_hf_teacher.py"), "--output", out_dir]
    cmd += ["--iters", str(iters), "--eval", *opts]
    return _train_once(name, cmd, out_dir, iters, "its output above")


def _train_once(name: str, cmd: List[str], out_dir: str, iters: int, log: str) -> Dict[str, float]:
    """Run a training command unless ``out_dir`` holds its results already; its AP figures."""
    if os.path.isfile(os.path.join(out_dir, "eval_results.json")):
        print(f"[kd] {name}: already done ({out_dir})", flush=True)
        return read_results(out_dir)
    print(f"[kd] {name}: training {iters} iterations -> {out_dir} (log: {log})")
    _run(name, cmd, log)
    return read_results(out_dir)


def _run(name: str, cmd: List[str], log: str) -> None:
    """Run a training command from the repository root, printing its progress lines."""
    start = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**KEEP_FREED_MEMORY, **os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: List[str] = []
    table_lines = 0
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if any(mark in line for mark in _PROGRESS_MARKS):
            table_lines = 4 if "Evaluation results" in line else 0
            print(f"  {_shorten(line)}", flush=True)
        elif table_lines:
            table_lines -= 1
            print(f"  {line.rstrip()}", flush=True)
    if proc.wait() != 0:
        sys.stdout.write("".join(tail))
        raise SystemExit(f"[kd] {name} failed (exit {proc.returncode}); see {log}")
    print(f"[kd] {name}: done in {time.time() - start:.0f} s", flush=True)
