"""tools/benchmark_table.py (aggregation, skip/resume plan, report) and tools/benchmark_kd.py."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY_DETR_OPTS, TINY_RCNN_OPTS, build_cfg, load_script


def plan_args(bt, output, **overrides):
    """tools/benchmark_table.py's parsed options for :func:`plan`: one seed of FCOS, every
    method, the default schedules, unless overridden."""
    defaults = dict(
        output=str(output),
        seeds=[1],
        families=["fcos"],
        methods=None,
        teacher_iters=None,
        student_iters=None,
    )
    return bt.argparse.Namespace(**{**defaults, **overrides})


def test_summarize_means_stds_and_paired_gain():
    bt = load_script("tools/benchmark_table.py")
    base = {1: {"AP": 10.0, "AP50": 20.0, "AP75": 5.0}, 2: {"AP": 12.0, "AP50": 22.0, "AP75": 7.0}}
    kd = {
        1: {"AP": 13.0, "AP50": 25.0, "AP75": 9.0},
        2: {"AP": 14.0, "AP50": 26.0, "AP75": 9.0},
        3: {"AP": 15.0, "AP50": 27.0, "AP75": 9.0},
    }
    s = bt.summarize(base, kd)
    assert s["AP"]["mean"] == 14.0 and math.isclose(s["AP"]["std"], 1.0)  # 13, 14, 15
    assert s["AP75"]["std"] == 0.0 and s["AP"]["n"] == 3
    # Gain over the seeds both have: 13 - 10 = 3, 14 - 12 = 2 -> 2.5 +- 0.7071.
    assert s["gain_AP"]["mean"] == 2.5 and math.isclose(s["gain_AP"]["std"], 2**0.5 / 2)
    assert s["gain_AP"]["n"] == 2
    assert bt.summarize(base, {}) == {}


def test_plan_and_report_from_finished_runs(tmp_path):
    bt = load_script("tools/benchmark_table.py")
    args = plan_args(bt, str(tmp_path), seeds=[1, 2], student_iters=7)
    runs = bt.plan(args)
    assert [r["kind"] for r in runs] == ["teacher", "baseline", "method"] * 1 + [
        "baseline",
        "method",
    ]
    assert all(r["iters"] == 7 for r in runs if r["kind"] != "teacher")
    assert runs[0]["iters"] == bt.FAMILIES["fcos"].teacher_iters
    gid = [r for r in runs if r["kind"] == "method"]
    assert all(str(tmp_path / "teachers" / "fcos" / "model_final.pth") in r["opts"] for r in gid)

    def finish(out, ap):
        (tmp_path / out).mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "eval_results.json").write_text(
            json.dumps({"bbox": {"AP": ap, "AP50": ap + 10, "AP75": ap - 5}})
        )

    finish("teachers/fcos", 20.0)
    finish("fcos/seed1/baseline", 8.0)
    finish("fcos/seed1/gid", 9.5)  # seed 2 unfinished: reported over what has finished
    # What the distiller measured of its teacher, on the student's input (kd.teacher_eval).
    (tmp_path / "fcos/seed1/gid/teacher_eval.json").write_text(
        json.dumps([{"key": {}, "results": {"bbox": {"AP": 17.254}}}])
    )
    rows = bt.report(runs, str(tmp_path))
    gid_row = [r for r in rows if r["student"] == "GID"][0]
    assert gid_row["summary"]["gain_AP"]["mean"] == 1.5 and gid_row["teacher_AP"] == "20.00"
    table = (tmp_path / "benchmark.md").read_text()
    assert "| FCOS | GID | 20.00 | 17.25 | 9.50 | 19.50 | 4.50 | +1.50 | 1 |" in table
    assert "| FCOS | baseline | 20.00 |  | 8.00 | 18.00 | 3.00 |  | 1 |" in table
    assert (tmp_path / "benchmark.png").stat().st_size > 0


def test_record_stands_in_for_lost_output_folders(tmp_path):
    """Finished runs are recorded; a fresh output folder reports them from the record, trains
    only what is missing, and a teacher only when a run that trains needs its weights."""
    bt = load_script("tools/benchmark_table.py")
    output = tmp_path / "out"
    args = plan_args(bt, str(output), student_iters=7)
    runs = bt.plan(args)
    teacher, baseline, gid = runs
    for r, ap in [(teacher, 20.0), (baseline, 8.0), (gid, 9.5)]:
        os.makedirs(r["out"])
        with open(os.path.join(r["out"], "eval_results.json"), "w") as f:
            json.dump({"bbox": {"AP": ap, "AP50": ap + 10, "AP75": ap - 5}}, f)
    path = str(tmp_path / "runs.json")
    bt.sync_record(runs, str(output), path)
    record = bt.load_record(path)
    assert set(record) == {"teachers/fcos", "fcos/seed1/baseline", "fcos/seed1/gid"}
    # The teacher's weights are named relative to the output folder, so a clone elsewhere matches.
    assert "teachers/fcos/model_final.pth" in record["fcos/seed1/gid"]["identity"]["opts"]
    assert record["fcos/seed1/gid"]["AP"] == 9.5

    shutil.rmtree(output)  # a fresh clone: no output folders, only the record
    assert bt.runs_to_train(runs, str(output), record) == []
    rows = bt.report(runs, str(output), record)
    gid_row = [r for r in rows if r["student"] == "GID"][0]
    assert gid_row["summary"]["gain_AP"]["mean"] == 1.5 and gid_row["teacher_AP"] == "20.00"

    # A run with other overrides (here a longer schedule) is not the recorded run.
    longer = bt.plan(bt.argparse.Namespace(**{**vars(args), "student_iters": 9}))
    assert bt.recorded(longer[2], str(output), record) is None
    # Missing the GID run: it trains, and so does its teacher, whose weights are gone.
    del record["fcos/seed1/gid"]
    assert bt.runs_to_train(runs, str(output), record) == [teacher, gid]
    os.makedirs(teacher["out"])
    open(os.path.join(teacher["out"], "model_final.pth"), "w").close()
    assert bt.runs_to_train(runs, str(output), record) == [gid]
    # Baselines alone need no teacher: an unrecorded teacher is not trained for them.
    del record["teachers/fcos"], record["fcos/seed1/baseline"]
    shutil.rmtree(teacher["out"])
    alone = bt.plan(bt.argparse.Namespace(**{**vars(args), "methods": ["^nothing$"]}))
    assert [r["kind"] for r in alone] == ["teacher", "baseline"]
    assert bt.runs_to_train(alone, str(output), record) == [alone[1]]
    assert bt.untrained_state(alone[0], str(output), record) == "not needed"
    os.makedirs(alone[1]["out"])
    with open(os.path.join(alone[1]["out"], "eval_results.json"), "w") as f:
        json.dump({"bbox": {"AP": 8.0, "AP50": 18.0, "AP75": 3.0}}, f)
    assert bt.untrained_state(alone[1], str(output), record) == "finished"


def test_plan_method_filter_words_and_exact_titles(tmp_path):
    bt = load_script("tools/benchmark_table.py")

    def titles(*methods):
        args = plan_args(bt, str(tmp_path), families=["detr"], methods=list(methods))
        return [r["title"] for r in bt.plan(args) if r["kind"] == "method"]

    # A word matches every title containing it, case-insensitively: KD-DETR and its ablations.
    assert titles("kd-detr") == [
        "KD-DETR",
        "KD-DETR, Hugging Face RT-DETR teacher",
        "KD-DETR, Hugging Face RT-DETR teacher, class term only",
        "KD-DETR general points only",
        "KD-DETR specific points only",
        "KD-DETR without foreground weight",
    ]
    assert titles("^KD-DETR$", "heterogeneous") == [
        "KD-DETR",
        "Faster R-CNN teacher (heterogeneous)",
    ]


def test_plan_longer_baseline_row(tmp_path):
    """BCCD's "baseline, 3x schedule" row: the family's student config alone, three times the
    student schedule, no teacher weights."""
    bt = load_script("tools/benchmark_table.py")
    args = plan_args(
        bt, str(tmp_path), suite="bccd", seeds=[2], families=["faster_rcnn"], methods=["3x"]
    )
    runs = bt.plan(args)
    baseline, longer = (r for r in runs if r["kind"] != "teacher")
    assert baseline["title"] == "baseline" and longer["title"] == "baseline, 3x schedule"
    assert longer["config"] == baseline["config"] == "faster_rcnn_student.yaml"
    assert (baseline["iters"], longer["iters"]) == (200, 600)  # BCCD students: 200 iterations
    assert longer["opts"] == ["SEED", "2"]
    assert longer["out"] == str(tmp_path / "faster_rcnn" / "seed2" / "baseline_3x_schedule")


def test_bccd_long_suite_plan(tmp_path):
    """bccd_long: bccd's configs on the long schedules (students 1200 / 900 iterations, teachers
    3000), a 2x-schedule baseline instead of the 3x one (and Faster R-CNN's half schedule),
    without bccd's settled variants, and recorded under its own name."""
    bt = load_script("tools/benchmark_table.py")
    args = plan_args(bt, str(tmp_path), suite="bccd_long", families=["faster_rcnn", "fcos"])
    runs = bt.plan(args)
    by_title = {(r["family"], r["title"]): r for r in runs}
    assert by_title[("faster_rcnn", "teacher")]["iters"] == 3000
    assert by_title[("fcos", "teacher")]["iters"] == 3000
    assert by_title[("faster_rcnn", "baseline")]["iters"] == 1200
    assert by_title[("faster_rcnn", "baseline, half schedule")]["iters"] == 600
    assert by_title[("fcos", "baseline")]["iters"] == 900
    assert by_title[("fcos", "GID")]["iters"] == 900
    assert by_title[("faster_rcnn", "baseline, 2x schedule")]["iters"] == 2400
    assert by_title[("fcos", "baseline, 2x schedule")]["opts"] == ["SEED", "1"]
    titles = {t for _, t in by_title}
    assert not any("3x" in t or "equal map size" in t or "own assignment" in t for t in titles)
    assert "Chen et al. 2017 without hints" in titles
    assert "GID, teacher trained at the student's input, feature weight 2.5e-4" in titles
    assert "GID, teacher trained at the student's input" not in titles
    gid = by_title[("fcos", "GID")]
    assert bt.run_key(gid, str(tmp_path)) == "bccd_long/fcos/seed1/gid"


def test_schedule_checkpoints_and_the_record_still_matches():
    """A checkpoint every quarter of the run, at most every 500 iterations; every recorded run's
    schedule is still what the rule gives for its iterations and its suite's evaluations (else
    it would be retrained)."""
    from kd.experiments import schedule_opts

    bt = load_script("tools/benchmark_table.py")

    def period(iters):
        opts = schedule_opts(iters)
        return int(opts[opts.index("SOLVER.CHECKPOINT_PERIOD") + 1])

    assert (period(200), period(1000), period(2000), period(3000), period(4800)) == (
        50,
        250,
        500,
        500,
        500,
    )
    with open(os.path.join(REPO, "docs", "benchmark", "runs.json")) as f:
        record = json.load(f)["runs"]
    stale = [
        k
        for k, v in record.items()
        if v["identity"]["schedule"]
        != schedule_opts(
            v["identity"]["iters"], bt.SUITES[v["identity"].get("suite", "kd_shapes")].evals
        )
    ]
    assert record and not stale


def test_periodic_evaluations_make_the_curve(tmp_path):
    """bccd_long evaluates ten times a run: TEST.EVAL_PERIOD in the schedule and its identity;
    the curve is read from metrics.json (EvalHook's 0-based iteration + 1, a repeated iteration
    after a resume keeps its last value, a line cut short by a kill is ignored)."""
    from kd.experiments import ap_curve, schedule_opts

    opts = schedule_opts(600, 10)
    assert opts[opts.index("TEST.EVAL_PERIOD") + 1] == "60"
    assert "TEST.EVAL_PERIOD" not in schedule_opts(600)
    lines = [
        {"iteration": 19, "total_loss": 1.0},
        {"iteration": 59, "bbox/AP": 2.7094, "bbox/AP50": 9.0},
        {"iteration": 119, "bbox/AP": 10.0},
        {"iteration": 119, "bbox/AP": 11.5},
        {"iteration": 179, "bbox/AP": float("nan")},
    ]
    with open(tmp_path / "metrics.json", "w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines) + '{"iteration": 23')
    assert ap_curve(str(tmp_path)) == [[60, 2.71], [120, 11.5]]
    # The evaluation after the last step is logged at MAX_ITER (600), the last periodic at 539.
    lines += [{"iteration": 539, "bbox/AP": 46.95}, {"iteration": 600, "bbox/AP": 47.04}]
    with open(tmp_path / "metrics.json", "w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 600\n")
    assert ap_curve(str(tmp_path))[-2:] == [[540, 46.95], [600, 47.04]]
    bt = load_script("tools/benchmark_table.py")
    args = plan_args(bt, tmp_path / "long", suite="bccd_long")
    run = next(r for r in bt.plan(args) if r["kind"] == "baseline")
    assert bt.run_identity(run, args.output)["schedule"] == schedule_opts(900, 10)
    args = plan_args(bt, tmp_path / "short", suite="bccd")
    run = next(r for r in bt.plan(args) if r["kind"] == "baseline")
    assert "TEST.EVAL_PERIOD" not in bt.run_identity(run, args.output)["schedule"]


def test_output_folder_of_another_run_is_refused(tmp_path, capsys):
    """A folder whose config.yaml (written by train_net.py) has other iterations or another seed
    is not resumed nor reported as this plan's run: one line naming it; other schedules are not
    written into the repository's record."""
    bt = load_script("tools/benchmark_table.py")
    args = plan_args(bt, str(tmp_path), student_iters=7)
    teacher, baseline, gid = bt.plan(args)
    assert bt.folder_conflicts([teacher, baseline, gid]) == []  # no folders yet
    os.makedirs(baseline["out"])
    with open(os.path.join(baseline["out"], "config.yaml"), "w") as f:
        f.write("SEED: 1\nSOLVER:\n  MAX_ITER: 7\n")
    assert bt.folder_conflicts([baseline]) == []  # the same run: resumed
    os.makedirs(gid["out"])
    with open(os.path.join(gid["out"], "config.yaml"), "w") as f:
        f.write("SEED: 2\nSOLVER:\n  MAX_ITER: 500\n")
    assert bt.folder_conflicts([teacher, baseline, gid]) == [
        f"{gid['out']} holds another run (iterations 500, this plan 7, seed 2, this plan 1)"
    ]
    argv = ["--suite", "kd_shapes", "--families", "fcos", "--seeds", "1", "--dry-run"]
    with pytest.raises(SystemExit) as e:
        bt.main([*argv, "--output", str(tmp_path), "--student-iters", "7"])
    assert str(e.value).startswith(f"error: {gid['out']} holds another run")
    assert str(e.value).endswith("pass another --output, or delete those folders")
    assert "not recorded in docs/benchmark/runs.json" in capsys.readouterr().out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    bt = load_script("tools/benchmark_table.py")
    out = tmp_path / "run"
    lock = out / bt.LOCK_FILE
    with bt.run_lock(str(out)):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()  # released
    # Held by another live process (this one's parent): refused, the lock left as it was.
    parent = os.getppid()
    for held in (str(parent), f"{parent} {bt._start_time(parent)}"):
        lock.write_text(held)
        with pytest.raises(bt.RunLocked) as e:
            with bt.run_lock(str(out)):
                pass
        assert e.value.holder == f"pid {parent}" and lock.read_text() == held
    # Left by a process that has exited: taken over, and released after.
    lock.write_text(str(_dead_pid()))
    with bt.run_lock(str(out)):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


@pytest.mark.skipif(not os.path.isfile("/proc/self/stat"), reason="needs Linux's /proc")
def test_run_lock_sees_a_reused_pid_as_stale(tmp_path):
    """The lock names its process by pid and start time: a live process with the lock's pid
    but another start time (the pid reused, or a reboot) does not hold it."""
    bt = load_script("tools/benchmark_table.py")
    parent = os.getppid()
    start = bt._start_time(parent)
    # Checked against ps: started (uptime - elapsed seconds) after boot, in clock ticks.
    if shutil.which("ps"):
        elapsed = subprocess.run(
            ["ps", "-o", "etimes=", "-p", str(parent)], capture_output=True, text=True
        ).stdout
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        assert abs(int(start) / ticks - (uptime - int(elapsed))) < 2.0
    out = tmp_path / "run"
    out.mkdir()
    (out / bt.LOCK_FILE).write_text(f"{parent} {int(start) + 1}")
    with bt.run_lock(str(out)):
        held = (out / bt.LOCK_FILE).read_text()
        assert held.startswith(f"{os.getpid()} {bt._start_time(os.getpid())} ")


def test_runs_of_a_locked_teacher_are_skipped(tmp_path, monkeypatch, capsys):
    """A second benchmark process: the teacher another live process trains is skipped, and so
    is the distilled student that needs its weights; the baseline trains."""
    import kd.benchmark.train as bench_train

    bt = load_script("tools/benchmark_table.py")
    args = plan_args(bt, str(tmp_path))
    runs = bt.plan(args)
    assert [r["kind"] for r in runs] == ["teacher", "baseline", "method"]
    teacher_out = tmp_path / "teachers" / "fcos"
    teacher_out.mkdir(parents=True)
    (teacher_out / bt.LOCK_FILE).write_text(str(os.getppid()))
    trained = []

    def fake_train(name, config, out, iters, opts, evals=0):
        held = (tmp_path / out / bt.LOCK_FILE).read_text()
        assert held.split()[0] == str(os.getpid())  # held meanwhile
        trained.append(out)
        return {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}

    monkeypatch.setattr(bench_train, "train_and_evaluate", fake_train)
    record = tmp_path / "runs.json"
    bt.train_runs(runs, runs, "configs/kd_shapes", str(tmp_path), str(record))
    assert trained == [str(tmp_path / "fcos" / "seed1" / "baseline")]
    assert list(bt.load_record(str(record))) == ["fcos/seed1/baseline"]
    lines = capsys.readouterr().out.splitlines()
    assert f"being trained by pid {os.getppid()}" in lines[0]
    assert "skipped, its teacher" in lines[-1] and "teachers/fcos/model_final.pth" in lines[-1]


def test_benchmark_kd_reports_overhead(datasets_root, tmp_path):
    bk = load_script("tools/benchmark_kd.py")
    out = datasets_root / "bench.json"
    # The teacher config under another name, so that no benchmark-trained teacher stands in.
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(build_cfg("configs/kd_shapes/faster_rcnn_teacher.yaml", []).dump())
    bk.main(
        [
            "--configs", "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml",
            "--iters", "1",
            "--repeats", "1",
            # Any interval meets this target, but only from 6 rounds on (the fewest with a 95 %
            # interval): rounds are added beyond --repeats up to 6, not to --max-repeats.
            "--ci", "1e9",
            "--max-repeats", "8",
            "--json", str(out),
            *TINY_RCNN_OPTS,
            "KD.TEACHER.CONFIG_FILE", str(teacher),
        ]
    )  # fmt: skip
    row = json.loads(out.read_text())["rows"][0]
    assert row["random_teacher"] and row["teacher"] == "random"  # no teacher file in tests
    assert row["rounds_run"] == 6
    for kind, rounds in (("overhead", row["rounds"]), ("overhead_cpu", row["cpu_rounds"])):
        assert all(len(v) == 6 for v in rounds.values())
        kd, student, teacher = (rounds[p] for p in ("kd", "student", "teacher"))
        ratios = sorted(k / (s + t) for k, s, t in zip(kd, student, teacher))
        assert math.isclose(row[kind], (ratios[2] + ratios[3]) / 2)  # the median of six rounds
        # Six rounds: the 95 % interval is their range (coverage 1 - 2 / 64 = 0.969).
        assert row[f"{kind}_ci"] == pytest.approx([ratios[0], ratios[-1]])
    wall = sorted(
        k / (s + t) for k, s, t in zip(*(row["rounds"][p] for p in ("kd", "student", "teacher")))
    )
    assert row["overhead_range"] == pytest.approx([wall[0], wall[-1]])
    t = row["seconds"]
    assert math.isclose(row["floor"], t["student"] + t["teacher"])
    assert set(row["peak_memory_mb"]) == {"student", "teacher", "kd"}


def test_benchmark_kd_times_the_point_decoding(datasets_root, tmp_path):
    """A distiller with ``prepare_point_decoding`` (KD-DETR) gets a ``points`` phase, counted in
    the floor."""
    bk = load_script("tools/benchmark_kd.py")
    # A tiny random teacher (the tool saves one when the weights file does not exist).
    teacher = tmp_path / "teacher.yaml"
    tiny = [*TINY_DETR_OPTS, "MODEL.DETR.NUM_QUERIES", "10"]
    teacher.write_text(build_cfg("configs/kd_shapes/detr_teacher.yaml", tiny).dump())
    out = tmp_path / "bench.json"
    bk.main(
        [
            "--configs", "configs/kd_shapes/detr_kd_detr.yaml",
            "--iters", "1",
            "--repeats", "1",
            "--json", str(out),
            *tiny,
            "MODEL.DETR.DEC_LAYERS", "2",
            "KD.TEACHER.CONFIG_FILE", str(teacher),
            "KD.TEACHER.WEIGHTS", str(tmp_path / "missing.pth"),
            "KD.KD_DETR.NUM_GENERAL_POINTS", "5",
        ]
    )  # fmt: skip
    row = json.loads(out.read_text())["rows"][0]
    t = row["seconds"]
    assert row["method"] == "KDDETRDistiller" and t["points"] > 0
    # The floor of a training iteration: the decoding with the backward of the student's part.
    assert math.isclose(row["floor"], t["student"] + t["teacher"] + t["points+bwd"])
    assert math.isclose(row["overhead"], t["kd"] / row["floor"])
    # The lower floor: the decoding forward only.
    assert math.isclose(row["floor_forward"], t["student"] + t["teacher"] + t["points"])
    assert math.isclose(row["overhead_forward"], t["kd"] / row["floor_forward"])
    assert set(row["peak_memory_mb"]) == {"student", "teacher", "kd", "points", "points+bwd"}
    assert set(row["page_faults"]) == set(row["peak_memory_mb"])
    assert all(v >= 0 for v in row["page_faults"].values())


def test_benchmark_kd_suites_and_the_benchmark_trained_teacher(tmp_path, monkeypatch):
    """``--suite`` lists every method's config, found from the configs and the registry (a
    Hugging Face teacher's configs left out: a checkout has no such folder); a missing teacher
    file is replaced by the one tools/benchmark_table.py trains from the same teacher config,
    when it exists."""
    from kd.benchmark import timing

    methods = [
        "detr_kd_detr.yaml",
        "faster_rcnn_kd_chen2017.yaml",
        "faster_rcnn_kd_gid.yaml",
        "fcos_kd_gid.yaml",
        "hetero_detr_to_faster_rcnn.yaml",
        "hetero_faster_rcnn_to_detr.yaml",
        "retinanet_kd_gid.yaml",
    ]
    expected = {
        "kd_shapes": sorted([*methods, "faster_rcnn_kd_chen2017_lowres.yaml"]),
        "bccd": sorted([*methods, "faster_rcnn_kd_chen2017_quarter.yaml"]),
    }
    for suite in ("kd_shapes", "bccd"):
        assert timing.method_configs(suite) == [f"configs/{suite}/{n}" for n in expected[suite]]
    # Where `benchmark_table.py --suite bccd` (and the kd_shapes suite) write their teachers.
    assert timing.trained_teacher("configs/bccd/detr_teacher.yaml") == (
        "output/bccd_benchmark/teachers/detr/model_final.pth"
    )
    assert timing.trained_teacher(str(REPO / "configs/bccd/faster_rcnn_teacher.yaml")) == (
        "output/bccd_benchmark/teachers/faster_rcnn/model_final.pth"
    )
    assert timing.trained_teacher("configs/kd_shapes/fcos_teacher.yaml") == (
        "output/benchmark/teachers/fcos/model_final.pth"
    )
    assert timing.trained_teacher("configs/bccd/detr_student.yaml") is None
    assert timing.trained_teacher(str(tmp_path / "detr_teacher.yaml")) is None

    cfg = timing.timing_config(
        str(REPO / "configs/bccd/detr_kd_detr.yaml"),
        ["KD.TEACHER.WEIGHTS", str(tmp_path / "missing.pth")],
        "cpu",
    )
    assert cfg.SOLVER.BASE_LR == 0.0
    trained = tmp_path / "model_final.pth"
    monkeypatch.setattr(timing, "trained_teacher", lambda config: str(trained))
    # The configured file is missing and the trained one exists: it is used.
    trained.write_bytes(b"")
    assert timing.ensure_teacher_weights(cfg, str(tmp_path)) == "benchmark"
    assert cfg.KD.TEACHER.WEIGHTS == str(trained)
    # The configured file exists: it is kept.
    monkeypatch.setattr(timing, "trained_teacher", lambda config: "elsewhere.pth")
    assert timing.ensure_teacher_weights(cfg, str(tmp_path)) == "configured"
    assert cfg.KD.TEACHER.WEIGHTS == str(trained)


def test_benchmark_kd_overhead_is_the_median_of_per_round_ratios():
    bk = load_script("tools/benchmark_kd.py")
    times = {
        "student": [1.0, 2.0, 1.0],
        "teacher": [1.0, 1.0, 0.5],
        "points": [0.5, 0.5, 0.5],
        "points+bwd": [1.0, 1.0, 1.0],
        "kd": [3.3, 4.0, 3.0],
    }
    # Rounds: 3.3 / 3 = 1.1, 4 / 4 = 1.0, 3 / 2.5 = 1.2: median 1.1, range 1.0-1.2. The floor is
    # the sum of the phases' medians, 1 + 1 + 1.
    row = bk.ratio_to_floor(times, "points+bwd")
    assert math.isclose(row["overhead"], 1.1) and math.isclose(row["floor"], 3.0)
    assert [round(x, 6) for x in row["overhead_range"]] == [1.0, 1.2]
    assert row["overhead_ci"] == pytest.approx([1.0, 1.2])  # three rounds: the range
    # Forward-only points: 3.3 / 2.5, 4 / 3.5, 3 / 2 (median 1.32).
    row = bk.ratio_to_floor(times, "points")
    assert math.isclose(row["overhead"], 3.3 / 2.5)
    # Without points: 3.3 / 2, 4 / 3, 3 / 1.5.
    assert math.isclose(bk.ratio_to_floor(times, None)["overhead"], 3.3 / 2.0)


def test_benchmark_kd_median_confidence_interval():
    """The order statistics of the textbook distribution-free interval of the median, checked
    by hand: for n = 10, (x_2, x_9) covers with P(2 <= B <= 8) = 1 - 2 * (1 + 10) / 1024 = 0.979,
    while (x_3, x_8) covers only 1 - 2 * (1 + 10 + 45) / 1024 = 0.891."""
    bk = load_script("tools/benchmark_kd.py")
    values = [0.5 + 0.1 * i for i in range(10)]
    random.Random(0).shuffle(values)
    assert bk.median_ci(values) == (0.6, 1.3)  # x_2, x_9
    # n = 20: (x_6, x_15), coverage 0.959 (x_7, x_14: 0.885); n = 6: (x_1, x_6), 0.969.
    assert bk.median_ci(list(range(1, 21))) == (6, 15)
    assert bk.median_ci([3, 1, 2, 6, 5, 4]) == (1, 6)
    # Too few rounds for 95 %: the range.
    assert bk.median_ci([2.0, 1.0, 3.0]) == (1.0, 3.0)
    # settled: the interval within +-target of the median.
    tight = [1.0 + 0.001 * i for i in range(10)]  # interval 1.001-1.008 around 1.0045
    assert bk.settled(tight, 0.01) and not bk.settled(tight, 0.003)
    assert not bk.settled([1.0, 1.2, 0.9, 1.1, 1.0, 1.0], 0.05)  # range 0.9-1.2 around 1.0
    assert not bk.settled([1.0] * 5, 0.05)  # five rounds: no 95 % interval yet


def test_report_heterogeneous_row_shows_its_own_teacher(tmp_path):
    bt = load_script("tools/benchmark_table.py")
    args = plan_args(bt, str(tmp_path), families=["faster_rcnn"], methods=["heterogeneous"])
    runs = bt.plan(args)
    assert {r["family"] for r in runs if r["kind"] == "teacher"} == {"faster_rcnn", "detr"}
    for out, ap in [("teachers/faster_rcnn", 18.0), ("teachers/detr", 30.0)]:
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "eval_results.json").write_text(
            json.dumps({"bbox": {"AP": ap, "AP50": ap, "AP75": ap}})
        )
    rows = {r["student"]: r["teacher_AP"] for r in bt.report(runs, str(tmp_path))}
    assert rows == {"baseline": "18.00", "DETR teacher (heterogeneous)": "30.00"}


def test_training_runs_keep_freed_memory_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    """The benchmark's train_net.py processes get glibc's keep-freed-memory settings (the
    figures in docs/cost.md); a value already in the environment is passed on unchanged."""
    import kd.experiments as ex

    seen = {}

    class FakeRun:
        def __init__(self, cmd, env, **kwargs):
            seen.update(env)
            out = cmd[cmd.index("OUTPUT_DIR") + 1]
            with open(os.path.join(out, "eval_results.json"), "w") as f:
                json.dump({"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}}, f)
            self.stdout, self.returncode = [], 0

        def wait(self):
            return 0

    monkeypatch.setattr(ex.subprocess, "Popen", FakeRun)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    metrics = ex.train_and_evaluate("run", "configs/x.yaml", str(tmp_path), 4)
    assert metrics == {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}
    assert seen["MALLOC_MMAP_THRESHOLD_"] == str(2**32 - 1)  # 4 GiB - 1: nothing mapped apart
    assert seen["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert seen["PATH"] == os.environ["PATH"]


def test_plan_method_with_a_teacher_config_of_its_own(tmp_path):
    """A method naming its own teacher config: that teacher is trained once (the family's
    teacher schedule) into teachers/<config name>, and the method gets its weights and config."""
    bt = load_script("tools/benchmark_table.py")
    args = plan_args(bt, str(tmp_path), suite="bccd", seeds=[1, 2], methods=["student's input$"])
    runs = bt.plan(args)
    teachers = [r for r in runs if r["kind"] == "teacher"]
    assert [(r["config"], r["iters"]) for r in teachers] == [
        ("fcos_teacher.yaml", 500),
        ("fcos_teacher_student_input.yaml", 500),
    ]
    own = str(tmp_path / "teachers" / "fcos_teacher_student_input")
    assert teachers[1]["out"] == own
    gid = [r for r in runs if r["kind"] == "method"]
    assert len(gid) == 2 and all(r["teacher_out"] == own for r in gid)
    assert gid[0]["opts"] == [
        "SEED",
        "1",
        "KD.TEACHER.WEIGHTS",
        os.path.join(own, "model_final.pth"),
        "KD.TEACHER.CONFIG_FILE",
        os.path.join("configs", "bccd", "fcos_teacher_student_input.yaml"),
    ]
    assert bt.trained_teacher("configs/bccd/fcos_teacher_student_input.yaml") == os.path.join(
        "output", "bccd_benchmark", "teachers", "fcos_teacher_student_input", "model_final.pth"
    )

    def finish(out, ap):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval_results.json"), "w") as f:
            json.dump({"bbox": {"AP": ap, "AP50": ap, "AP75": ap, "AP-WBC": ap + 1}}, f)

    finish(teachers[0]["out"], 50.0)
    finish(own, 45.0)
    finish(str(tmp_path / "fcos" / "seed1" / "baseline"), 40.0)
    finish(gid[0]["out"], 42.5)
    rows = bt.report(runs, str(tmp_path))
    assert [(r["student"], r["teacher_AP"]) for r in rows] == [
        ("baseline", "50.00"),
        ("GID, teacher trained at the student's input", "45.00"),
    ]
    assert rows[1]["summary"]["gain_AP-WBC"]["mean"] == 2.5
    assert "| FCOS | baseline | 41.00 | 1 |" in (tmp_path / "benchmark.md").read_text()


def test_record_gains_per_class_aps_without_losing_its_provenance(tmp_path):
    """A run recorded before per-class APs were read keeps its commit and date when the tool
    adds its classes' APs from the output folder; a run with other figures is recorded anew."""
    bt = load_script("tools/benchmark_table.py")
    output = tmp_path / "out"
    teacher, baseline, gid = bt.plan(plan_args(bt, str(output), student_iters=7))
    path = str(tmp_path / "runs.json")
    old = {"AP": 8.0, "AP50": 18.0, "AP75": 3.0}
    record = {}
    bt.record_run(baseline, str(output), record, old)
    key = bt.run_key(baseline, str(output))
    record[key].update(commit="abc1234", recorded="2026-01-01")
    bt.save_record(path, record)
    os.makedirs(baseline["out"])
    with open(os.path.join(baseline["out"], "eval_results.json"), "w") as f:
        bbox = {**old, "APs": 1.0, "AP-circle": 9.123, "AP-square": float("nan")}
        json.dump({"bbox": bbox}, f)
    bt.sync_record([teacher, baseline, gid], str(output), path)
    entry = bt.load_record(path)[key]
    assert entry["AP-circle"] == 9.12 and "AP-square" not in entry and "APs" not in entry
    assert (entry["commit"], entry["recorded"]) == ("abc1234", "2026-01-01")
    with open(os.path.join(baseline["out"], "eval_results.json"), "w") as f:
        json.dump({"bbox": {**old, "AP": 9.0}}, f)  # another run's figures: recorded anew
    bt.sync_record([teacher, baseline, gid], str(output), path)
    entry = bt.load_record(path)[key]
    assert entry["AP"] == 9.0 and entry["recorded"] != "2026-01-01"


def test_iterations_to_the_baseline_and_teacher_plateau():
    """From periodic evaluations: the first evaluated iteration at which a distilled student
    reaches its seed's baseline AP (mean over the seeds that reach it, the others counted), a
    column only where curves exist; a teacher's curve has plateaued when its last two
    evaluations are within 0.5 AP."""
    bt = load_script("tools/benchmark_table.py")
    baseline = {1: {"AP": 40.0, "AP50": 1, "AP75": 1}, 2: {"AP": 42.0, "AP50": 1, "AP75": 1}}
    curve1 = [[100, 30.0], [200, 40.0], [300, 45.0]]  # reaches 40.0 at 200
    curve2 = [[100, 35.0], [200, 41.9], [300, 43.0]]  # reaches 42.0 at 300
    method = {
        1: {"AP": 45.0, "AP50": 1, "AP75": 1, "curve": curve1},
        2: {"AP": 43.0, "AP50": 1, "AP75": 1, "curve": curve2},
    }
    s = bt.summarize(baseline, method)["iters_to_baseline"]
    assert (s["mean"], s["n"], s["of"]) == (250.0, 2, 2)
    assert s["std"] == pytest.approx(70.7107, abs=1e-4)  # stdev of 200, 300
    method[2]["curve"] = [[100, 35.0], [300, 41.0]]
    s = bt.summarize(baseline, method)["iters_to_baseline"]
    assert (s["mean"], s["n"], s["of"]) == (200.0, 1, 2)
    rows = [
        dict(family="F", student="baseline", teacher_AP="50", summary=bt.summarize({}, baseline)),
        dict(family="F", student="GID", teacher_AP="50", summary=bt.summarize(baseline, method)),
    ]
    table = bt.markdown_table(rows).splitlines()
    assert table[0].endswith("iterations to the baseline's AP |")
    assert table[3].endswith("| 200 (1/2 seeds) |")
    assert "iterations to" not in bt.markdown_table(rows[:1])
    # The baseline against itself (curves recorded for it too) gets no figure.
    rows[0]["summary"] = bt.summarize(method, method)
    assert bt.markdown_table(rows).splitlines()[2].endswith("| 2 |  |")
    runs = [dict(kind="teacher", family="fcos", config="fcos_teacher.yaml", out="t")]
    flat = bt.teacher_curve_table(runs, {"t": {"AP": 50.3, "curve": [[500, 49.0], [1000, 50.3]]}})
    assert "| 50.30 | no |" in flat
    done = bt.teacher_curve_table(runs, {"t": {"AP": 50.3, "curve": [[500, 49.9], [1000, 50.3]]}})
    assert "| 50.30 | yes | 500: 49.9, 1000: 50.3 |" in done


def test_plan_method_with_a_hugging_face_teacher(tmp_path, monkeypatch):
    """A method with a Hugging Face teacher: the teacher is trained once by
    tools/train_hf_teacher.py (on the family's teacher schedule) into teachers/<name>, the method
    gets it as hf://<folder> with empty KD.TEACHER.WEIGHTS, the record names it relative to the
    output, and its students wait while it is trained elsewhere."""
    import kd.benchmark.train as bench_train

    bt = load_script("tools/benchmark_table.py")
    args = plan_args(
        bt, str(tmp_path), families=["detr"], methods=["Hugging Face RT-DETR teacher$"]
    )
    runs = bt.plan(args)
    hf = [r for r in runs if r.get("trainer") == "hf"]
    folder = str(tmp_path / "teachers" / "hf_rtdetr")
    assert [(r["out"], r["iters"], r["opts"]) for r in hf] == [
        (folder, 1000, ["--dataset", "kd_shapes", "--size", "small", "--seed", "1", "--lr", "5e-4"])
    ]
    method = [r for r in runs if r["kind"] == "method"]
    assert len(method) == 1 and method[0]["config"] == "detr_kd_detr_hf.yaml"
    assert method[0]["opts"][2:] == [
        "KD.TEACHER.CONFIG_FILE", f"hf://{folder}", "KD.TEACHER.WEIGHTS", "",
    ]  # fmt: skip
    assert bt.run_identity(method[0], str(tmp_path))["opts"][3] == "hf://teachers/hf_rtdetr"

    # Its folder locked by another live process: the teacher and the method are skipped.
    os.makedirs(folder)
    (tmp_path / "teachers" / "hf_rtdetr" / bt.LOCK_FILE).write_text(str(os.getppid()))
    trained = []
    monkeypatch.setattr(
        bench_train,
        "train_and_evaluate",
        lambda name, config, out, *a, **k: trained.append(out) or {"AP": 1.0},
    )
    monkeypatch.setattr(
        bench_train,
        "train_hf_teacher_and_evaluate",
        lambda name, out, iters, opts: trained.append(("hf", out, iters, opts)) or {"AP": 2.0},
    )
    bt.train_runs(runs, runs, "configs/kd_shapes", str(tmp_path), "")
    # The family's own teacher and the baseline train; the method waits for its teacher.
    assert trained == [
        str(tmp_path / "teachers" / "detr"),
        str(tmp_path / "detr" / "seed1" / "baseline"),
    ]
    # Unlocked, the teacher is trained by the tool, then the method.
    os.remove(tmp_path / "teachers" / "hf_rtdetr" / bt.LOCK_FILE)
    trained.clear()
    bt.train_runs(runs, runs, "configs/kd_shapes", str(tmp_path), "")
    assert ("hf", folder, 1000, hf[0]["opts"]) in trained
    assert trained[-1] == method[0]["out"]


def test_a_family_learning_from_another_familys_teacher(tmp_path):
    """bccd_long's quarter-resolution Faster R-CNN students learn from the faster_rcnn family's
    teacher, trained once in teachers/faster_rcnn, and pair with their own baseline."""
    bt = load_script("tools/benchmark_table.py")
    args = plan_args(bt, str(tmp_path), suite="bccd_long", families=["faster_rcnn_quarter"])
    runs = bt.plan(args)
    teachers = [r for r in runs if r["kind"] == "teacher"]
    assert [(r["out"], r["config"]) for r in teachers] == [
        (str(tmp_path / "teachers" / "faster_rcnn"), "faster_rcnn_teacher.yaml")
    ]
    baseline = [r for r in runs if r["kind"] == "baseline"]
    assert [(r["config"], r["iters"]) for r in baseline] == [
        ("faster_rcnn_student_quarter.yaml", 1200)
    ]
    chen = {r["title"]: r for r in runs if r["kind"] == "method"}
    quarter = chen["Chen et al. 2017 (quarter-resolution student)"]
    assert quarter["config"] == "faster_rcnn_kd_chen2017_quarter.yaml"
    assert quarter["opts"] == [
        "SEED", "1", "KD.TEACHER.WEIGHTS",
        str(tmp_path / "teachers" / "faster_rcnn" / "model_final.pth"),
    ]  # fmt: skip
    assert chen["baseline, 2x schedule"]["iters"] == 2400
    cfg = build_cfg("configs/bccd/faster_rcnn_kd_chen2017_quarter.yaml", [])
    student = build_cfg("configs/bccd/faster_rcnn_student_quarter.yaml", [])
    # The distilled student sees what its baseline sees: 640x480 scaled by a quarter.
    assert cfg.INPUT.MIN_SIZE_TEST * cfg.KD.STUDENT.INPUT_SCALE == student.INPUT.MIN_SIZE_TEST
    assert cfg.INPUT.MAX_SIZE_TEST * cfg.KD.STUDENT.INPUT_SCALE == student.INPUT.MAX_SIZE_TEST
