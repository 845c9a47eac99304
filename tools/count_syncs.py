#!/usr/bin/env python
"""Host-device synchronisations per training iteration, per distiller: the student's own and the
ones distillation adds.

    python tools/count_syncs.py [--suite kd_shapes|bccd] [--configs A.yaml ...] [--iters 2]
        [--device cpu|cuda] [--sites N] [--json OUT.json] [KEY VALUE ...]

For each distiller config, on the same fixed batches, it counts the synchronisations of

* ``student``: a training step of the student alone (forward on the student's input, backward);
* ``kd``: a training step of the distiller (student, teacher, points, probes, losses, backward);

and prints their means per iteration and ``kd - student``, the synchronisations distillation
adds (the teacher's own forward included: it runs in every distilled step). The optimizer step
is the same in both and not counted.

How they are counted:

* on CUDA (``--device cuda``), exactly: ``torch.cuda.set_sync_debug_mode("warn")`` makes every
  synchronising CUDA call (a device-to-host copy, ``.item()``, ``nonzero``, a boolean-mask
  gather, ...) warn, and the warnings are counted, with the line of Python that caused each;
* on the CPU, where nothing synchronises, by instrumentation: a ``TorchFunctionMode`` counts the
  torch calls that synchronise on a GPU (``item``, ``tolist``, ``numpy``, ``cpu``, ``bool()``,
  ``int()``, ``float()``, ``nonzero``, ``where(cond)``, ``unique``, ``masked_select``,
  ``repeat_interleave`` without ``output_size``, ``torch.equal``, NMS, indexing with a boolean
  tensor, ``.to("cpu")``). It sees the Python-level calls (what a torch call does inside is its
  own), not syncs inside C++ kernels or in the backward pass; ``.cpu()`` is counted whatever
  tensor it is called on (on a GPU it syncs only for CUDA tensors). The CPU count is an estimate
  of the CUDA one, close for Python code such as this project's, where the KD-added ones are;
  the distillers' ROI pooling takes the path it takes on a GPU (``kd.roi_align.pool_levels``).

``--sites N`` lists, per config, the N lines of code that add the most synchronisations in the
distiller's step over the student's (the place to look when reducing them). The target is at most
2 KD-added synchronisations per iteration; README ("GPU") says which distillers are above it and
why.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import warnings
from typing import Callable, Counter, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects"))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))

# Calls that make the host wait for the device on CUDA (by their __name__).
ALWAYS_SYNC = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "equal",
    "allclose",
    "is_nonzero",
    "nms",
    "batched_nms",
}
_TORCH_DIR = os.path.dirname(torch.__file__)


def _has_bool_tensor(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def is_sync(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether this torch call synchronises the host with a CUDA device (see the docstring)."""
    name = getattr(func, "__name__", "")
    if name in ALWAYS_SYNC:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and "output_size" not in kwargs
    if name == "to":
        # .to("cpu") as written for a copy to the host; .to(model.device) (a torch.device) is the
        # models' device: host to device on a GPU, which does not make the host wait.
        device = kwargs.get("device", args[1] if len(args) > 1 else None)
        return isinstance(device, str) and torch.device(device).type == "cpu"
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_"):
        return len(args) > 1 and _has_bool_tensor(args[1])
    return False


def _short(filename: str) -> str:
    short = os.path.relpath(filename, ROOT) if filename.startswith(ROOT) else filename
    return short.split("site-packages/", 1)[1] if "site-packages/" in short else short


def _site() -> str:
    """The innermost line of code outside torch that is running, and where it lies in a library,
    the innermost line of this project's code that called it ("lib.py:12 <- projects/...:34")."""
    frame = sys._getframe(2)
    site = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name != __file__:
            here = f"{_short(name)}:{frame.f_lineno}"
            if site is None:
                site = here
                if name.startswith(os.path.join(ROOT, "projects")):
                    return site
            elif name.startswith(os.path.join(ROOT, "projects")):
                return f"{site} <- {here}"
        frame = frame.f_back
    return site or "?"


class SyncCounter(TorchFunctionMode):
    """Counts the synchronising torch calls made while it is active, by line of code."""

    def __init__(self):
        super().__init__()
        self.sites: Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_sync(func, args, kwargs):
            self.sites[_site()] += 1
        return func(*args, **kwargs)


class CudaSyncCounter:
    """Counts CUDA's own synchronisation warnings (``set_sync_debug_mode``), by line of code."""

    def __init__(self):
        self.sites: Counter[str] = collections.Counter()

    def __enter__(self):
        torch.cuda.synchronize()
        self._warnings = warnings.catch_warnings(record=True)
        self._log = self._warnings.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)
        for w in self._log:
            if "synchroniz" in str(w.message):
                self.sites[f"{_short(w.filename)}:{w.lineno}"] += 1
        torch.cuda.synchronize()
        return False


