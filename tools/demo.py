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

from kd.experiments import ROOT, prepare_kd_shapes, train_and_evaluate

CONFIGS = os.path.join("configs", "kd_shapes")

# (run name, config, extra options); the teacher comes first: the others distil from it.
RUNS = [
    ("teacher", "faster_rcnn_teacher.yaml", []),
    ("baseline_student", "faster_rcnn_student.yaml", []),
    ("chen2017", "faster_rcnn_kd_chen2017.yaml", []),
]


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
    prepare_kd_shapes(datasets, args.num_train, args.num_val)

    teacher_weights = os.path.join(args.output, "teacher", "model_final.pth")
    results = {}
    for name, config, opts in RUNS:
        iters = args.teacher_iters if name == "teacher" else args.student_iters
        results[name] = train_and_evaluate(
            name,
            os.path.join(CONFIGS, config),
            os.path.join(args.output, name),
            iters,
            ["KD.TEACHER.WEIGHTS", teacher_weights, *opts],
        )
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
