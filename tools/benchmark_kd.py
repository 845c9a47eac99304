#!/usr/bin/env python
"""What distillation costs per training iteration, measured in one process on the same batches.

    python tools/benchmark_kd.py [--suite kd_shapes|bccd] [--configs A.yaml B.yaml ...]
        [--iters 8] [--repeats 3] [--ci 0.02 [--max-repeats 40]] [--device cpu|cuda] [--amp]
        [--json OUT.json] [KEY VALUE ...]

``--suite`` picks the default configs: every method of ``configs/kd_shapes`` (the default) or of
``configs/bccd`` (larger images: 640x480 teachers); ``--configs`` names them instead.

For each distiller config it times, on identical batches:

* ``student``: a training iteration of the student alone (forward, backward, optimizer step);
* ``teacher``: the teacher's forward pass alone, in eval mode under ``torch.no_grad``;
* ``points``: for methods whose distillation points need extra decoding (KD-DETR's query groups,
  DETR / R-CNN probes), that decoding done by both models without any loss, under
  ``torch.no_grad``, when the distiller offers it as ``prepare_point_decoding(batched_inputs)``:
  that method does, untimed, what the decoding needs and the other phases already pay for (both
  models' backbones and encoders, the points) and returns a closure doing only the extra decoding,
  which is what is timed, so no backbone or encoder is counted twice;
* ``points+bwd``: the same decoding as a training step does it: with gradients, and the backward
  of the student's extra decoding (of the plain sum of its answers: no distillation loss) down to
  its encoder memory, where in the KD step it joins the backward the student pays anyway;
* ``kd``: a training iteration of the distiller (student + teacher + distillation losses).

and prints ``overhead = t_kd / t_floor``, where the floor is what a distilled training iteration
cannot avoid: ``t_student + t_teacher``, plus ``t_points+bwd`` for methods with points. The
student's share of that decoding is counted as a training step runs it, with its backward, for the
same reason ``t_student`` is a whole training iteration: any loss at those points needs it, and it
is decoding, not distillation machinery. ``overhead_forward`` takes ``t_points`` (the decoding
forward only) instead, a lower floor that leaves the backward through the extra queries in the
overhead. The phases are interleaved over ``--repeats`` rounds; each reported time is the median
per-iteration time of its phase, and each ratio the median of the per-round ratios (each round's
phases ran close together, so a slow spell of the machine hits them alike), with the lowest and
highest round and a distribution-free 95 % confidence interval of that median beside it.
``--ci 0.02`` adds rounds beyond ``--repeats`` until that interval lies within +-2 % of the
median (or ``--max-repeats`` rounds ran): the figure is then known to a few percent, whatever the
machine's noise, at the price of more rounds on a noisy one (at least 6). On CPU the same ratio is
also given in CPU time (the process's user + system seconds), which leaves out the spells the
process waits for a core, so it moves less with other load; wall time stays the figure a user
feels. On CPU the ratios are the figures to read; absolute times depend on the machine and its
load. Memory: on CUDA the peak allocated memory of each phase; on CPU the growth of the process's
resident memory (sampled every millisecond) during the student's first iteration, and during the
distiller's first iteration after it: what KD needs beyond the student alone (the allocator keeps
freed memory, so later phases cannot be told apart, and only the first config of a run gives a
figure: measure memory one config per process). Page faults: each phase's minor page faults per
iteration (median over rounds), the pages it had to take fresh from the system (``page_faults`` in
the JSON). They hardly depend on the machine's load, unlike times: a KD step that faults more than
its floor's phases together pays for memory that the phases alone reuse (``docs/cost.md``, KD-
DETR).

Teacher weights: when ``KD.TEACHER.WEIGHTS`` does not exist, the teacher that
``tools/benchmark_table.py`` trains from the same teacher config (``OUTPUT/teachers/FAMILY/
model_final.pth`` in the suite's default output folder) is used if it exists, else a randomly
initialised teacher, saved to a temporary file; each config's line says which. Most methods' cost
does not depend on the weights, but GID's instance selection follows the teacher's predictions, so
a trained teacher gives its realistic cost.
Run with ``OMP_NUM_THREADS`` set to the cores the process may use, and nothing else running.
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from scipy.stats import binom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))
# Before anything imports `kd`, which registers the datasets it finds there.
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))

from kd.benchmark.timing import (  # noqa: E402
    SUITES,
    ensure_teacher_weights,
    fixed_batches,
    method_configs,
    timing_config,
)


class PeakMemory:
    """Peak memory of a phase: CUDA allocator peak, or sampled RSS growth on CPU (bytes)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._rss()
            self._high = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._high = max(self._high, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, self._rss()) - self._base