def count_config(path: str, args, tmpdir: str) -> Dict[str, object]:
    """The synchronisation counts of one distiller config."""
    import kd.roi_align

    # The distillers' pooling takes its sync-free path on GPUs only (kd.roi_align.pool_levels):
    # counted on the CPU, it takes it too, so that the count is the GPU's.
    previous, kd.roi_align.SYNC_FREE_POOLING = kd.roi_align.SYNC_FREE_POOLING, "always"
    try:
        return _count_config(path, args, tmpdir)
    finally:
        kd.roi_align.SYNC_FREE_POOLING = previous


def _count_config(path: str, args, tmpdir: str) -> Dict[str, object]:
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from kd.benchmark.timing import ensure_teacher_weights, fixed_batches, timing_config

    cfg = timing_config(path, args.opts, args.device)
    ensure_teacher_weights(cfg, tmpdir)
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    distiller = build_model(cfg).train()
    batches = fixed_batches(cfg, args.iters)
    counter = CudaSyncCounter if args.device.startswith("cuda") else SyncCounter

    def step(model, inputs_of) -> Counter[str]:
        sites: Counter[str] = collections.Counter()
        for batch in batches:
            with EventStorage(0):
                # Inputs prepared outside the count: the loader's work, the same for both.
                inputs = inputs_of(batch)
                with counter() as c:
                    losses = model(inputs)
                    sum(losses.values()).backward()
            model.zero_grad(set_to_none=True)
            sites.update(c.sites)
        return sites

    step(distiller, lambda b: b)  # warm-up: lazily built buffers, cached anchors
    student = step(distiller.student, distiller.student_inputs)
    kd = step(distiller, lambda b: b)

    # Compared line by line where the sync happens; the project's line that called it (a
    # library's line is called by the distiller in one step and by the student in the other) is
    # named beside it, from the distiller's step.
    def inner(sites: Counter[str]) -> Counter[str]:
        out: Counter[str] = collections.Counter()
        for k, v in sites.items():
            out[k.split(" <- ")[0]] += v
        return out

    kd_inner, student_inner = inner(kd), inner(student)
    added: Counter[str] = collections.Counter()
    for site, count in kd_inner.items():
        if count > student_inner[site]:
            callers = collections.Counter(
                {k.split(" <- ")[1]: v for k, v in kd.items() if k.startswith(site + " <- ")}
            )
            # The callers the student's own count accounts for (largest first) are the
            # student's; the others are named.
            budget = student_inner[site]
            for caller, v in callers.most_common():
                if v <= budget:
                    budget -= v
                    del callers[caller]
            name = f"{site} <- {', '.join(callers)}" if callers else site
            added[name] = count - student_inner[site]
    n = len(batches)
    return {
        "config": path,
        "student": sum(student.values()) / n,
        "kd": sum(kd.values()) / n,
        "kd_added": (sum(kd.values()) - sum(student.values())) / n,
        "added_sites": {k: v / n for k, v in added.most_common(args.sites or None)},
        "counted_by": "cuda sync debug mode" if args.device.startswith("cuda") else "torch calls",
    }


def format_table(rows: List[Dict[str, object]]) -> str:
    width = max([len("config")] + [len(os.path.basename(r["config"])) for r in rows])
    lines = [f"{'config':<{width}}  student  kd step  KD-added"]
    for r in rows:
        lines.append(
            f"{os.path.basename(r['config']):<{width}}  {r['student']:7.1f}  {r['kd']:7.1f}  "
            f"{r['kd_added']:8.1f}"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="distiller configs")
    parser.add_argument("--suite", choices=("kd_shapes", "bccd"), default="kd_shapes")
    parser.add_argument("--iters", type=int, default=2, help="batches counted (mean reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sites", type=int, default=0, help="list the N lines adding the most")
    parser.add_argument("--json", default=None, help="also write the counts to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    import kd  # noqa: F401  (registers the distillers and the datasets)
    from kd.benchmark.timing import method_configs

    configs = args.configs or method_configs(args.suite)
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for path in configs:
            row = count_config(path, args, tmpdir)
            rows.append(row)
            print(
                f"[count_syncs] {path}: student {row['student']:.1f}, kd {row['kd']:.1f}, "
                f"KD-added {row['kd_added']:.1f} per iteration",
                flush=True,
            )
            for site, n in row["added_sites"].items():
                print(f"    +{n:g}  {site}")
    print()
    print(
        f"host-device synchronisations per training iteration ({args.device}, "
        f"{rows[0]['counted_by'] if rows else ''}; mean of {args.iters} batches)"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "iters": args.iters, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    from kd.launch import run_guarded

    run_guarded(main)
