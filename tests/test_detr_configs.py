"""The DETR configs build, and a DETR trains and evaluates end to end through train_net.py."""

import glob
import json
import os
import subprocess
import sys

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import kd  # noqa: F401  (registers the DETR meta-architecture)
from kd.config import add_kd_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    glob.glob(os.path.join(ROOT, "configs", "kd_shapes", "detr_*.yaml"))
    + glob.glob(os.path.join(ROOT, "configs", "coco", "detr", "*.yaml"))
)
MODEL_CONFIGS = [c for c in CONFIGS if not os.path.basename(c).startswith("Base-")]


def _load(path):
    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=os.path.basename)
def test_config_builds(path):
    cfg = _load(path)
    if cfg.MODEL.META_ARCHITECTURE != "DETR":
        pytest.skip("a distiller config (tested with the distillers)")
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.num_classes == cfg.MODEL.DETR.NUM_CLASSES
    assert model.num_decoder_layers == cfg.MODEL.DETR.DEC_LAYERS


def test_kd_shapes_teacher_is_stronger_than_student():
    teacher = _load(os.path.join(ROOT, "configs", "kd_shapes", "detr_teacher.yaml")).MODEL
    student = _load(os.path.join(ROOT, "configs", "kd_shapes", "detr_student.yaml")).MODEL
    assert teacher.RESNETS.DEPTH > student.RESNETS.DEPTH
    assert teacher.DETR.DEC_LAYERS > student.DETR.DEC_LAYERS
    assert teacher.DETR.NUM_CLASSES == student.DETR.NUM_CLASSES


def test_train_net_trains_evaluates_resumes_and_runs_two_processes(tmp_path):
    from kd.data.synthetic import generate_dataset

    generate_dataset(
        str(tmp_path / "data"),
        "kd_shapes",
        seed=0,
        num_train=8,
        num_val=4,
        image_size=64,
        verbose=False,
    )
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    tiny = [
        "MODEL.RESNETS.DEPTH",
        "18",
        "MODEL.DETR.HIDDEN_DIM",
        "32",
        "MODEL.DETR.NHEADS",
        "4",
        "MODEL.DETR.DIM_FEEDFORWARD",
        "64",
        "MODEL.DETR.NUM_QUERIES",
        "10",
        "MODEL.DETR.DEC_LAYERS",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.STEPS",
        "(2,)",
        "SOLVER.WARMUP_ITERS",
        "0",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "INPUT.MAX_SIZE_TRAIN",
        "64",
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "OUTPUT_DIR",
        str(out),
    ]
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train_net.py"),
        "--config-file",
        os.path.join(ROOT, "configs", "kd_shapes", "detr_student.yaml"),
    ] + tiny
    proc = subprocess.run(
        cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])
    assert os.path.isfile(out / "model_final.pth")
    # --resume continues after the last checkpoint with a longer schedule.
    proc = subprocess.run(
        [*cmd[:4], "--resume", *tiny, "SOLVER.MAX_ITER", "4", "DATASETS.TEST", "()"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 3" in proc.stdout + proc.stderr
    # Two CPU processes (gloo): no unused-parameter error, training completes.
    out2 = tmp_path / "ddp"
    proc = subprocess.run(
        [*cmd[:4], "--num-gpus", "2", *tiny, "OUTPUT_DIR", str(out2), "DATASETS.TEST", "()"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(out2 / "model_final.pth")
