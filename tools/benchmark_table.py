#!/usr/bin/env python
"""Does distillation make the student better? Every method against its baseline, over seeds.

    python tools/benchmark_table.py [--suite kd_shapes|bccd] [--seeds 1 2 3]
        [--families faster_rcnn detr ...] [--methods GID ...] [--output DIR]
        [--teacher-iters N] [--student-iters N] [--dry-run] [--report-only]

Three suites: ``kd_shapes`` (the default; synthetic images, models trained from scratch, configs
in ``configs/kd_shapes``, output ``output/benchmark``), ``bccd`` (real microscope images,
ImageNet-initialised MobileNetV2 models, configs in ``configs/bccd``, output
``output/bccd_benchmark``; BCCD registered from ``$KD_BCCD_ROOT`` or ``../shared/data/bccd``) and
``bccd_long`` (the same configs, students near convergence and teachers trained 3000 iterations,
the DETR's 4800; output ``output/bccd_long``).
For every detector family (Faster R-CNN, RetinaNet, FCOS, DETR) it trains the teacher
once, then the baseline student and each distilled student on the same schedule for every seed,
all through ``train_net.py`` and COCOEvaluator. It writes ``OUTPUT/benchmark.md`` (mean ± std of
AP, AP50, AP75 over the seeds and the gain over the baseline: the mean ± std of the per-seed
differences, since a seed fixes initialisation and data order for both), ``OUTPUT/benchmark.png``
and ``OUTPUT/results.json``. Finished runs are skipped and interrupted ones resume, so the
benchmark can be stopped and started again; ``--report-only`` rebuilds the table from what has
finished. Methods whose config is not in the repository are skipped with a notice.

Every run that finishes is also written to ``--record`` (``docs/benchmark/runs.json``, kept in the
repository): its metrics, config, schedule and overrides, and the commit it ran at. A run found
there with the same config, schedule and overrides counts as finished even when its output
folder is gone (a fresh clone, another machine), so seeds and methods can be added to the table
over several sessions; a teacher is retrained only when a run that still has to train needs its
weights. Runs are identified by config name, schedule and overrides (and the suite, for suites
other than kd_shapes, whose runs are recorded under ``<suite>/...``), not by the config's contents
or the code: after changing those, delete the runs concerned from the record. ``--record ''``
uses the output folder alone. Runs on other schedules (``--teacher-iters``, ``--student-iters``)
are not written into the default record, and an output folder holding a run of other iterations
or another seed (its ``config.yaml``) stops the tool with a line naming it, rather than being
resumed or reported as the planned run.

Several benchmark processes may run at once (e.g. one per family, one thread each): a run being
trained holds ``OUTPUT/<run>/.benchmark.lock`` (the process id and start time), and another
process skips that run, and the students that need its weights, with a line saying so (run the
command again once it finished); a lock left by a process that no longer exists is taken over
(the run resumes from its last checkpoint).

This script is the command line; the benchmark itself is :mod:`kd.benchmark`, by job:
``suites`` (families, methods and schedules, as data), ``plan``, ``record`` (runs.json),
``locks``, ``train`` and ``report``.
"""

import argparse
import os
from typing import List, Optional

from kd.benchmark.locks import LOCK_FILE, RunLocked, _start_time, run_lock
from kd.benchmark.plan import folder_conflicts, plan
from kd.benchmark.record import (
    METRICS,
    RECORD,
    finished_runs,
    load_record,
    record_run,
    recorded,
    run_identity,
    run_key,
    runs_to_train,
    save_record,
    sync_record,
    untrained_state,
)
from kd.benchmark.report import (
    markdown_class_table,
    markdown_table,
    mean_std,
    report,
    summarize,
    teacher_curve_table,
)
from kd.benchmark.suites import (
    BCCD_FAMILIES,
    BCCD_LONG_FAMILIES,
    BCCD_LONG_METHODS,
    BCCD_METHODS,
    FAMILIES,
    METHODS,
    SUITES,
    Family,
    Method,
    Suite,
    suite_of,
    teacher_dir,
    trained_teacher,
)
from kd.benchmark.train import train_runs
from kd.experiments import ROOT

# The names tests and tools/benchmark_kd.py (trained_teacher) take from this script.
__all__ = [
    "LOCK_FILE",
    "RunLocked",
    "_start_time",
    "run_lock",
    "folder_conflicts",
    "plan",
    "METRICS",
    "RECORD",
    "finished_runs",
    "load_record",
    "record_run",
    "recorded",
    "run_identity",
    "run_key",
    "runs_to_train",
    "save_record",
    "sync_record",
    "markdown_class_table",
    "markdown_table",
    "mean_std",
    "report",
    "summarize",
    "teacher_curve_table",
    "BCCD_FAMILIES",
    "BCCD_LONG_FAMILIES",
    "BCCD_LONG_METHODS",
    "BCCD_METHODS",
    "FAMILIES",
    "METHODS",
    "SUITES",
    "Family",
    "Method",
    "Suite",
    "suite_of",
    "teacher_dir",
    "trained_teacher",
    "train_runs",
    "main",
]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite",
        default="kd_shapes",
        choices=list(SUITES),
        help="kd_shapes (synthetic, configs/kd_shapes), bccd (real images, configs/bccd) or "
        "bccd_long (bccd's configs, long schedules)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="default: output/benchmark (kd_shapes), output/bccd_benchmark, output/bccd_long",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="default: every family of the suite (faster_rcnn retinanet fcos detr)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only methods whose title matches one of these regular expressions (case-insensitive"
        " search: a plain word matches titles containing it, '^KD-DETR$' only that row)",
    )
    parser.add_argument(
        "--teacher-iters",
        type=int,
        default=None,
        help="every teacher's iterations (default: per family)",
    )
    parser.add_argument(
        "--student-iters",
        type=int,
        default=None,
        help="every student's iterations (default: per family)",
    )
    parser.add_argument(
        "--record",
        default=RECORD,
        help="JSON file of finished runs, read and extended (default: %(default)s); '' = none",
    )
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild the table from finished runs"
    )
    args = parser.parse_args(argv)
    suite = suite_of(args)
    args.output = args.output or suite.output
    os.chdir(ROOT)
    if (args.teacher_iters or args.student_iters) and args.record == RECORD:
        # The record holds each suite's own schedules; other ones would replace its entries.
        print(
            f"[benchmark] --teacher-iters/--student-iters: not recorded in {RECORD} (it holds "
            "the suites' own schedules); --record FILE keeps these runs in another file"
        )
        args.record = ""
    runs = plan(args)
    conflicts = folder_conflicts(runs)
    if conflicts:
        raise SystemExit(
            f"error: {conflicts[0]}"
            + (f" (and {len(conflicts) - 1} more folders)" if len(conflicts) > 1 else "")
            + ": pass another --output, or delete those folders"
        )
    record = load_record(args.record)
    todo = runs_to_train(runs, args.output, record)
    if args.dry_run:
        for r in runs:
            state = "train" if r in todo else untrained_state(r, args.output, record)
            print(f"[{state}] {r['out']}: {r['config']} {r['iters']} it {' '.join(r['opts'])}")
        return
    if not args.report_only:
        suite.prepare(args)
        train_runs(runs, todo, suite.configs, args.output, args.record)
    if args.record:
        sync_record(runs, args.output, args.record)
        record = load_record(args.record)
    report(runs, args.output, record)


if __name__ == "__main__":
    main()
