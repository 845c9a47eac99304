#!/usr/bin/env python
"""The training part of ``tools/gpu_check.sh``: every distiller config a few iterations in each
precision, a resume, and two processes on one GPU refused.

    python tools/gpu_check.py [--device cuda|cpu] [--iters 5] [--out DIR] [--configs A.yaml ...]
        [--json OUT.json] [KEY VALUE ...]

* **Precisions.** Each config trains ``--iters`` iterations through the project's trainer, in one
  process, as ``fp32`` (the defaults), ``amp`` (``SOLVER.AMP``: float16 with a gradient scaler on
  CUDA, bfloat16 on the CPU) and ``half_teacher`` (``KD.TEACHER.DTYPE``: bfloat16 where the GPU
  has it, else float16; bfloat16 on the CPU). A run passes when every logged loss is finite. Its
  seconds per iteration (after the first) and, on CUDA, its peak allocated memory are reported.
* **Resume.** ``train_net.py`` (a process of its own) trains the first config with AMP to its
  last checkpoint, and ``--resume`` continues from it (the gradient scaler's state included).
* **Refusal.** On CUDA, ``train_net.py --num-gpus 2`` with one GPU visible and ``torchrun`` with
  two processes on that GPU must each stop with a one-line error naming the cause (not an NCCL
  error); on the CPU, ``MODEL.DEVICE cuda`` must stop with its one line.

Teachers: the benchmark's trained teacher where ``tools/benchmark_table.py`` made one, else a
randomly initialised one (saved under ``OUT/teachers``): the check is about running, not AP.
Exits 1 when anything failed, after running everything.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
from detectron2.engine import HookBase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))

MODES = ("fp32", "amp", "half_teacher")


def mode_options(mode: str, device: str) -> List[str]:
    """The config overrides of a precision mode on ``device``."""
    cuda = device.startswith("cuda")
    if mode == "fp32":
        return []
    if mode == "amp":
        return ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "float16" if cuda else "bfloat16"]
    if mode == "half_teacher":
        bf16 = not cuda or torch.cuda.is_bf16_supported()
        return ["KD.TEACHER.DTYPE", "bfloat16" if bf16 else "float16"]
    raise ValueError(f"unknown mode {mode}")


def common_options(args, out_dir: str, iters: int) -> List[str]:
    return [
        *("MODEL.DEVICE", args.device, "SOLVER.MAX_ITER", str(iters), "OUTPUT_DIR", out_dir),
        *("DATASETS.TEST", "()", "KD.TEACHER.EVALUATE", "False"),
        *("SOLVER.CHECKPOINT_PERIOD", str(max(iters, 1))),
    ]


class IterationTimes(HookBase):
    """Times each training step (the first, a warm-up, is left out of the mean)."""

    def __init__(self):
        self.times: List[float] = []

    def before_step(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def after_step(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def train_one(path: str, mode: str, args, teachers: str) -> Dict[str, object]:
    """``--iters`` iterations of one config in one precision mode, in this process."""
    from kd.benchmark.timing import ensure_teacher_weights
    from kd.config import load_config
    from kd.engine import Trainer

    out = os.path.join(args.out, "runs", os.path.splitext(os.path.basename(path))[0], mode)
    cfg = load_config(
        path, [*args.opts, *mode_options(mode, args.device), *common_options(args, out, args.iters)]
    )
    source = ensure_teacher_weights(cfg, teachers)
    cfg.freeze()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timer = IterationTimes()
    trainer = Trainer(cfg)
    trainer.register_hooks([timer])
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = {
        k: [v for v, _ in h.values()]
        for k, h in trainer.storage.histories().items()
        if k.startswith("loss") or k == "total_loss"
    }
    bad = sorted(k for k, v in losses.items() if not all(math.isfinite(x) for x in v))
    timed = timer.times[1:] or timer.times
    return {
        "config": path,
        "mode": mode,
        "teacher": source,
        "teacher_weights": cfg.KD.TEACHER.WEIGHTS,
        "ok": bool(losses) and not bad,
        "problem": f"non-finite {', '.join(bad)}" if bad else ("" if losses else "no losses"),
        "s_per_iter": sum(timed) / len(timed) if timed else None,
        "peak_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
        ),
        "total_loss": losses.get("total_loss", [None])[-1],
    }


def _train_net(argv: List[str], env: Optional[dict] = None, module: Optional[List[str]] = None):
    command = [sys.executable, *(module or []), os.path.join(ROOT, "train_net.py"), *argv]
    return subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _error_lines(proc) -> List[str]:
    return [line for line in proc.stderr.splitlines() if "error: " in line]


def check_resume(path: str, teacher_weights: str, args) -> Dict[str, object]:
    """AMP training to a checkpoint, then ``--resume`` past it, with ``train_net.py``."""
    out = os.path.join(args.out, "resume")
    first = max(args.iters, 1)
    opts = [*args.opts, *mode_options("amp", args.device), "KD.TEACHER.WEIGHTS", teacher_weights]
    base = ["--config-file", path, *opts]
    a = _train_net([*base, *common_options(args, out, first)])
    if a.returncode != 0:
        return {"ok": False, "problem": (_error_lines(a) or a.stderr.splitlines()[-1:] or ["?"])[0]}
    b = _train_net(["--resume", *base, *common_options(args, out, 2 * first)])
    resumed = f"Starting training from iteration {first}" in b.stdout + b.stderr
    ok = b.returncode == 0 and resumed
    problem = "" if ok else ((_error_lines(b) or ["did not resume from its checkpoint"])[0])
    return {"ok": ok, "problem": problem}


def check_refusals(path: str, teacher_weights: str, args) -> List[Dict[str, object]]:
    """Two processes on one GPU (CUDA) or CUDA without a GPU (CPU) stop with one line."""
    base = ["--config-file", path, *args.opts, "KD.TEACHER.WEIGHTS", teacher_weights]
    base += common_options(args, os.path.join(args.out, "refused"), 1)[2:]  # no MODEL.DEVICE
    cases = []
    if args.device.startswith("cuda"):
        one_gpu = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")[:1]}
        cases.append(
            ("--num-gpus 2 on one GPU", _train_net(["--num-gpus", "2", *base], one_gpu), "NCCL")
        )
        torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        cases.append(
            (
                "torchrun, 2 processes on one GPU",
                _train_net(base, one_gpu, torchrun),
                "share one GPU",
            )
        )
    else:
        cases.append(
            (
                "MODEL.DEVICE cuda without CUDA",
                _train_net([*base, "MODEL.DEVICE", "cuda"]),
                "no CUDA device",
            )
        )
    rows = []
    for name, proc, expected in cases:
        lines = _error_lines(proc)
        # torchrun: one line per process, each naming the cause (torchrun then prints its own
        # summary of the failed processes); the others: one line and no traceback.
        ok = (
            proc.returncode != 0
            and bool(lines)
            and all(expected in line for line in lines)
            and (
                name.startswith("torchrun") or (len(lines) == 1 and "Traceback" not in proc.stderr)
            )
        )
        rows.append({"check": name, "ok": ok, "lines": lines or proc.stderr.splitlines()[-3:]})
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="distiller configs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5, help="iterations per run")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", default=os.path.join("output", "gpu_check"))
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    args.out = os.path.abspath(args.out)
    import kd  # noqa: F401  (registers the distillers and the datasets)
    from kd.benchmark.timing import method_configs

    configs = args.configs or method_configs("kd_shapes")
    teachers = os.path.join(args.out, "teachers")
    os.makedirs(teachers, exist_ok=True)
    runs = []
    for path in configs:
        for mode in args.modes:
            try:
                row = train_one(path, mode, args, teachers)
            except Exception as e:  # noqa: BLE001 (a failed run is a finding; the others go on)
                first = " ".join(str(e).split())[:300]
                row = {"config": path, "mode": mode, "ok": False, "problem": first}
            runs.append(row)
            secs = row.get("s_per_iter")
            peak = row.get("peak_mb")
            print(
                f"[gpu_check] {os.path.basename(path)} {mode}: "
                + ("ok" if row["ok"] else f"FAILED ({row['problem']})")
                + (f", {secs:.3f} s/iter" if secs is not None else "")
                + (f", peak {peak:.0f} MiB" if peak is not None else ""),
                flush=True,
            )
    weights = next((r["teacher_weights"] for r in runs if r.get("teacher_weights")), None)
    checks = []
    if weights:
        resume = check_resume(configs[0], weights, args)
        checks.append({"check": f"AMP resume ({os.path.basename(configs[0])})", **resume})
        checks += check_refusals(configs[0], weights, args)
    for c in checks:
        detail = c.get("problem") or " | ".join(c.get("lines", []))
        print(f"[gpu_check] {c['check']}: {'ok' if c['ok'] else 'FAILED'} {detail}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "runs": runs, "checks": checks}, f, indent=1)
    failed = [r for r in runs + checks if not r["ok"]]
    if failed or not weights:
        raise SystemExit(1)


if __name__ == "__main__":
    from kd.launch import run_guarded

    run_guarded(main)
