"""The benchmark's report: mean ± std over seeds and the paired gain over the baseline, the
markdown tables (methods, per class, teachers' AP curves), the chart, ``results.json``."""

import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

from kd.benchmark.record import METRICS, finished_runs
from kd.benchmark.suites import SUITES, TITLES, suite_of, teacher_dir


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def class_metrics(metrics: Dict[str, float]) -> List[str]:
    """The per-class AP keys of a run's metrics (``AP-<class>``), in COCOEvaluator's order."""
    return [k for k in metrics if k.startswith("AP-")]


def summarize(baseline: Dict[int, Dict[str, float]], method: Dict[int, Dict[str, float]]):
    """Mean ± std of each metric over seeds, and of the per-seed gain over the baseline.

    Args:
        baseline, method: ``{seed: {"AP": .., "AP50": .., "AP75": .., "AP-<class>": ..}}`` of
            finished runs (per-class APs where recorded).

    Returns:
        ``{metric: mean_std, "gain_AP": mean_std over the seeds both have}``, and for each
        class that every run has, ``"AP-<class>"`` and ``"gain_AP-<class>"`` alike, and
        ``"teacher_AP"`` (the teacher at the student's input) when every run has it; empty
        without runs.
    """
    if not method:
        return {}
    classes = [
        c
        for c in class_metrics(next(iter(method.values())))
        if all(c in r for r in method.values())
    ]
    out = {m: mean_std([r[m] for r in method.values()]) for m in (*METRICS, *classes)}
    if all("teacher_AP" in r for r in method.values()):
        out["teacher_AP"] = mean_std([r["teacher_AP"] for r in method.values()])
    paired = sorted(set(baseline) & set(method))
    if paired:
        out["gain_AP"] = mean_std([method[s]["AP"] - baseline[s]["AP"] for s in paired])
        for c in classes:
            if all(c in baseline[s] for s in paired):
                out[f"gain_{c}"] = mean_std([method[s][c] - baseline[s][c] for s in paired])
        curved = [s for s in paired if "curve" in method[s]]
        if curved:
            reached = [
                i
                for i in (iterations_to(method[s]["curve"], baseline[s]["AP"]) for s in curved)
                if i is not None
            ]
            out["iters_to_baseline"] = {
                **(mean_std(reached) if reached else {"mean": math.nan, "std": 0.0}),
                "n": len(reached),
                "of": len(curved),
            }
    return out


def iterations_to(curve: Sequence[Sequence[float]], ap: float) -> Optional[int]:
    """The first evaluated iteration of ``curve`` (``[[iteration, AP], ...]``) at which the AP
    reaches ``ap``; None when it never does."""
    return next((int(i) for i, a in curve if a >= ap), None)


def _fmt_iters(stat: Optional[Dict[str, float]]) -> str:
    if not stat:
        return ""
    if not stat["n"]:
        return f"not reached (0/{stat['of']})"
    value = f"{stat['mean']:.0f}" + (f" ± {stat['std']:.0f}" if stat["n"] > 1 else "")
    return value + (f" ({stat['n']}/{stat['of']} seeds)" if stat["n"] < stat["of"] else "")


def _fmt(stat: Optional[Dict[str, float]], signed: bool = False) -> str:
    if not stat:
        return "-"
    value = f"{stat['mean']:+.2f}" if signed else f"{stat['mean']:.2f}"
    return value + (f" ± {stat['std']:.2f}" if stat["n"] > 1 else "")


