"""Training the planned runs through train_net.py, one at a time, each under its lock and
recorded as it finishes."""

import os
from typing import List

from kd.benchmark.locks import RunLocked, run_lock
from kd.benchmark.plan import teacher_reference
from kd.benchmark.record import load_record, record_run, save_record, untrained_state
from kd.benchmark.suites import suite_of
from kd.experiments import train_and_evaluate, train_hf_teacher_and_evaluate


def train_runs(
    runs: List[dict], todo: List[dict], configs: str, output: str, record_path: str
) -> None:
    """Train the runs in ``todo`` in plan order, recording each as it finishes; a run another
    process is training is skipped, and so are the runs that need its weights.

    Args:
        runs: the plan (:func:`plan`); todo: those of them to train (:func:`runs_to_train`).
        configs: the suite's config folder; output: the benchmark's output folder.
        record_path: the record to extend ('' for none).
    """
    unavailable = set()  # weights files that a skipped run would have written
    for r in runs:
        name = f"{r['family']} {r['title']}" + (f" seed {r['seed']}" if "seed" in r else "")
        if r not in todo:
            state = untrained_state(r, output, load_record(record_path))
            where = f" (output folder or {record_path or 'record'})" if state == "finished" else ""
            print(f"[kd] {name}: {state}{where}")
            continue
        missing = [o for o in r["opts"] if o in unavailable]
        if missing:
            print(f"[kd] {name}: skipped, its teacher {missing[0]} is still being trained")
            continue
        try:
            with run_lock(r["out"]):
                if r.get("trainer") == "hf":
                    metrics = train_hf_teacher_and_evaluate(name, r["out"], r["iters"], r["opts"])
                else:
                    metrics = train_and_evaluate(
                        name,
                        os.path.join(configs, r["config"]),
                        r["out"],
                        r["iters"],
                        r["opts"],
                        suite_of(r).evals,
                    )
        except RunLocked as e:
            print(
                f"[kd] {name}: skipped, being trained by {e.holder} ({r['out']}); "
                "run again when it has finished"
            )
            unavailable.add(teacher_reference(r))
            continue
        if record_path:
            # Re-read first: another benchmark process may have recorded runs meanwhile.
            record = load_record(record_path)
            record_run(r, output, record, metrics)
            save_record(record_path, record)
