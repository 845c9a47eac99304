#!/usr/bin/env python
"""The demo: generate kd_shapes, train a teacher, a baseline student and distilled students.

    python tools/demo.py [--teacher-iters N] [--student-iters N] [--output output/demo]

Every run goes through train_net.py (so what the demo shows is what users run), evaluates with
COCOEvaluator on kd_shapes_val, and the demo ends by printing a table and writing
``OUTPUT/results.json``: ``{run_name: {"AP": .., "AP50": .., "AP75": ..}}``. A run whose
``eval_results.json`` already exists is not repeated, and an interrupted run resumes from its last
checkpoint, so an interrupted demo can simply be started again.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join("configs", "kd_shapes")

# (run name, config, extra options); the teacher comes first: the others distil from it.
RUNS = [
    ("teacher", "faster_rcnn_teacher.yaml", []),
    ("baseline_student", "faster_rcnn_student.yaml", []),
    ("chen2017", "faster_rcnn_kd_chen2017.yaml", []),
]
# Which lines of train_net.py's output to show: iteration progress and the final AP table.
PROGRESS_MARKS = ("eta:", "Evaluation results for bbox", "error:")


def _shorten(line: str) -> str:
    # "[time d2.utils.events]:  eta: ... iter: N  total_loss: ..." -> from "eta:" on, 150 chars
    line = line.rstrip()
    return line[line.find("eta:"):][:150] if "eta:" in line else line[-150:]


def prepare_data(datasets: str, args: argparse.Namespace) -> None:
    if os.path.isfile(os.path.join(datasets, "kd_shapes", "annotations", "instances_val.json")):
        print(f"[demo] kd_shapes found under {datasets}")
        return
    print(f"[demo] generating kd_shapes under {datasets} ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            "datasets/prepare_synthetic.py",
            "--root",
            datasets,
            "--name",
            "kd_shapes",
            "--seed",
            "0",
            "--num-train",
            str(args.num_train),
            "--num-val",
            str(args.num_val),
        ],
        cwd=ROOT,
        check=True,
    )


def run(name: str, config: str, opts: List[str], args: argparse.Namespace) -> Dict[str, float]:
    out_dir = os.path.join(args.output, name)
    results_file = os.path.join(out_dir, "eval_results.json")
    if os.path.isfile(results_file):
        print(f"[demo] {name}: already done ({results_file})")
    else:
        iters = args.teacher_iters if name == "teacher" else args.student_iters
        cmd = [
            sys.executable,
            "train_net.py",
            "--config-file",
            os.path.join(CONFIGS, config),
            "--resume",
            "OUTPUT_DIR",
            out_dir,
            "SOLVER.MAX_ITER",
            str(iters),
            "SOLVER.STEPS",
            f"({int(iters * 0.75)},{int(iters * 0.92)})",
            "SOLVER.CHECKPOINT_PERIOD",
            str(max(iters // 4, 1)),
            "SOLVER.WARMUP_ITERS",
            str(min(100, iters // 5)),
            "KD.TEACHER.WEIGHTS",
            os.path.join(args.output, "teacher", "model_final.pth"),
            *opts,
        ]
        print(
            f"[demo] {name}: training {iters} iterations -> {out_dir} (full log: "
            f"{out_dir}/log.txt)",
            flush=True,
        )
        start = time.time()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        tail: List[str] = []
        table_lines = 0
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            if any(mark in line for mark in PROGRESS_MARKS):
                table_lines = 4 if "Evaluation results" in line else 0
                print(f"  {_shorten(line)}", flush=True)
            elif table_lines:
                table_lines -= 1
                print(f"  {line.rstrip()}", flush=True)
        if proc.wait() != 0:
            sys.stdout.write("".join(tail))
            raise SystemExit(
                f"[demo] {name} failed (exit {proc.returncode}); see {out_dir}/log.txt"
            )
        print(f"[demo] {name}: done in {time.time() - start:.0f} s", flush=True)
    with open(results_file) as f:
        bbox = json.load(f)["bbox"]
    return {k: round(float(bbox[k]), 2) for k in ("AP", "AP50", "AP75")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join("output", "demo"))
    parser.add_argument("--teacher-iters", type=int, default=800)
    parser.add_argument("--student-iters", type=int, default=500)
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--num-val", type=int, default=300)
    args = parser.parse_args()
    os.chdir(ROOT)
    datasets = os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
    prepare_data(datasets, args)

    results = {name: run(name, cfg, opts, args) for name, cfg, opts in RUNS}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    base = results["baseline_student"]["AP"]
    print(f"\n{'run':<20}{'AP':>8}{'AP50':>8}{'AP75':>8}{'vs baseline':>13}")
    for name, r in results.items():
        gain = "" if name in ("teacher", "baseline_student") else f"{r['AP'] - base:+.2f}"
        print(f"{name:<20}{r['AP']:>8.2f}{r['AP50']:>8.2f}{r['AP75']:>8.2f}{gain:>13}")
    print(f"\nwritten: {os.path.join(args.output, 'results.json')}")


if __name__ == "__main__":
    main()
