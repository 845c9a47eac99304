"""tools/count_syncs.py and tools/gpu_check.sh on the CPU (issue 25): the maintainer's GPU check
runs end to end with the device switched to the CPU, one iteration each."""

import json
import os
import subprocess

import pytest
import torch
from conftest import REPO, load_script

# Every run of the check on 64 px images, 2 a batch, DETRs with 10 queries (student and teacher).
SMALL = [
    *("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2"),
    *("DATALOADER.NUM_WORKERS", "0", "MODEL.DETR.NUM_QUERIES", "10"),
    *("MODEL.DETR.DENOISING.MAX_QUERIES", "12"),
    *("KD.TEACHER.OPTS", "['MODEL.DETR.NUM_QUERIES','10','MODEL.DETR.DENOISING.MAX_QUERIES','12']"),
]


@pytest.fixture(scope="module")
def kd_shapes_root(tmp_path_factory):
    """A tiny kd_shapes (4 train / 2 val images, 64 px) registered under its real name."""
    from kd.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("gpu_check_data")
    generate_dataset(str(root), "kd_shapes", seed=0, num_train=4, num_val=2, image_size=64)
    return root


def test_sync_counter_counts_what_syncs_on_a_gpu():
    cs = load_script("tools/count_syncs.py")
    x = torch.arange(6.0) - 2
    with cs.SyncCounter() as c:
        y = x[x > 0]  # a boolean-mask gather: 1
        y.sum().item()  # 1
        if (x > 3).any():  # bool(): 1
            pass
        torch.where(x > 0)  # 1
        torch.where(x > 0, x, -x)  # elementwise: 0
        x.to(torch.device("cpu"))  # the models' device: host to device on a GPU, 0
        x.to("cpu")  # a copy to the host: 1
        x[torch.tensor([0, 2])]  # integer indices: 0
        x.topk(2)  # 0
    assert sum(c.sites.values()) == 5, c.sites
    assert all(site.startswith("tests/test_gpu_check.py:") for site in c.sites)


def test_count_syncs_on_a_tiny_distiller(kd_shapes_root, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(kd_shapes_root))
    from kd.data import register_folder_datasets

    register_folder_datasets(str(kd_shapes_root))
    cs = load_script("tools/count_syncs.py")
    out = tmp_path / "syncs.json"
    config = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"
    cs.main(["--configs", config, "--iters", "1", "--sites", "5", "--json", str(out), *SMALL])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["config"] == config and row["counted_by"] == "torch calls"
    # The student's own step syncs (NMS, matching); the distiller's step adds the teacher's and
    # its own; the lines adding them are named.
    assert row["student"] > 0 and row["kd"] >= row["student"]
    assert row["kd_added"] == row["kd"] - row["student"]
    assert row["added_sites"] and all(":" in site for site in row["added_sites"])


def test_gpu_check_runs_end_to_end_on_the_cpu(kd_shapes_root, tmp_path):
    """The whole script, every step, on two distillers (an R-CNN and a DETR one): each trains in
    the three precisions, an AMP run resumes, CUDA asked for on the CPU is refused with its line,
    and the sync counts and the benchmark are written."""
    configs = [
        "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml",
        "configs/kd_shapes/detr_kd_detr.yaml",
    ]
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(kd_shapes_root),
        GPU_CHECK_OPTS=" ".join(SMALL),
        GPU_CHECK_CONFIGS=" ".join(configs),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    out = tmp_path / "check"
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "gpu_check: all steps passed" in proc.stdout
    runs = json.loads((out / "runs.json").read_text())
    assert runs["device"] == "cpu"
    assert sorted((r["config"], r["mode"]) for r in runs["runs"]) == sorted(
        (c, m) for c in configs for m in ("fp32", "amp", "half_teacher")
    )
    assert all(r["ok"] and r["s_per_iter"] > 0 for r in runs["runs"])
    checks = {c["check"]: c for c in runs["checks"]}
    assert checks["AMP resume (faster_rcnn_kd_chen2017.yaml)"]["ok"]
    assert checks["MODEL.DEVICE cuda without CUDA"]["ok"]
    syncs = json.loads((out / "syncs.json").read_text())["rows"]
    assert [r["config"] for r in syncs] == configs
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["device"] == "cpu" and len(bench["rows"]) == 2
