#!/usr/bin/env python
"""What the student buys: a teacher and its student side by side at inference.

    python tools/benchmark_inference.py \\
        --teacher TEACHER_CFG [--teacher-weights W] --student STUDENT_CFG [--student-weights W] \\
        --images IMAGE_OR_FOLDER [...] [--num-images 20] [--repeats 3] [--threads 1 2] \\
        [--runtimes pytorch onnxruntime] [--batch 4] [--random-weights] \\
        [--teacher-ap EVAL_RESULTS_JSON] [--student-ap EVAL_RESULTS_JSON | --eval] \\
        [--json OUT.json] [KEY VALUE ...]

The configs and weights are what ``tools/predict.py`` takes (a KD config with its checkpoint runs
its student). Each model gets the same images, each resized to its own test size
(``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, as ``DefaultPredictor`` does): a low-resolution
student's smaller input is part of what it buys. ``KEY VALUE`` overrides apply to both models.

For each model it prints:

* parameters (all of the model's, frozen ones included);
* GFLOPs of one image with fvcore's ``FlopCountAnalysis`` on the traced model (fvcore counts one
  multiply-add as one flop; operators it has no formula for, e.g. NMS, are left out);
* peak memory: the growth of the process's resident memory (sampled every millisecond) over the
  first pass on the images, in a fresh process per model and runtime (weights loaded before);
* latency at batch 1: the median over ``--repeats`` passes of each image's wall time, and its CPU
  time (the process's user + system time, which moves less with other load on the machine);
* throughput: images per second over a pass, at batch ``--batch`` in PyTorch; ONNX Runtime at
  batch 1 (the exported graph takes one image, see ``tools/export_student.py``);

for each runtime (PyTorch eager on the CPU; ONNX Runtime's CPU provider on the file
``tools/export_student.py`` writes) and each thread count (``torch.set_num_threads`` /
``intra_op_num_threads``). Then the ratios: "student: N x faster than its teacher", per runtime
and thread count, in wall and in CPU time.

AP: ``--teacher-ap`` / ``--student-ap`` read a run's ``eval_results.json`` (``bbox/AP``);
``--eval`` evaluates both models on their config's ``DATASETS.TEST[0]`` with detectron2's
COCOEvaluator. Without either, AP is printed as "n/a".

``--random-weights`` builds models without weights (random initialisation): parameters, FLOPs,
memory and speed do not depend on training (only the number of boxes above the score threshold
does, slightly); AP does, and is not reported then.

Timing: run with nothing else on the machine where possible; the load average at the start is
printed and recorded. CUDA is not measured by this tool yet.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)

__all__ = ["main", "measure", "PeakRSS"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Growth of the process's resident memory while the block runs (bytes), sampled every ms."""

    def __enter__(self):
        self.base = self.high = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.high = max(self.high, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.high, _rss()) - self.base


def _cpu() -> float:
    return time.process_time()  # every thread of the process, user + system


def measure(run_one, run_batch, images: List, threads: Sequence[int], repeats: int, set_threads):
    """Memory of the first pass, then per thread count: latency (wall and CPU, median per image
    over ``repeats`` passes) and throughput (images/s of the best pass of ``run_batch``)."""
    set_threads(threads[0])
    with PeakRSS() as mem:
        for image in images:
            run_one(image)
    result = {"peak_memory_mb": mem.peak / 2**20, "threads": {}}
    for n in threads:
        set_threads(n)
        run_one(images[0])  # warm-up at this thread count
        walls, cpus = [], []
        for _ in range(repeats):
            for image in images:
                w, c = time.perf_counter(), _cpu()
                run_one(image)
                walls.append(time.perf_counter() - w)
                cpus.append(_cpu() - c)
        passes = []
        for _ in range(max(1, repeats)):
            w = time.perf_counter()
            run_batch(images)
            passes.append(len(images) / (time.perf_counter() - w))
        result["threads"][str(n)] = {
            "latency_ms": 1000 * statistics.median(walls),
            "cpu_ms": 1000 * statistics.median(cpus),
            "throughput": max(passes),
        }
    return result


# ------------------------------------------------------------------ workers (one per process)
def _worker_pytorch(spec: Dict) -> Dict:
    import torch

    sys.path.insert(0, TOOLS)
    from export_student import load_model

    torch.set_num_threads(spec["threads"][0])
    cfg, model, _ = _load(spec, load_model)
    images = [torch.from_numpy(a) for a in np.load(spec["images"])["images"]]
    batch = spec["batch"]

    def run_one(image):
        with torch.no_grad():
            model([{"image": image}])

    def run_batch(images):
        with torch.no_grad():
            for i in range(0, len(images), batch):
                model([{"image": x} for x in images[i : i + batch]])

    return measure(
        run_one, run_batch, images, spec["threads"], spec["repeats"], torch.set_num_threads
    )


