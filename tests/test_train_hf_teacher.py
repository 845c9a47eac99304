"""tools/train_hf_teacher.py: an HF RT-DETR trained with transformers' own loss for 2 iterations
on the tiny kd_shapes dataset, saved as a folder that loads as an hf:// teacher."""

import json
import os

import torch
from conftest import TINY_DATASET, load_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_two_iterations_write_a_teacher_folder(datasets_root, tmp_path, one_thread):
    from kd.data.synthetic import CLASSES
    from kd.families.hf_detr import HFDETRTeacher

    tool = load_script("tools/train_hf_teacher.py")
    out = tmp_path / "teacher"
    tool.main(
        [
            "--dataset", TINY_DATASET, "--output", str(out), "--iters", "2",
            "--batch-size", "2", "--image-size", "64", "--size", "tiny", "--seed", "3",
            "--device", "cpu", "--eval",
        ]
    )  # fmt: skip
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    teacher = HFDETRTeacher.from_source(f"hf://{out}")
    assert teacher.class_names == [c.name for c in CLASSES]
    p = teacher.processing
    assert p.size == {"height": 64, "width": 64} and not p.normalize and not p.pad
    # It trained: the weights moved from the initialisation the same seed gives.
    torch.manual_seed(3)
    initial = tool.build_model(teacher.class_names, "tiny").state_dict()
    trained = teacher.model.state_dict()
    moved = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(moved) > len(initial) // 2
    results = json.loads((out / "eval_results.json").read_text())
    assert "AP" in results["bbox"]
