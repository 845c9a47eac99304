#!/usr/bin/env python
"""Record, or check, what every KD config computes: the "nothing numerical moves" fixture.

For every config under ``configs/kd_shapes`` and ``configs/bccd`` (subfolders included) that names
a teacher (``KD.TEACHER.CONFIG_FILE``, i.e. whose meta-architecture is a distiller), the distiller
is built with a small untrained teacher saved from a fixed seed (its zero-initialised parameters
given seeded noise) and trained for a few steps on fixed batches, one thread, every random draw
seeded. Recorded per config:

* ``losses``: the loss dict of the first step (the loss dict on a fixed batch);
* ``total_loss``: the summed loss of every step;
* ``weights``: digests of the distiller's ``state_dict`` (student and adapters) at its
  initialisation, after ``test_steps`` and after ``steps`` steps: a sha256 over every tensor's
  name, dtype, shape and bytes, and the float64 sum and sum of absolute values of the tensors of
  each module at initialisation (where a change of construction order shows), of each part
  (``student.backbone``, ``gid.adapters``, ...) after training steps (where everything moves
  once anything does).

The models are shrunk so that each config costs seconds: kd_shapes configs get the tests' tiny
ResNet-18 models on 64 px images (``tests/conftest.py``), bccd configs keep their MobileNetV2
models and only get smaller images (BCCD's first training images, ``$KD_BCCD_ROOT`` or
``../shared/data/bccd``). The options applied are stored with each config's record, and a check
refuses to compare when they differ. The learning-rate warm-up is cut to 2 steps so that 20 steps
move the weights; optimizer, learning rate, clipping and every ``KD.*`` key are the config's.

The steps mirror detectron2's ``SimpleTrainer.run_step`` (sum of the loss dict, backward, the
project's optimizer, detectron2's LR scheduler) without the trainer's data loader and hooks.

Usage:
    python tools/record_numerics.py --record                # write tests/fixtures/numerics.json
    python tools/record_numerics.py --check                 # every config, all recorded steps
    python tools/record_numerics.py --check --steps 3 --configs configs/bccd/fcos_kd_gid.yaml
    python tools/record_numerics.py --check --rtol 1e-6     # where an operation order changed

``tests/test_numerics_unchanged.py`` checks the loss dicts and the first ``test_steps`` steps of
every config; this tool's ``--check`` runs the full ``steps`` (the maintainer's check).
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "projects"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "numerics.json"
SUITES = ("kd_shapes", "bccd")
STEPS = 20
TEST_STEPS = 2
NUM_IMAGES = 8  # four batches of two, cycled
IMAGES_PER_BATCH = 2
SEED = 0
TEACHER_SEED = 1
DATASET = "kdnumerics"  # the kd_shapes-like images, generated into a temporary folder

# kd_shapes: the tests' tiny models (tests/conftest.py); teachers wider than students.
# fmt: off
KD_SHAPES_COMMON = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "DATASETS.TRAIN", f"('{DATASET}_train',)",
    "DATASETS.TEST", "()",
]
KD_SHAPES_FAMILY = {
    "GeneralizedRCNN": [
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    ],
    "RetinaNet": [],
    "FCOS": [],
    "DETR": [
        "MODEL.DETR.HIDDEN_DIM", "32",
        "MODEL.DETR.NHEADS", "4",
        "MODEL.DETR.DIM_FEEDFORWARD", "64",
        "MODEL.DETR.ENC_LAYERS", "1",
        "MODEL.DETR.DENOISING.MAX_QUERIES", "12",
    ],
}
KD_SHAPES_ROLE = {
    ("GeneralizedRCNN", "student"): ["MODEL.FPN.OUT_CHANNELS", "32"],
    ("GeneralizedRCNN", "teacher"): ["MODEL.FPN.OUT_CHANNELS", "48"],
    ("RetinaNet", "student"): ["MODEL.FPN.OUT_CHANNELS", "32"],
    ("RetinaNet", "teacher"): ["MODEL.FPN.OUT_CHANNELS", "64"],
    ("FCOS", "student"): ["MODEL.FPN.OUT_CHANNELS", "32"],
    ("FCOS", "teacher"): ["MODEL.FPN.OUT_CHANNELS", "64"],
    ("DETR", "student"): ["MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.NUM_QUERIES", "8"],
    ("DETR", "teacher"): ["MODEL.DETR.DEC_LAYERS", "3", "MODEL.DETR.NUM_QUERIES", "10"],
}
# A LazyConfig teacher is saved from its yacs twin (the same model, parameter for parameter).
LAZY_TEACHER_OPTS = ["model.backbone.bottom_up.stages.depth=18"]
LAZY_TWIN_OPTS = ["MODEL.RESNETS.DEPTH", "18"]
# bccd: the configs' own MobileNetV2 models on smaller images (student at 64x80 or 96x128).
BCCD_SCALED = [  # KD.STUDENT.INPUT_SCALE 0.5: the teacher's size, halved for the student
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
]
BCCD_SAME = [
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
]
# Every config: a short warm-up (20 steps should move the weights), no evaluation, no workers.
RUN = [
    "SOLVER.WARMUP_ITERS", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "KD.TEACHER.EVALUATE", "False",
]
# fmt: on


# ----------------------------------------------------------------------------- configs
def _read_cfg(path: Path, opts: Optional[List[str]] = None):
    from detectron2.config import get_cfg

    from kd.config import add_kd_config

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(str(path))
    if opts:
        cfg.merge_from_list(opts)
    return cfg


def kd_configs(repo: Path = REPO) -> List[str]:
    """Every KD config of the suites, as a path relative to the repository."""
    found = []
    for suite in SUITES:
        for path in sorted((repo / "configs" / suite).rglob("*.yaml")):
            if path.name.startswith("Base-"):
                continue
            if _read_cfg(path).KD.TEACHER.CONFIG_FILE:
                found.append(path.relative_to(repo).as_posix())
    return found


def _suite(config: str) -> str:
    return Path(config).parts[1]


def _teacher_file(cfg) -> Path:
    path = Path(cfg.KD.TEACHER.CONFIG_FILE)
    return path if path.is_absolute() else REPO / path


def _family_opts(suite: str, arch: str, role: str) -> List[str]:
    if suite == "kd_shapes":
        return [*KD_SHAPES_COMMON, *KD_SHAPES_FAMILY[arch], *KD_SHAPES_ROLE[(arch, role)]]
    return []


def run_options(config: str) -> Dict[str, List[str]]:
    """The options that shrink ``config``: ``{"student": [...], "teacher": [...]}``; with a
    LazyConfig teacher, ``teacher`` are those of its yacs twin and ``teacher_lazy`` its
    ``KD.TEACHER.OPTS``."""
    suite = _suite(config)
    cfg = _read_cfg(REPO / config)
    student = _family_opts(suite, cfg.KD.STUDENT.META_ARCHITECTURE, "student")
    if suite == "bccd":
        student = list(BCCD_SCALED if cfg.KD.STUDENT.INPUT_SCALE < 1 else BCCD_SAME)
    out = {"student": [*student, *RUN]}
    teacher_file = _teacher_file(cfg)
    if teacher_file.suffix == ".py":
        out["teacher"] = [*LAZY_TWIN_OPTS]
        out["teacher_lazy"] = list(LAZY_TEACHER_OPTS)
    else:
        arch = _read_cfg(teacher_file).MODEL.META_ARCHITECTURE
        out["teacher"] = _family_opts(suite, arch, "teacher")
    return out


def _lazy_twin(path: Path) -> Path:
    """The yacs config a LazyConfig teacher mirrors: ``lazy/x.py`` -> ``x.yaml`` beside lazy/."""
    twin = path.parent.parent / f"{path.stem}.yaml"
    if not twin.is_file():
        raise FileNotFoundError(f"{path}: no yacs twin {twin} to save an untrained teacher from")
    return twin


# ----------------------------------------------------------------------------- data
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_kd_shapes_data(root: str) -> None:
    """The kd_shapes-like images (the tests' generator settings), registered as kdnumerics_*."""
    from kd.data import register_folder_datasets
    from kd.data.synthetic import generate_dataset

    if not os.path.isdir(os.path.join(root, DATASET)):
        generate_dataset(
            root, DATASET, seed=3, num_train=NUM_IMAGES, num_val=1, image_size=64, verbose=False
        )
    register_folder_datasets(root)


def bccd_root() -> Path:
    return Path(os.environ.get("KD_BCCD_ROOT", REPO.parent / "shared" / "data" / "bccd"))


def bccd_available() -> bool:
    from kd.modeling.mobilenet import imagenet_weights_path

    return (bccd_root() / "Annotations").is_dir() and os.path.isfile(imagenet_weights_path())


def _dataset_dicts(suite: str) -> List[dict]:
    if suite == "kd_shapes":
        from detectron2.data import DatasetCatalog

        return DatasetCatalog.get(f"{DATASET}_train")[:NUM_IMAGES]
    from kd.data.voc import BCCD_CLASSES, load_voc_instances

    return load_voc_instances(str(bccd_root()), "train", BCCD_CLASSES)[:NUM_IMAGES]


def make_batches(cfg, suite: str) -> List[List[dict]]:
    """The fixed batches: detectron2's training mapper of ``cfg``, seeded per image."""
    import copy

    from detectron2.data import DatasetMapper

    mapper = DatasetMapper(cfg, True)
    mapped = []
    for i, d in enumerate(_dataset_dicts(suite)):
        seed_all(SEED + i)  # the random flip draws from numpy
        mapped.append(mapper(copy.deepcopy(d)))
    n = IMAGES_PER_BATCH
    return [mapped[i : i + n] for i in range(0, len(mapped), n)]


def batches_sha256(batches: List[List[dict]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for x in batch:
            h.update(x["image"].contiguous().numpy().tobytes())
            inst = x["instances"]
            h.update(inst.gt_boxes.tensor.contiguous().numpy().tobytes())
            h.update(inst.gt_classes.contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- digests
def weights_digest(model: torch.nn.Module, per_module: bool) -> dict:
    """sha256 over every tensor of the ``state_dict`` (sorted by name: registration order does
    not matter), and the [sum, sum of absolute values] in float64 of the tensors of each module
    (a tensor's name without its last part) or, with ``per_module`` False, of each part (its
    first two names: ``student.backbone``, ``gid.adapters``), to tell where and how much weights
    moved."""
    state = model.state_dict()
    h = hashlib.sha256()
    sums: Dict[str, List[float]] = {}
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
        d = t.double()
        key = name.rpartition(".")[0] if per_module else ".".join(name.split(".")[:2])
        total = sums.setdefault(key, [0.0, 0.0])
        total[0] += d.sum().item()
        total[1] += d.abs().sum().item()
    return {"sha256": h.hexdigest(), "sums": sums}


# ----------------------------------------------------------------------------- runs
@contextlib.contextmanager
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _save_teacher(config: str, options: dict, out: Path) -> List[str]:
    """Save the untrained teacher; returns the KD options that point the distiller at it."""
    from detectron2.modeling import build_model

    teacher_file = _teacher_file(_read_cfg(REPO / config))
    lazy = teacher_file.suffix == ".py"
    tcfg = _read_cfg(_lazy_twin(teacher_file) if lazy else teacher_file, options["teacher"])
    tcfg.MODEL.DEVICE = "cpu"
    weights = out / "teacher.pth"
    seed_all(TEACHER_SEED)
    teacher = build_model(tcfg)
    # Parameters initialised to zero (a DETR's last box layer, biases) get seeded noise: with
    # them a teacher's boxes are its student's anchors, and KD-DETR's box terms start at exactly 0.
    noise = torch.Generator().manual_seed(TEACHER_SEED)
    with torch.no_grad():
        for p in teacher.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=noise) * 0.01)
    torch.save({"model": teacher.state_dict()}, weights)
    if lazy:
        lazy_opts = "[" + ", ".join(repr(o) for o in options["teacher_lazy"]) + "]"
        return [
            "KD.TEACHER.CONFIG_FILE",
            str(teacher_file),
            "KD.TEACHER.OPTS",
            lazy_opts,
            "KD.TEACHER.WEIGHTS",
            str(weights),
        ]
    tconfig = out / "teacher.yaml"
    tconfig.write_text(tcfg.dump())
    return ["KD.TEACHER.CONFIG_FILE", str(tconfig), "KD.TEACHER.WEIGHTS", str(weights)]


def run_config(config: str, steps: int, snapshots: tuple, workdir: str) -> dict:
    """Build ``config``'s distiller with its untrained teacher, train ``steps`` steps on the
    fixed batches and return the record (see the module docstring).

    Args:
        config: the KD config, relative to the repository.
        steps: how many steps to train.
        snapshots: the step counts after which the weights are digested (0: initial).
        workdir: where the teacher and the kd_shapes images are written.
    """
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler
    from detectron2.utils.events import EventStorage

    from kd.engine import build_optimizer

    suite = _suite(config)
    options = run_options(config)
    if suite == "kd_shapes":
        make_kd_shapes_data(os.path.join(workdir, "datasets"))
    out = Path(tempfile.mkdtemp(prefix="teacher_", dir=workdir))
    with one_thread():
        teacher_opts = _save_teacher(config, options, out)
        cfg = _read_cfg(REPO / config, [*options["student"], *teacher_opts])
        cfg.MODEL.DEVICE = "cpu"
        cfg.OUTPUT_DIR = str(out / "run")
        cfg.freeze()
        batches = make_batches(cfg, suite)
        seed_all(SEED)
        model = build_model(cfg)
        record = {
            "options": options,
            "batches_sha256": batches_sha256(batches),
            "losses": None,
            "total_loss": [],
            "weights": {},
        }
        if 0 in snapshots:
            record["weights"]["0"] = weights_digest(model, per_module=True)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        model.train()
        with EventStorage(0) as storage:
            for step in range(steps):
                storage.iter = step
                seed_all(SEED + 1000 + step)
                loss_dict = model(batches[step % len(batches)])
                if step == 0:
                    record["losses"] = {k: float(v.detach()) for k, v in loss_dict.items()}
                losses = sum(loss_dict.values())
                record["total_loss"].append(float(losses.detach()))
                optimizer.zero_grad()
                losses.backward()
                optimizer.step()
                scheduler.step()
                if step + 1 in snapshots:
                    record["weights"][str(step + 1)] = weights_digest(model, per_module=False)
    return record


# ----------------------------------------------------------------------------- comparison
def _close(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if rtol == 0:
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def compare(expected: dict, got: dict, rtol: float = 0.0) -> List[str]:
    """The differences between a recorded and a recomputed record ([] when they agree).

    With ``rtol`` 0 everything must be bit-equal (the weights' sha256 included). With ``rtol``
    > 0 the losses must agree to ``rtol`` relative, and each tensor's sum to ``rtol`` of its sum
    of absolute values (a tensor-wide relative bound), its sum of absolute values to ``rtol``.
    """
    diffs = []
    if got["options"] != expected["options"]:
        return [f"options differ (recorded {expected['options']}, now {got['options']})"]
    if got["batches_sha256"] != expected["batches_sha256"]:
        diffs.append("the input batches differ (data generator, BCCD files or mapper changed)")
    want, have = expected["losses"], got["losses"]
    if set(want) != set(have):
        diffs.append(
            f"loss terms differ: missing {sorted(set(want) - set(have))}, "
            f"new {sorted(set(have) - set(want))}"
        )
    for k in want:
        if k in have and not _close(want[k], have[k], rtol):
            diffs.append(f"losses[{k}]: recorded {want[k]!r}, now {have[k]!r}")
    n = min(len(expected["total_loss"]), len(got["total_loss"]))
    for i in range(n):
        a, b = expected["total_loss"][i], got["total_loss"][i]
        if not _close(a, b, rtol):
            diffs.append(f"total loss of step {i}: recorded {a!r}, now {b!r}")
            break
    for snap, have_w in got["weights"].items():
        want_w = expected["weights"].get(snap)
        if want_w is None:
            diffs.append(f"no recorded weights after {snap} steps")
            continue
        if rtol == 0 and want_w["sha256"] == have_w["sha256"]:
            continue
        wt, ht = want_w["sums"], have_w["sums"]
        if set(wt) != set(ht):
            diffs.append(
                f"weights after {snap} steps: parts missing {sorted(set(wt) - set(ht))[:5]}, "
                f"new {sorted(set(ht) - set(wt))[:5]}"
            )
        moved = []
        for name in sorted(set(wt) & set(ht)):
            (s0, a0), (s1, a1) = wt[name], ht[name]
            if rtol == 0:
                same = s0 == s1 and a0 == a1
            else:
                same = abs(s0 - s1) <= rtol * max(a0, a1) and _close(a0, a1, rtol)
            if not same:
                moved.append(f"{name} (sum {s0!r} -> {s1!r})")
        if moved:
            diffs.append(f"weights after {snap} steps: {len(moved)} parts differ: {moved[:5]}")
        elif rtol == 0:
            diffs.append(f"weights after {snap} steps: sha256 differs (sums equal)")
    return diffs


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def arithmetic_canary() -> str:
    """A digest of the bits a few seeded kernels produce on this machine, one thread: 3x3, 1x1
    and depthwise convolutions (forward and weight / input gradients), batch norm in training,
    a matrix product and a softmax, at the sizes of the shrunk models. Two CPUs that report the
    same torch build and instruction set can still pick other oneDNN kernels (an AMD EPYC and
    the machine of the first recording did: 3 of 16 configs beyond 1e-6 after 2 steps); where
    this digest differs from the recording machine's, bit-exact comparison says nothing."""
    with one_thread():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 32, 40, 40, generator=g, requires_grad=True)
        outs = []
        for groups, k in ((1, 3), (1, 1), (32, 3)):
            w = torch.randn(32, 32 // groups, k, k, generator=g, requires_grad=True)
            y = torch.nn.functional.conv2d(x, w, padding=k // 2, groups=groups)
            y = torch.nn.functional.batch_norm(y, None, None, training=True)
            gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
            outs += [y, gx, gw]
        a = torch.randn(64, 256, generator=g)
        b = torch.randn(256, 96, generator=g)
        outs += [a @ b, torch.softmax(a, dim=1)]
        digest = hashlib.sha256()
        for t in outs:
            digest.update(t.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def machine_differs(recorded: dict) -> Optional[str]:
    """Why a fixture recorded on ``recorded`` (its ``recorded_on``) cannot be compared bit for
    bit here, or None when it can."""
    here = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if "canary" in recorded:  # fixtures before the canary name no CPU
        here.update(cpu_model=cpu_model(), canary=arithmetic_canary())
    differ = [f"{k} {recorded.get(k)} here {v}" for k, v in here.items() if recorded.get(k) != v]
    if differ:
        return "recorded on another machine (" + "; ".join(differ) + ")"
    return None


# ----------------------------------------------------------------------------- CLI
def _provenance() -> dict:
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = git("status", "--porcelain", "--", "projects", "configs")
    return {
        "commit": git("rev-parse", "HEAD"),
        "projects_or_configs_modified": bool(dirty),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "canary": arithmetic_canary(),
        "threads": 1,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true", help="write the fixture")
    mode.add_argument("--check", action="store_true", help="compare with the fixture")
    parser.add_argument("--fixture", default=str(FIXTURE), help="the fixture file")
    parser.add_argument("--configs", nargs="*", help="only these configs (default: all)")
    parser.add_argument("--steps", type=int, default=None, help=f"steps (default {STEPS})")
    parser.add_argument("--rtol", type=float, default=0.0, help="check: relative tolerance")
    args = parser.parse_args(argv)

    if args.record:
        configs = args.configs or kd_configs()
        steps = args.steps or STEPS
        fixture = {
            "about": "tools/record_numerics.py --record; checked by "
            "tests/test_numerics_unchanged.py and tools/record_numerics.py --check",
            "recorded_on": _provenance(),
            "steps": steps,
            "test_steps": TEST_STEPS,
            "configs": {},
        }
    else:
        fixture = json.loads(Path(args.fixture).read_text())
        elsewhere = machine_differs(fixture["recorded_on"])
        if elsewhere:
            print(f"warning: the fixture was {elsewhere}: differences may be the machine's")
        configs = args.configs or list(fixture["configs"])
        steps = args.steps or fixture["steps"]
    failed = []
    with tempfile.TemporaryDirectory(prefix="kd_numerics_") as workdir:
        for config in configs:
            if _suite(config) == "bccd" and not bccd_available():
                print(f"{config}: skipped (BCCD images or MobileNetV2 ImageNet weights missing)")
                continue
            snapshots = (0, TEST_STEPS, steps)
            if args.check and config in fixture["configs"]:
                recorded = (int(k) for k in fixture["configs"][config]["weights"])
                snapshots = tuple(k for k in recorded if k <= steps)
            start = time.perf_counter()
            record = run_config(config, steps, snapshots, workdir)
            took = time.perf_counter() - start
            if args.record:
                bad = [k for k, v in record["losses"].items() if not math.isfinite(v)]
                if bad or not all(math.isfinite(v) for v in record["total_loss"]):
                    raise SystemExit(f"{config}: non-finite losses {bad} {record['total_loss']}")
                fixture["configs"][config] = record
                print(f"{config}: recorded ({took:.1f} s)", flush=True)
                continue
            expected = fixture["configs"].get(config)
            if expected is None:
                print(f"{config}: not in the fixture")
                failed.append(config)
                continue
            diffs = compare(expected, record, args.rtol)
            print(f"{config}: {'DIFFERS' if diffs else 'unchanged'} ({took:.1f} s)", flush=True)
            for d in diffs:
                print(f"    {d}")
            if diffs:
                failed.append(config)
    if args.record:
        path = Path(args.fixture)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One line per module or part: [sum, sum of absolute values].
        text = re.sub(r"\[\n\s+(\S+),\n\s+(\S+)\n\s+\]", r"[\1, \2]", json.dumps(fixture, indent=1))
        path.write_text(text + "\n")
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
        return 0
    if failed:
        print(f"{len(failed)} of {len(configs)} configs differ: {failed}")
        return 1
    print(f"all {len(configs)} configs unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