def _worker_onnxruntime(spec: Dict) -> Dict:
    import onnxruntime as ort

    images = list(np.load(spec["images"])["images"])
    sessions = {}

    def session(n):
        if n not in sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = n
            options.inter_op_num_threads = 1
            sessions[n] = ort.InferenceSession(
                spec["onnx"], options, providers=["CPUExecutionProvider"]
            )
        return sessions[n]

    current = {}

    def set_threads(n):
        current["session"] = session(n)

    def run_one(image):
        current["session"].run(None, {"image": image})

    def run_batch(images):
        for image in images:
            run_one(image)

    # The first session is made before the memory is measured, as the PyTorch model is built.
    set_threads(spec["threads"][0])
    return measure(run_one, run_batch, images, spec["threads"], spec["repeats"], set_threads)


def _load(spec: Dict, load_model):
    opts = list(spec["opts"])
    if spec["weights"] is None and spec["random"]:
        from detectron2.modeling import build_model

        sys.path.insert(0, TOOLS)
        from predict import setup_cfg

        cfg, _ = setup_cfg(spec["config"], [*opts, "MODEL.DEVICE", "cpu"])
        import torch

        torch.manual_seed(0)
        return cfg, build_model(cfg).eval(), None
    return load_model(spec["config"], spec["weights"], opts)


def _run_worker(runtime: str, spec: Dict) -> Dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(spec["threads"])), PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", runtime, f.name],
            capture_output=True,
            text=True,
            env=env,
        )
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the parent
def _read_ap(path: Optional[str]) -> Optional[float]:
    if not path:
        return None
    with open(path) as f:
        return float(json.load(f)["bbox"]["AP"])


def _evaluate(cfg, model) -> float:
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset

    from kd.compat import build_coco_evaluator

    dataset = cfg.DATASETS.TEST[0]
    with tempfile.TemporaryDirectory() as out:
        evaluator = build_coco_evaluator(dataset, output_dir=out)
        results = inference_on_dataset(model, build_detection_test_loader(cfg, dataset), evaluator)
    return float(results["bbox"]["AP"])


def prepare(role: str, config: str, weights: Optional[str], args, files: List[str], work: str):
    """Build one model here: parameters, FLOPs, its resized images and ONNX file (in ``work``);
    AP if asked. Returns its record and the spec its workers take."""
    import torch
    from fvcore.nn import FlopCountAnalysis

    sys.path.insert(0, TOOLS)
    from export_student import export_onnx, load_model, resized_image, traceable

    spec = {
        "config": config,
        "weights": weights,
        "opts": list(args.opts),
        "random": args.random_weights,
        "threads": args.threads,
        "repeats": args.repeats,
        "batch": args.batch,
    }
    from detectron2.data import transforms as T

    cfg, model, _ = _load(spec, load_model)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    images = [resized_image(p, cfg, aug) for p in files]
    shapes = {tuple(x.shape) for x in images}
    spec["images"] = os.path.join(work, f"{role}_images.npz")
    np.savez(spec["images"], images=np.stack([x.numpy() for x in images]))
    adapter = traceable(model, images[0])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flops = FlopCountAnalysis(adapter, (images[0],))
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        gflops = flops.total() / 1e9
    record = {
        "config": config,
        "weights": weights or ("random" if args.random_weights else cfg.MODEL.WEIGHTS),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "input": [list(s) for s in sorted(shapes)],
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": gflops,
        "ap": None,
    }
    if "onnxruntime" in args.runtimes:
        if len(shapes) > 1:
            raise SystemExit(
                f"benchmark_inference.py: error: the {role}'s images resize to {sorted(shapes)}; "
                "the ONNX graph takes one size: pass images of one size"
            )
        spec["onnx"] = os.path.join(work, f"{role}.onnx")
        export_onnx(adapter, images[0], spec["onnx"])
    ap_file = args.teacher_ap if role == "teacher" else args.student_ap
    if ap_file:
        record["ap"] = _read_ap(ap_file)
    elif args.eval:
        with torch.no_grad():
            record["ap"] = _evaluate(cfg, model)
    return record, spec