def markdown_table(rows: List[dict]) -> str:
    """The README table: one line per family baseline and per method. "teacher AP" is the
    teacher's own evaluation, "at the student's input" what the distiller measured before the
    first step, on the input it feeds the teacher (lower when that differs from the one the
    teacher was tested at)."""
    lines = [
        "| family | student | teacher AP | at the student's input | AP | AP50 | AP75 | gain (AP) "
        "| seeds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    # Runs evaluated periodically (bccd_long) add the iterations each method's student needed to
    # reach its baseline's final AP (per seed, paired; mean over the seeds that reached it).
    curves = any("iters_to_baseline" in r["summary"] for r in rows)
    if curves:
        lines[0] += " iterations to the baseline's AP |"
        lines[1] += " ---: |"
    for r in rows:
        s = r["summary"]
        seeds = s["AP"]["n"] if s else 0
        seen = f"{s['teacher_AP']['mean']:.2f}" if "teacher_AP" in s else ""
        # The baseline against itself reaches its own AP at its last evaluation: no figure.
        iters = s.get("iters_to_baseline") if r["student"] != "baseline" else None
        lines.append(
            f"| {r['family']} | {r['student']} | {r['teacher_AP']} | {seen} | "
            f"{_fmt(s.get('AP'))} | {_fmt(s.get('AP50'))} | {_fmt(s.get('AP75'))} | "
            f"{_fmt(s.get('gain_AP'), signed=True) if r['student'] != 'baseline' else ''} | "
            f"{seeds} |" + (f" {_fmt_iters(iters)} |" if curves else "")
        )
    return "\n".join(lines)


def teacher_curve_table(runs: List[dict], finished: Dict[str, Dict[str, float]]) -> str:
    """The teachers' AP curves (runs evaluated periodically): each evaluation, and whether the
    AP has plateaued (the last two evaluations within 0.5 AP); empty without curves."""
    lines = []
    for r in runs:
        curve = finished.get(r["out"], {}).get("curve") if r["kind"] == "teacher" else None
        if not curve:
            continue
        plateau = len(curve) > 1 and abs(curve[-1][1] - curve[-2][1]) <= 0.5
        points = ", ".join(f"{int(i)}: {a:.1f}" for i, a in curve)
        lines.append(
            f"| {TITLES[r['family']]} | {r['config']} | {curve[-1][1]:.2f} | "
            f"{'yes' if plateau else 'no'} | {points} |"
        )
    if not lines:
        return ""
    return "\n".join(
        [
            "| family | teacher | AP | plateau (last two within 0.5) | AP by iteration |",
            "| --- | --- | ---: | --- | --- |",
            *lines,
        ]
    )


def markdown_class_table(rows: List[dict]) -> str:
    """Per-class AP: each baseline's mean ± std, and each method's gain over it (paired by seed);
    empty when no run recorded per-class APs."""
    classes = list(dict.fromkeys(k for r in rows for k in r["summary"] if k.startswith("AP-")))
    if not classes:
        return ""
    names = [c[len("AP-") :] for c in classes]
    lines = [
        "| family | student | " + " | ".join(f"{n} AP (gain)" for n in names) + " | seeds |",
        "| --- | --- |" + " ---: |" * len(classes) + " ---: |",
    ]
    for r in rows:
        s = r["summary"]
        if not any(c in s for c in classes):
            continue
        if r["student"] == "baseline":
            cells = [_fmt(s.get(c)) for c in classes]
        else:
            cells = [_fmt(s.get(f"gain_{c}"), signed=True) for c in classes]
        lines.append(
            f"| {r['family']} | {r['student']} | " + " | ".join(cells) + f" | {s['AP']['n']} |"
        )
    return "\n".join(lines)


def chart(rows: List[dict], path: str, evaluated_on: str = "kd_shapes val") -> None:
    """Bar chart of the gain in AP of every method over its baseline, with ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["student"] != "baseline" and "gain_AP" in r["summary"]]
    if not rows:
        return
    labels = [f"{r['family']}: {r['student']}" for r in rows]
    gains = [r["summary"]["gain_AP"]["mean"] for r in rows]
    errs = [r["summary"]["gain_AP"]["std"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    colors = ["tab:green" if g > 0 else "tab:red" for g in gains]
    ax.barh(range(len(rows)), gains, xerr=errs, color=colors, capsize=3)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"AP gain over the baseline student ({evaluated_on})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: List[dict], output: str, record: Optional[Dict[str, dict]] = None) -> List[dict]:
    """Collect the finished runs (output folders, then the record) into table rows; write
    benchmark.md/.png and results.json."""
    finished = finished_runs(runs, output, record or {})
    suite = suite_of(runs[0]) if runs else SUITES["kd_shapes"]
    rows = []

    def teacher_ap(t_dir: str) -> str:
        return f"{finished[t_dir]['AP']:.2f}" if t_dir in finished else "-"

    for fam in dict.fromkeys(r["family"] for r in runs if r["kind"] != "teacher"):
        per_title: Dict[str, Dict[int, Dict[str, float]]] = {}
        for r in runs:
            if r["family"] == fam and r["kind"] != "teacher" and r["out"] in finished:
                per_title.setdefault(r["title"], {})[r["seed"]] = finished[r["out"]]
        baseline = per_title.get("baseline", {})
        # title -> the teacher it learns from (another family's for heterogeneous KD, or one of
        # its own); the family's for baselines
        titles = {
            r["title"]: r.get("teacher_out", teacher_dir(output, suite.families[fam].teacher_key))
            for r in runs
            if r["family"] == fam and r["kind"] != "teacher"
        }
        for title, teacher in titles.items():
            rows.append(
                dict(
                    family=suite.families[fam].title,
                    student=title,
                    teacher_AP=teacher_ap(teacher),
                    summary=summarize(baseline, per_title.get(title, {})),
                    runs=per_title.get(title, {}),
                )
            )
    os.makedirs(output, exist_ok=True)
    table = markdown_table(rows)
    class_table = markdown_class_table(rows)
    if class_table:
        table += "\n\nPer class: the baseline's AP, each method's gain over it\n\n" + class_table
    teachers = teacher_curve_table(runs, finished)
    if teachers:
        table += "\n\nTeachers, evaluated during training\n\n" + teachers
    with open(os.path.join(output, "benchmark.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    chart(rows, os.path.join(output, "benchmark.png"), suite.evaluated_on)
    print("\n" + table)
    print(f"\nwritten: {output}/benchmark.md, benchmark.png, results.json")
    return rows
