"""Shared fixtures: a tiny generated dataset, tiny Faster R-CNN configs and a tiny teacher.

Everything is sized for a 2-core CPU: 64 px images, ResNet-18 with narrow FPN/heads, a few
iterations. The dataset folder is put in DETECTRON2_DATASETS so that ``train_net.py`` subprocesses
register it too (``import kd`` registers every folder there).
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "projects"))
sys.path.insert(0, str(REPO))

TINY_DATASET = "kdtest"

# A tiny Faster R-CNN on 64 px images; appended to any kd_shapes Faster R-CNN config.
# fmt: off
TINY_RCNN_OPTS = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.005",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", "3",
    "DATASETS.TRAIN", f"('{TINY_DATASET}_train',)",
    "DATASETS.TEST", f"('{TINY_DATASET}_val',)",
    "DATALOADER.NUM_WORKERS", "0",
    "SEED", "7",
    # The tiny teachers score about 0 AP; the teacher's AP is tested in test_teacher_ap.py.
    "KD.TEACHER.EVALUATE", "False",
]
# fmt: on


# Tiny two-stage DETRs with denoising (the kd_shapes family) on 64 px images; callers add
# MODEL.DETR.DEC_LAYERS and NUM_QUERIES.
TINY_DETR_OPTS = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.DETR.HIDDEN_DIM", "32",
    "MODEL.DETR.NHEADS", "4",
    "MODEL.DETR.DIM_FEEDFORWARD", "64",
    "MODEL.DETR.ENC_LAYERS", "1",
    "MODEL.DETR.DENOISING.MAX_QUERIES", "12",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "DATASETS.TRAIN", f"('{TINY_DATASET}_train',)",
    "DATASETS.TEST", f"('{TINY_DATASET}_val',)",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", "2",
    "SEED", "7",
    "KD.TEACHER.EVALUATE", "False",
]  # fmt: skip


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory) -> Path:
    """A tiny kd_shapes-like dataset (16 train / 6 val, 64 px), registered as kdtest_*."""
    from kd.data import register_folder_datasets
    from kd.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_dataset(
        str(root), TINY_DATASET, seed=3, num_train=16, num_val=6, image_size=64, verbose=False
    )
    os.environ["DETECTRON2_DATASETS"] = str(root)
    register_folder_datasets(str(root))
    return root


def run_train_net(
    args: List[str], env_root: Path, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``train_net.py`` in a subprocess with the tiny dataset registered."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(env_root), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train_net.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def tiny_teacher(datasets_root, tmp_path_factory):
    """(config file, weights) of a tiny teacher trained for 3 iterations through train_net.py.

    It is wider than the tiny student (FPN 48 vs 32 channels), so the hint adapters really map
    channels.
    """
    out = tmp_path_factory.mktemp("teacher")
    config = out / "teacher.yaml"
    config.write_text(
        f'_BASE_: "{REPO}/configs/kd_shapes/faster_rcnn_teacher.yaml"\n'
        "MODEL:\n  RESNETS:\n    DEPTH: 18\n    RES2_OUT_CHANNELS: 64\n"
        "  FPN:\n    OUT_CHANNELS: 48\n  ROI_BOX_HEAD:\n    FC_DIM: 64\n"
    )
    opts = [o for o in TINY_RCNN_OPTS]
    i = opts.index("MODEL.FPN.OUT_CHANNELS")
    del opts[i : i + 2]
    run_train_net(
        [
            "--config-file",
            str(config),
            *opts,
            "OUTPUT_DIR",
            str(out / "run"),
            "DATASETS.TEST",
            "()",
        ],
        datasets_root,
    )
    weights = out / "run" / "model_final.pth"
    assert weights.is_file()
    # The teacher config must carry the tiny input/proposal sizes too: write them in.
    from detectron2.config import get_cfg

    from kd.config import add_kd_config, resolve_device

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(opts)
    # The device it ran on (the dump would otherwise say detectron2's "cuda" explicitly).
    resolve_device(cfg, str(config), opts)
    config.write_text(cfg.dump())
    return str(config), str(weights)


def load_script(relative_path: str):
    """A script of the repository (``tools/x.py``) imported as a module."""
    import importlib.util

    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_untrained_teacher(out: Path, config_file: str, opts: List[str], seed: int):
    """(config file, weights) of a freshly built tiny teacher, saved as a checkpoint.

    Untrained weights are enough for the wiring; the loader still verifies every key and shape.
    """
    import torch
    from detectron2.modeling import build_model

    cfg = build_cfg(config_file, opts)
    config, weights = out / "teacher.yaml", out / "teacher.pth"
    config.write_text(cfg.dump())
    torch.manual_seed(seed)
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    return str(config), str(weights)


def student_weights(path) -> dict:
    """The ``student.*`` tensors of a distiller checkpoint."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def assert_resume_equals_uninterrupted(
    config_file: str, opts_for, env_root: Path, tmp_path: Path
) -> None:
    """A run stopped at a checkpoint and resumed ends with the same student weights as one that
    ran straight through: model, optimizer, schedule, sampler position and RNG states resume.

    The interrupted run is trained to iteration 3 of 6 (its last checkpoint); the learning-rate
    schedule is defined in iterations, so resuming it with MAX_ITER 6 is the same schedule.

    Args:
        config_file: the distiller config.
        opts_for: ``opts_for(out_dir)`` gives the tiny run's options writing to ``out_dir``.
        env_root: DETECTRON2_DATASETS of the runs.
        tmp_path: where the two runs write.
    """
    import torch

    common = ["SOLVER.STEPS", "(4,)", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "3"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"

    def run(out: Path, max_iter: int, *resume: str) -> None:
        argv = ["--config-file", config_file, *resume, *opts_for(out), *common]
        run_train_net([*argv, "SOLVER.MAX_ITER", str(max_iter)], env_root)

    run(straight, 6)
    run(interrupted, 3)
    at_interruption = student_weights(interrupted / "model_final.pth")
    run(interrupted, 6, "--resume")
    a = student_weights(straight / "model_final.pth")
    b = student_weights(interrupted / "model_final.pth")
    assert a.keys() == b.keys() and len(a) > 50
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"
    assert not all(torch.equal(a[k], at_interruption[k]) for k in a)  # it trained after resuming


def teacher_opts(teacher, out_dir) -> List[str]:
    """Options pointing a distiller at a (config file, weights) teacher, writing to ``out_dir``."""
    config, weights = teacher
    return [
        "KD.TEACHER.CONFIG_FILE",
        config,
        "KD.TEACHER.WEIGHTS",
        weights,
        "OUTPUT_DIR",
        str(out_dir),
    ]


def kd_opts(teacher, out_dir) -> List[str]:
    """Options that turn the Chen et al. KD config into a tiny run with the tiny teacher."""
    return [*TINY_RCNN_OPTS, *teacher_opts(teacher, out_dir)]


def build_cfg(config_file: str, opts: List[str]):
    """A frozen config as train_net.py builds it (without its logging side effects)."""
    from detectron2.config import get_cfg

    from kd.config import add_kd_config, resolve_device

    cfg = get_cfg()
    add_kd_config(cfg)
    path = str(REPO / config_file) if not os.path.isabs(config_file) else config_file
    cfg.merge_from_file(path)
    cfg.merge_from_list(opts)
    resolve_device(cfg, path, opts)  # detectron2's default "cuda" is the CPU where there is none
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a 2-core machine shared with other jobs, two OpenMP
    threads spin-wait on each other and small models run 5-25x slower; restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def rng_left_as_found():
    """Leave the global RNG states as the test found them: a later module's unseeded fixture
    (a teacher trained in-process) would otherwise train differently."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


@pytest.fixture
def event_storage():
    """detectron2's heads log statistics during training and need a storage to log to."""
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        yield storage


def without_annotations(batch, images):
    """The batch with the ground truth of ``images`` removed: background-only images, as
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS False`` lets them through."""
    import torch
    from detectron2.structures import Boxes, Instances

    out = []
    for i, x in enumerate(batch):
        if i in images:
            empty = Instances(x["instances"].image_size)
            empty.gt_boxes = Boxes(torch.zeros(0, 4))
            empty.gt_classes = torch.zeros(0, dtype=torch.long)
            x = dict(x, instances=empty)
        out.append(x)
    return out
