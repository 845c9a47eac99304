"""tools/train_hf_teacher.py: an HF RT-DETR trained with transformers' own loss for 2 iterations
on the tiny kd_shapes dataset, saved as a folder that loads as an hf:// teacher."""

import json
import os

import pytest
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


def _args(out, *extra):
    return [
        "--dataset", TINY_DATASET, "--output", str(out), "--iters", "4", "--batch-size", "2",
        "--image-size", "64", "--size", "tiny", "--seed", "3", "--device", "cpu",
        "--checkpoint-period", "2", *extra,
    ]  # fmt: skip


def test_an_interrupted_training_resumes_to_the_same_weights(
    datasets_root, tmp_path, one_thread, monkeypatch
):
    from safetensors.torch import load_file

    tool = load_script("tools/train_hf_teacher.py")
    tool.main(_args(tmp_path / "whole"))

    # Killed during its third iteration: the state saved after the second is kept.
    calls = {"n": 0}
    load_sample = tool.load_sample

    def dies_in_the_third_iteration(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * 2:  # two samples per iteration
            raise KeyboardInterrupt
        return load_sample(*args, **kwargs)

    monkeypatch.setattr(tool, "load_sample", dies_in_the_third_iteration)
    out = tmp_path / "resumed"
    try:
        tool.main(_args(out))
    except KeyboardInterrupt:
        pass
    assert (out / "training_state.pth").is_file() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(tool, "load_sample", load_sample)
    with pytest.raises(SystemExit, match="other arguments.*seed 3 \\(now 4\\)"):
        tool.main([*_args(out)[:-6], "--seed", "4", "--device", "cpu", "--checkpoint-period", "2"])
    tool.main(_args(out))
    assert not (out / "training_state.pth").exists()
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(out / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_learning_rate_schedule_by_hand():
    """Warm-up over a tenth of the iterations (at most 100), x0.1 from --lr-step of them on; the
    backbone at --backbone-lr-mult of the rest's rate."""
    import argparse

    tool = load_script("tools/train_hf_teacher.py")
    args = argparse.Namespace(iters=200, lr=5e-4, backbone_lr_mult=0.5, lr_step=0.85)
    # warm-up 20 iterations: factor (it + 1) / 20; the step at 0.85 * 200 = 170.
    expected = {0: 1 / 20, 9: 10 / 20, 19: 1.0, 169: 1.0, 170: 0.1, 199: 0.1}
    for it, factor in expected.items():
        backbone, rest = tool.learning_rates(it, args)
        assert rest == pytest.approx(5e-4 * factor, rel=1e-12), it
        assert backbone == pytest.approx(2.5e-4 * factor, rel=1e-12), it
    long = argparse.Namespace(iters=5000, lr=1e-3, backbone_lr_mult=1.0, lr_step=1.0)
    assert tool.learning_rates(99, long) == (1e-3, 1e-3)  # warm-up capped at 100 iterations
    assert tool.learning_rates(49, long)[1] == pytest.approx(0.5e-3)
    assert tool.learning_rates(4999, long)[1] == 1e-3  # lr_step 1: no step


def test_the_teachers_backbone_normalises():
    """The backbone starts from random weights, so its batch norms train (transformers' default
    freezes them, as for a pretrained backbone): BatchNorm2d modules with trainable affine
    parameters, running statistics updated in training."""
    tool = load_script("tools/train_hf_teacher.py")
    torch.manual_seed(0)
    model = tool.build_model(["a", "b"], "tiny").train()
    norms = [m for n, m in model.named_modules() if ".backbone." in n and "norm" in n.lower()]
    assert norms and all(isinstance(m, torch.nn.BatchNorm2d) for m in norms)
    assert all(m.weight.requires_grad and m.bias.requires_grad for m in norms)
    before = norms[0].running_mean.clone()
    model.model.backbone(torch.rand(2, 3, 64, 64), torch.ones(2, 64, 64, dtype=torch.long))
    assert not torch.equal(before, norms[0].running_mean)