def _table(records: Dict[str, Dict], runtimes: Sequence[str], threads: Sequence[int]) -> str:
    head = "| | params (M) | GFLOPs | input | AP |"
    rule = "|---|---|---|---|---|"
    for rt in runtimes:
        head += f" {rt} peak mem (MB) |"
        rule += "---|"
        for n in threads:
            head += f" {rt} {n}t latency ms (CPU ms) | {rt} {n}t img/s |"
            rule += "---|---|"
    lines = [head, rule]
    for role, r in records.items():
        ap = "n/a" if r["ap"] is None else f"{r['ap']:.2f}"
        size = ", ".join("x".join(str(v) for v in s[1:]) for s in r["input"])
        line = f"| {role} | {r['parameters_m']:.2f} | {r['gflops']:.2f} | {size} | {ap} |"
        for rt in runtimes:
            m = r["runtimes"][rt]
            line += f" {m['peak_memory_mb']:.0f} |"
            for n in threads:
                t = m["threads"][str(n)]
                line += f" {t['latency_ms']:.1f} ({t['cpu_ms']:.1f}) | {t['throughput']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def speedups(records: Dict[str, Dict], runtimes: Sequence[str], threads: Sequence[int]) -> Dict:
    """Teacher / student latency per runtime and thread count, in wall and CPU time."""
    out = {}
    for rt in runtimes:
        for n in threads:
            t = records["teacher"]["runtimes"][rt]["threads"][str(n)]
            s = records["student"]["runtimes"][rt]["threads"][str(n)]
            out[f"{rt}/{n}t"] = {
                "wall": t["latency_ms"] / s["latency_ms"],
                "cpu": t["cpu_ms"] / max(s["cpu_ms"], 1e-9),
                "throughput": s["throughput"] / t["throughput"],
            }
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher's config")
    parser.add_argument("--teacher-weights", default=None)
    parser.add_argument("--student", required=True, help="the student's (or the KD) config")
    parser.add_argument("--student-weights", default=None)
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--num-images", type=int, default=20, help="the first N images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--runtimes",
        nargs="+",
        choices=("pytorch", "onnxruntime"),
        default=["pytorch", "onnxruntime"],
    )
    parser.add_argument("--batch", type=int, default=4, help="PyTorch throughput batch")
    parser.add_argument("--random-weights", action="store_true", help="no weights: speed only")
    parser.add_argument("--teacher-ap", default=None, help="the teacher's eval_results.json")
    parser.add_argument("--student-ap", default=None, help="the student's eval_results.json")
    parser.add_argument("--eval", action="store_true", help="evaluate both on DATASETS.TEST[0]")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides (both)")
    args = parser.parse_args(argv)
    sys.path.insert(0, TOOLS)
    from export_student import split_config_options

    args.images, args.opts = split_config_options(args.images, args.opts)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "projects"))
    sys.path.insert(0, TOOLS)
    from predict import list_images

    if args.random_weights and (args.eval or args.teacher_ap or args.student_ap):
        raise SystemExit("benchmark_inference.py: error: --random-weights has no AP to report")
    files = list_images(args.images)[: args.num_images]
    load = os.getloadavg()
    records = {}
    with tempfile.TemporaryDirectory() as work:
        for role, config, weights in (
            ("teacher", args.teacher, args.teacher_weights),
            ("student", args.student, args.student_weights),
        ):
            record, spec = prepare(role, config, weights, args, files, work)
            record["runtimes"] = {rt: _run_worker(rt, spec) for rt in args.runtimes}
            records[role] = record
    ratios = speedups(records, args.runtimes, args.threads)
    conditions = (
        f"{len(files)} images, {args.repeats} repeats, CPU ({os.cpu_count()} cores), "
        f"load average {load[0]:.1f} at the start"
    )
    print(_table(records, args.runtimes, args.threads))
    print(f"conditions: {conditions}")
    for key, r in ratios.items():
        print(
            f"student: {r['wall']:.2f} x faster than its teacher ({key}, wall latency; "
            f"{r['cpu']:.2f} x in CPU time; throughput {r['throughput']:.2f} x)"
        )
    result = {"models": records, "speedup": ratios, "conditions": conditions}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.path.insert(0, os.path.join(ROOT, "projects"))
        with open(sys.argv[3]) as f:
            worker_spec = json.load(f)
        worker = {"pytorch": _worker_pytorch, "onnxruntime": _worker_onnxruntime}[sys.argv[2]]
        print(json.dumps(worker(worker_spec)))
    else:
        main()
