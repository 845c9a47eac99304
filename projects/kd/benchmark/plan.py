"""The benchmark's plan: the runs a suite's families, methods and seeds make, in training order
(teachers first), and the output folders that hold another run than the planned one."""

import os
import re
from typing import List, Sequence

from kd.benchmark.suites import Family, suite_of, teacher_dir
from kd.families.hf_source import HF_PREFIX

# A Hugging Face teacher's run: its "config" is the tool that trains it.
HF_TEACHER_TOOL = "tools/train_hf_teacher.py"


def plan(args) -> List[dict]:
    """The runs to do, in order: teachers first, then per seed the baselines and methods."""
    suite = suite_of(args)
    names = args.families or list(suite.families)
    unknown = [f for f in names if f not in suite.families]
    if unknown:
        raise SystemExit(
            f"error: --families {unknown}: suite {suite.name} has {list(suite.families)}"
        )
    families = [suite.families[f] for f in names]
    methods = [
        m
        for m in suite.methods
        if m.family in names
        and (not args.methods or any(re.search(k, m.title, re.IGNORECASE) for k in args.methods))
    ]
    missing = [m for m in methods if not os.path.isfile(os.path.join(suite.configs, m.config))]
    for m in missing:
        print(f"[benchmark] skipped '{m.title}' ({m.family}): {m.config} is not in {suite.configs}")
    methods = [m for m in methods if m not in missing]
    teachers = {f.teacher_key for f in families} | {
        m.teacher_family for m in methods if m.teacher_family
    }

    def iters(family: Family, teacher: bool) -> int:
        given = args.teacher_iters if teacher else args.student_iters
        return given or (family.teacher_iters if teacher else family.student_iters)

    runs = []
    teacher_outs = set()

    def add_teacher(key: str, fam: Family, config: str, hf_args: Sequence[str] = ()) -> str:
        out = teacher_dir(args.output, key)
        if out not in teacher_outs:
            teacher_outs.add(out)
            title = "teacher" if config == fam.teacher else f"teacher ({config})"
            if config == HF_TEACHER_TOOL:
                title = f"teacher ({key}, Hugging Face)"
            run = dict(
                suite=suite.name,
                kind="teacher",
                family=fam.name,
                title=title,
                config=config,
                out=out,
                iters=iters(fam, True),
                opts=list(hf_args),
            )
            if config == HF_TEACHER_TOOL:
                run["trainer"] = "hf"  # tools/train_hf_teacher.py, not train_net.py
            runs.append(run)
        return out

    for name in sorted(teachers):
        add_teacher(name, suite.families[name], suite.families[name].teacher)
    method_teacher = {}  # method -> its teacher's output folder
    for m in methods:
        fam = suite.families[m.teacher_family or m.family]
        if m.hf_teacher:
            method_teacher[m] = add_teacher(m.hf_teacher, fam, HF_TEACHER_TOOL, m.hf_teacher_args)
        elif m.teacher:
            method_teacher[m] = add_teacher(os.path.splitext(m.teacher)[0], fam, m.teacher)
        else:
            method_teacher[m] = teacher_dir(args.output, fam.teacher_key)
    for seed in args.seeds:
        for fam in families:
            runs.append(
                dict(
                    suite=suite.name,
                    kind="baseline",
                    family=fam.name,
                    title="baseline",
                    seed=seed,
                    config=fam.student,
                    out=os.path.join(args.output, fam.name, f"seed{seed}", "baseline"),
                    iters=iters(fam, False),
                    opts=["SEED", str(seed)],
                )
            )
            for m in (m for m in methods if m.family == fam.name):
                t = os.path.join(method_teacher[m], "model_final.pth")
                # A longer baseline has no teacher (nor needs one trained).
                teacher_opts = [] if m.config == fam.student else ["KD.TEACHER.WEIGHTS", t]
                if m.hf_teacher:
                    hf = HF_PREFIX + method_teacher[m]
                    teacher_opts = ["KD.TEACHER.CONFIG_FILE", hf, "KD.TEACHER.WEIGHTS", ""]
                elif m.teacher:
                    teacher_opts += [
                        "KD.TEACHER.CONFIG_FILE",
                        os.path.join(suite.configs, m.teacher),
                    ]
                runs.append(
                    dict(
                        suite=suite.name,
                        kind="method",
                        family=fam.name,
                        teacher_family=m.teacher_family or fam.name,
                        teacher_out=method_teacher[m],
                        title=m.title,
                        seed=seed,
                        config=m.config,
                        out=os.path.join(args.output, fam.name, f"seed{seed}", m.slug),
                        iters=int(round(iters(fam, False) * m.schedule)),
                        opts=["SEED", str(seed), *teacher_opts, *m.opts],
                    )
                )
    return runs


def teacher_reference(run: dict) -> str:
    """How the students of a teacher run name it in their overrides: its ``model_final.pth``, or
    ``hf://<folder>`` for a Hugging Face teacher."""
    if run.get("trainer") == "hf":
        return HF_PREFIX + run["out"]
    return os.path.join(run["out"], "model_final.pth")


def teacher_weights(run: dict) -> str:
    """The file a teacher run leaves its weights in."""
    name = "model.safetensors" if run.get("trainer") == "hf" else "model_final.pth"
    return os.path.join(run["out"], name)


def folder_conflicts(runs: List[dict]) -> List[str]:
    """The planned runs whose output folder holds another run: its ``config.yaml`` (which
    train_net.py writes when a run starts) has other iterations or another seed than the plan's,
    e.g. after ``--student-iters`` with the default ``--output``. Resuming from such a folder, or
    reporting it, would pass one run off as another.

    Returns:
        one line per conflict, naming the folder and both settings.
    """
    import yaml

    conflicts = []
    for r in runs:
        path = os.path.join(r["out"], "config.yaml")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        held = {"iterations": cfg.get("SOLVER", {}).get("MAX_ITER"), "seed": cfg.get("SEED")}
        wanted = {"iterations": r["iters"]}
        if "SEED" in r["opts"]:
            wanted["seed"] = int(r["opts"][r["opts"].index("SEED") + 1])
        differ = [k for k, v in wanted.items() if held[k] != v]
        if differ:
            conflicts.append(
                f"{r['out']} holds another run ("
                + ", ".join(f"{k} {held[k]}, this plan {wanted[k]}" for k in differ)
                + ")"
            )
    return conflicts
