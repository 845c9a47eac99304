"""The record of finished runs (``docs/benchmark/runs.json``): what identifies a run, reading
and writing the record, which planned runs are finished (output folder or record) and which must
still train."""

import json
import os
import subprocess
import time
from typing import Dict, List, Optional

from kd.benchmark.plan import teacher_reference, teacher_weights
from kd.benchmark.suites import suite_of
from kd.experiments import ROOT, read_results, schedule_opts
from kd.families.hf_source import HF_PREFIX

METRICS = ("AP", "AP50", "AP75")

RECORD = os.path.join("docs", "benchmark", "runs.json")


def run_key(run: dict, output: str) -> str:
    """A run's name in the record: its output folder relative to the benchmark's (under
    ``<suite>/`` for suites other than kd_shapes, so that their runs never collide)."""
    return suite_of(run).record_key(os.path.relpath(run["out"], output))


def run_identity(run: dict, output: str) -> dict:
    """What makes two runs the same run: config file name, schedule and overrides (paths under
    the benchmark's output folder written relative to it). The config's contents and the code
    are not part of it: after changing either, delete the runs concerned from the record."""
    opts = [_relative(o, output) for o in run["opts"]]
    identity = {
        "config": run["config"],
        "iters": run["iters"],
        "schedule": schedule_opts(run["iters"], suite_of(run).evals),
        "opts": opts,
    }
    if suite_of(run).name != "kd_shapes":
        identity["suite"] = suite_of(run).name
    return identity


def _relative(option: str, output: str) -> str:
    """An override naming a path under the benchmark's output folder (a teacher's weights, an
    ``hf://`` teacher folder), written relative to it; any other as it is."""
    prefix = HF_PREFIX if option.startswith(HF_PREFIX) else ""
    path = option[len(prefix) :]
    if path.startswith(output + os.sep):
        return prefix + os.path.relpath(path, output)
    return option


def load_record(path: str) -> Dict[str, dict]:
    """The recorded runs, by :func:`run_key` (empty without a file)."""
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)["runs"]


def save_record(path: str, record: Dict[str, dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"runs": dict(sorted(record.items()))}, f, indent=1)
        f.write("\n")


def recorded(run: dict, output: str, record: Dict[str, dict]) -> Optional[Dict[str, float]]:
    """The recorded metrics of ``run``, if the record has that very run."""
    entry = record.get(run_key(run, output))
    if entry is None or entry["identity"] != run_identity(run, output):
        return None
    return {
        k: v
        for k, v in entry.items()
        if k in (*METRICS, "teacher_AP", "teacher_own_AP", "curve") or k.startswith("AP-")
    }


def record_run(run: dict, output: str, record: Dict[str, dict], metrics: Dict[str, float]) -> None:
    """Add a finished run to ``record`` (in place), with the checkout's commit at that moment (a
    run is recorded when it finishes, or when the tool next finds its output folder)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    record[run_key(run, output)] = {
        "identity": run_identity(run, output),
        **metrics,
        "commit": commit or None,
        "recorded": time.strftime("%Y-%m-%d"),
    }


def sync_record(runs: List[dict], output: str, path: str) -> None:
    """Record every run finished in its output folder that the record lacks (or has otherwise)."""
    record = load_record(path)
    added = 0
    for r in runs:
        if os.path.isfile(os.path.join(r["out"], "eval_results.json")):
            metrics = read_results(r["out"])
            known = recorded(r, output, record)
            if known == metrics:
                continue
            if known is not None and all(known[m] == metrics[m] for m in METRICS):
                # The same run, recorded before per-class APs were: add them, keeping the
                # commit and date it was recorded with.
                record[run_key(r, output)].update(metrics)
            else:
                record_run(r, output, record, metrics)
            added += 1
    if added:
        save_record(path, record)
        print(f"[benchmark] recorded {added} finished run(s) in {path}")


def finished_runs(
    runs: List[dict], output: str, record: Dict[str, dict]
) -> Dict[str, Dict[str, float]]:
    """Output folder -> metrics of every finished run: its own eval_results.json, else the
    record's entry for that very run."""
    finished = {}
    for r in runs:
        if os.path.isfile(os.path.join(r["out"], "eval_results.json")):
            finished[r["out"]] = read_results(r["out"])
        else:
            metrics = recorded(r, output, record)
            if metrics is not None:
                finished[r["out"]] = metrics
    return finished


def untrained_state(run: dict, output: str, record: Dict[str, dict]) -> str:
    """Why a planned run is not trained: "finished" (output folder or record), or, for a teacher
    no run to train needs, "not needed"."""
    return "finished" if finished_runs([run], output, record) else "not needed"


def runs_to_train(runs: List[dict], output: str, record: Dict[str, dict]) -> List[dict]:
    """The runs that must train: unfinished students, and the teachers whose weights those need
    and lack (a recorded teacher whose weights are gone is retrained only then; a teacher no
    unfinished student needs is not trained, e.g. for baselines alone)."""
    finished = finished_runs(runs, output, record)
    students = [r for r in runs if r["kind"] != "teacher" and r["out"] not in finished]
    needed = {o for r in students for o in r["opts"]}
    teachers = [
        r
        for r in runs
        if r["kind"] == "teacher"
        and teacher_reference(r) in needed
        and (r["out"] not in finished or not os.path.isfile(teacher_weights(r)))
    ]
    return [r for r in runs if r in teachers or r in students]