def minor_page_faults() -> int:
    """The process's minor page faults so far: pages it touched fresh from the system."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(
    fn: Callable[[int], None],
    indices: Sequence[int],
    device: str,
    memory: Dict[str, int],
    name: str,
    faults: Optional[Dict[str, List[float]]] = None,
) -> Tuple[float, float]:
    """Wall and CPU seconds per batch of ``fn`` (a function of the batch's index) over
    ``indices``; records the phase's peak memory, and its minor page faults per batch into
    ``faults[name]`` if given. CPU time is the process's (all its threads, user and system)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with PeakMemory(device) as mem:
        sync()
        faulted = minor_page_faults()
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in indices:
            fn(i)
        sync()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        faulted = minor_page_faults() - faulted
    memory[name] = max(memory.get(name, 0), mem.peak)
    if faults is not None:
        faults.setdefault(name, []).append(faulted / len(indices))
    return elapsed / len(indices), cpu / len(indices)


def median_ci(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """A distribution-free confidence interval of the median of ``values``' population: the
    order statistics ``x_(j), x_(n+1-j)`` (1-based) with the largest ``j`` whose interval covers
    the median with probability >= ``level`` (``P(j <= B <= n-j)``, ``B ~ Binomial(n, 1/2)``).
    With too few values for ``level`` (fewer than 6 at 95 %) it is the range, which covers less.

    Args:
        values: independent measurements (here: one overhead ratio per round).
        level: the coverage wanted.
    """
    x = sorted(values)
    n = len(x)
    j = 1
    while j + 1 <= n // 2 and binom.cdf(n - j - 1, n, 0.5) - binom.cdf(j, n, 0.5) >= level:
        j += 1
    return x[j - 1], x[n - j]


def settled(ratios: Sequence[float], target: float) -> bool:
    """Whether the median of ``ratios`` is known to within ``target`` (relative): its 95 %
    confidence interval is at most ``2 * target * median`` wide (never before 6 rounds, the
    fewest with such an interval)."""
    if len(ratios) < 6:
        return False
    low, high = median_ci(ratios)
    return high - low <= 2 * target * statistics.median(ratios)


def benchmark_config(path: str, args, tmpdir: str) -> Dict[str, object]:
    """The figures of one distiller config (see the module docstring)."""
    from detectron2.modeling import build_model

    from kd.engine import build_optimizer

    cfg = timing_config(path, args.opts, args.device)
    teacher = ensure_teacher_weights(cfg, tmpdir)
    print(f"[benchmark_kd] teacher weights ({teacher}): {cfg.KD.TEACHER.WEIGHTS}", flush=True)
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    distiller = build_model(cfg)
    distiller.train()
    student = distiller.student
    # Separate optimizers, so the distiller's adapters do not change what "student alone" does.
    student_opt = build_optimizer(cfg, student)
    kd_opt = build_optimizer(cfg, distiller)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"

    def amp():
        return torch.autocast(device_type) if args.amp else nullcontext()

    scaler = torch.amp.GradScaler(device_type, enabled=args.amp and device_type == "cuda")
    batches = fixed_batches(cfg, args.iters)

    def train_step(model, optimizer, inputs):
        with amp():
            losses = model(inputs)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def student_step(i):
        train_step(student, student_opt, distiller.student_inputs(batches[i]))

    def teacher_forward(i):
        # The teacher as a user runs it: its full inference forward, eval mode, no gradients.
        with torch.no_grad(), amp():
            distiller.teacher(distiller.teacher_inputs(batches[i]))

    def kd_step(i):
        train_step(distiller, kd_opt, batches[i])

    prepare = getattr(distiller, "prepare_point_decoding", None)
    decoders: List[Callable[[], object]] = []

    def points(i):
        with torch.no_grad(), amp():
            decoders[i]()

    def points_train(i):
        with amp():
            answers = [t for t in _tensors(decoders[i]()) if t.requires_grad]
        if answers:
            torch.autograd.backward([t.float().sum() for t in answers])
        student.zero_grad(set_to_none=True)

    phases = {"student": student_step, "teacher": teacher_forward, "kd": kd_step}
    if prepare is not None:
        phases["points"] = points
        phases["points+bwd"] = points_train

    # Warm-up (allocator, MKL-DNN kernels, lazy buffers), student first and KD second: on CPU the
    # allocator keeps what a phase freed, so the KD phase's growth is what it needs *beyond* the
    # student alone; on CUDA every phase's peak is measured on its own.
    memory: Dict[str, int] = {}
    for name in sorted(phases, key=["student", "kd", "teacher", "points", "points+bwd"].index):
        if name == "points":
            # Everything the decoding needs besides itself, for every batch, before any of it is
            # timed; only after the student's and the KD step's warm-up, whose memory it would
            # blur (what these hold stays allocated until the end).
            with torch.no_grad(), amp():
                decoders.extend(prepare(batch) for batch in batches)
        timed(phases[name], range(1), args.device, memory, name)
    times: Dict[str, List[float]] = {name: [] for name in phases}
    cpu_times: Dict[str, List[float]] = {name: [] for name in phases}
    faults: Dict[str, List[float]] = {}
    floor_phase = "points+bwd" if "points" in phases else None
    for done in range(1, (max(args.repeats, args.max_repeats) if args.ci else args.repeats) + 1):
        for name, fn in phases.items():
            wall, cpu = timed(fn, range(len(batches)), args.device, memory, name, faults)
            times[name].append(wall)
            cpu_times[name].append(cpu)
        if done >= args.repeats and (
            not args.ci or settled(ratio_to_floor(times, floor_phase)["ratios"], args.ci)
        ):
            break
    med = {name: statistics.median(ts) for name, ts in times.items()}
    row = {
        "config": os.path.relpath(path, ROOT),
        "method": cfg.MODEL.META_ARCHITECTURE,
        "teacher": teacher,
        "teacher_weights": cfg.KD.TEACHER.WEIGHTS if teacher != "random" else None,
        "random_teacher": teacher == "random",
        "seconds": med,
        "rounds": times,
        "peak_memory_mb": {k: v / 2**20 for k, v in memory.items()},
        "page_faults": {k: statistics.median(v) for k, v in faults.items()},
    }
    row.update(ratio_to_floor(times, floor_phase))
    row["rounds_run"] = len(times["kd"])
    if not args.device.startswith("cuda"):
        # CPU time leaves out the spells a busy or virtual machine spends on other work.
        cpu = ratio_to_floor(cpu_times, floor_phase)
        row["cpu_seconds"] = {name: statistics.median(ts) for name, ts in cpu_times.items()}
        row["cpu_rounds"] = cpu_times
        row["overhead_cpu"], row["overhead_cpu_ci"] = cpu["overhead"], cpu["overhead_ci"]
    if "points" in times:
        forward = ratio_to_floor(times, "points")
        row["floor_forward"], row["overhead_forward"] = forward["floor"], forward["overhead"]
        row["overhead_forward_range"] = forward["overhead_range"]
    return row


def ratio_to_floor(times: Dict[str, List[float]], points: Optional[str]) -> Dict[str, object]:
    """The floor (median seconds) and ``kd / floor``: the median, range and 95 % confidence
    interval (:func:`median_ci`) of the per-round ratios, and the ratios.

    Args:
        times: phase -> seconds per iteration, one entry per round (rounds aligned).
        points: the phase whose time the floor adds to student + teacher, or None.
    """
    phases = ["student", "teacher"] + ([points] if points else [])
    floors = [sum(r) for r in zip(*(times[p] for p in phases))]
    ratios = [kd / floor for kd, floor in zip(times["kd"], floors)]
    return {
        "floor": sum(statistics.median(times[p]) for p in phases),
        "overhead": statistics.median(ratios),
        "overhead_range": [min(ratios), max(ratios)],
        "overhead_ci": list(median_ci(ratios)),
        "ratios": ratios,
    }


def _tensors(value) -> List[torch.Tensor]:
    """Every tensor in a nest of tuples, lists, dicts and dataclasses (a closure's answers)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif dataclasses.is_dataclass(value):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif not isinstance(value, (list, tuple)):
        return []
    return [t for v in value for t in _tensors(v)]


def format_table(rows: List[Dict[str, object]], device: str) -> str:
    cpu = not device.startswith("cuda")
    head = (
        "| config | student (ms) | teacher fwd (ms) | points / +bwd (ms) | KD step (ms) | overhead "
        "[95% CI] (rounds: range) | forward-only points |"
        + (" CPU-time overhead [95% CI] |" if cpu else "")
        + " memory student / KD (MB) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if cpu else "") + " ---: |"
    )
    lines = [head]
    for r in rows:
        s = r["seconds"]
        m = r["peak_memory_mb"]
        pts = f"{1000 * s['points']:.0f} / {1000 * s['points+bwd']:.0f}" if "points" in s else "-"
        low, high = r["overhead_range"]
        ci_low, ci_high = r["overhead_ci"]
        fwd = f"{r['overhead_forward']:.3f}" if "overhead_forward" in r else "-"
        cpu_cell = ""
        if cpu:
            c_low, c_high = r["overhead_cpu_ci"]
            cpu_cell = f" {r['overhead_cpu']:.3f} [{c_low:.2f}-{c_high:.2f}] |"
        lines.append(
            f"| {os.path.basename(r['config'])} | {1000 * s['student']:.0f} | "
            f"{1000 * s['teacher']:.0f} | {pts} | {1000 * s['kd']:.0f} | "
            f"**{r['overhead']:.3f}** [{ci_low:.2f}-{ci_high:.2f}] ({r['rounds_run']}: "
            f"{low:.2f}-{high:.2f}) | {fwd} |{cpu_cell} {m['student']:.0f} / {m['kd']:.0f} |"
        )
    mem = (
        "CUDA peak allocated per phase"
        if device.startswith("cuda")
        else "resident memory growth (sampled): student alone, then what KD adds beyond it"
    )
    lines.append(
        "\noverhead = KD step / (student + teacher fwd + points with the backward of the student's "
        "share), median over rounds with its distribution-free 95% confidence interval (rounds "
        "run: lowest-highest round); forward-only points: the points' decoding without that "
        "backward in the floor;"
        + (" CPU time: the same ratio in the process's CPU seconds;" if cpu else "")
        + f" memory: {mem}."
    )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="distiller configs (default: every method of --suite whose config exists)",
    )
    parser.add_argument(
        "--suite",
        choices=SUITES,
        default="kd_shapes",
        help="the default configs: configs/kd_shapes (default) or configs/bccd",
    )
    parser.add_argument("--iters", type=int, default=8, help="batches per timed phase")
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds per phase (at least)"
    )
    parser.add_argument(
        "--ci",
        type=float,
        default=0.0,
        help="keep adding rounds (up to --max-repeats) until the overhead's 95%% confidence "
        "interval is within +-CI of its median (e.g. 0.02); 0: exactly --repeats rounds",
    )
    parser.add_argument(
        "--max-repeats", type=int, default=40, help="the most rounds --ci may run (default 40)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (and a GradScaler on CUDA)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    # --configs takes every word up to the next option, overrides included.
    not_yaml = [c for c in args.configs or [] if not c.endswith((".yaml", ".yml"))]
    if not_yaml:
        parser.error(
            f"--configs {' '.join(not_yaml)}: not config files (.yaml); write KEY VALUE overrides "
            "after the other options"
        )
    os.chdir(ROOT)
    from detectron2.utils.events import EventStorage

    import kd  # noqa: F401  (registers the distillers and the datasets)
    from kd.data import validate_datasets

    configs = args.configs or method_configs(args.suite)
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for path in configs:
            cfg = timing_config(path, args.opts, args.device)
            validate_datasets(list(cfg.DATASETS.TRAIN))
            print(f"[benchmark_kd] {path} ...", flush=True)
            with EventStorage(0):  # detectron2's losses log into it
                row = benchmark_config(path, args, tmpdir)
            print(
                f"[benchmark_kd] {path}: overhead {row['overhead']:.3f} "
                f"({json.dumps({k: round(v, 4) for k, v in row['seconds'].items()})}); minor "
                f"page faults per iteration {json.dumps(row['page_faults'])}",
                flush=True,
            )
            rows.append(row)
    print()
    print(
        f"device: {args.device}, torch threads: {torch.get_num_threads()}, "
        f"{args.iters} batches a phase, rounds: "
        + (
            f"{args.repeats}"
            if not args.ci
            else f"{args.repeats}-{args.max_repeats}, until the 95% CI is within +-{args.ci:g}"
        )
        + f", AMP: {args.amp}"
    )
    print(format_table(rows, args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "amp": args.amp,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    from kd.launch import run_guarded

    run_guarded(main)
