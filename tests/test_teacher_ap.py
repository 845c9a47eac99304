"""The teacher's AP before the first step, and the run stopped when it is too low.

A teacher with real AP is needed to tell a right from a wrong input format, and the tiny test
teachers (3 iterations) score about 0. Here a tiny Faster R-CNN is trained for 60 iterations on
four images and evaluated on the same four images (a validation split that copies the training
split): it learns them well enough for the AP to drop clearly when its channels are swapped.
Both APs are measured here with plain detectron2 (its COCOEvaluator on the model, the swap done
by hand) and compared with what the KD runs log and refuse.
"""

import json
import shutil

import pytest
import torch
from conftest import REPO, TINY_RCNN_OPTS, build_cfg, run_train_net

DATASET = "kdgate"
KD_CONFIG = str(REPO / "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml")
DATA = [
    "DATASETS.TRAIN", f"('{DATASET}_train',)",
    "DATASETS.TEST", f"('{DATASET}_val',)",
    "INPUT.RANDOM_FLIP", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def gate_root(tmp_path_factory):
    """Four 64 px images, as ``kdgate_train`` and again as ``kdgate_val``."""
    from kd.data import register_folder_datasets
    from kd.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("gate_datasets")
    generate_dataset(
        str(root), DATASET, seed=5, num_train=4, num_val=0, image_size=64, verbose=False
    )
    folder = root / DATASET
    shutil.copytree(folder / "train", folder / "val")
    shutil.copy(
        folder / "annotations/instances_train.json", folder / "annotations/instances_val.json"
    )
    register_folder_datasets(str(root))
    return root


@pytest.fixture(scope="module")
def trained_teacher(gate_root, tmp_path_factory, one_thread):
    """(config file, weights) of the tiny teacher after 60 iterations on the four images."""
    from detectron2.utils.env import seed_all_rng

    from kd.engine import Trainer

    out = tmp_path_factory.mktemp("gate_teacher")
    opts = list(TINY_RCNN_OPTS)
    opts[opts.index("MODEL.FPN.OUT_CHANNELS") + 1] = "48"
    opts += [
        *DATA,
        "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "10",
        "SOLVER.MAX_ITER", "60",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    cfg = build_cfg("configs/kd_shapes/faster_rcnn_teacher.yaml", opts)
    # Seeded, as train_net.py's default_setup seeds every run: unseeded, a 60-iteration teacher
    # sometimes learnt too little for the swapped-channels check below (5.94 vs 2.98 AP).
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    config = out / "teacher.yaml"
    config.write_text(cfg.dump())
    return str(config), str(out / "model_final.pth")


def plain_detectron2_ap(teacher, swap_channels: bool, out) -> float:
    """The teacher's box AP on kdgate_val with detectron2 alone (not the code under test)."""
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model

    cfg = build_cfg(teacher[0], [])
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(teacher[1], weights_only=True)["model"])

    class Swapped(torch.nn.Module):
        def forward(self, batch):
            return model([dict(x, image=x["image"].flip(0)) for x in batch])

    evaluator = COCOEvaluator(
        f"{DATASET}_val",
        tasks=("bbox",),
        distributed=False,
        output_dir=str(out),
        use_fast_impl=False,
    )
    loader = build_detection_test_loader(cfg, f"{DATASET}_val")
    results = inference_on_dataset(Swapped() if swap_channels else model, loader, evaluator)
    return results["bbox"]["AP"]


def kd_args(teacher, out, min_ap: float, *extra):
    return [
        "--config-file", KD_CONFIG,
        *TINY_RCNN_OPTS, *DATA,
        "KD.TEACHER.CONFIG_FILE", teacher[0],
        "KD.TEACHER.WEIGHTS", teacher[1],
        "KD.TEACHER.EVALUATE", "True",
        "KD.TEACHER.MIN_AP", str(min_ap),
        "SOLVER.MAX_ITER", "1",
        "OUTPUT_DIR", str(out),
        *extra,
    ]  # fmt: skip


def test_teacher_ap_is_logged_and_a_wrong_input_format_stops_the_run(
    gate_root, trained_teacher, tmp_path, one_thread
):
    right = plain_detectron2_ap(trained_teacher, False, tmp_path / "right")
    wrong = plain_detectron2_ap(trained_teacher, True, tmp_path / "wrong")
    # The premise: the teacher has real AP, and clearly less when its channels are swapped.
    assert right > 5.0 and right > 2 * wrong, (right, wrong)
    min_ap = round((right + wrong) / 2, 2)

    # Fed as it was trained (BGR, like the student): its AP logged at iteration 0, the run trains.
    ok = tmp_path / "ok"
    run_train_net(kd_args(trained_teacher, ok, min_ap), gate_root)
    rows = [json.loads(line) for line in (ok / "metrics.json").read_text().splitlines()]
    logged = [r for r in rows if "teacher/bbox/AP" in r]
    assert [r["iteration"] for r in logged] == [0]
    assert logged[0]["teacher/bbox/AP"] == pytest.approx(right, abs=1e-6)
    assert (ok / "model_final.pth").is_file()

    # Told its input is RGB: the distiller swaps the channels it is fed, the AP falls under
    # MIN_AP, and the run stops before the first step with the likely causes.
    bad = tmp_path / "bad"
    proc = run_train_net(
        kd_args(trained_teacher, bad, min_ap, "KD.TEACHER.OPTS", "['INPUT.FORMAT', 'RGB']"),
        gate_root,
        check=False,
    )
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert f"the teacher's box AP on {DATASET}_val is {wrong:.2f}, below KD.TEACHER.MIN_AP" in (
        message
    )
    for cause in ("other data", "input format", "BGR and RGB", "pixel mean/std"):
        assert cause in message
    assert "Traceback" not in proc.stderr
    assert not (bad / "model_final.pth").exists()  # stopped before anything trained or saved
