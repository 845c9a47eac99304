"""What a first GPU run meets, checked on the CPU (issue 25): the device a config asks for, the
process-group backend that follows it, one process per GPU, RNG forks over the current GPU only,
the inputs prepared on the models' device, the native deformable-attention kernel in float32, a
half-precision teacher (KD.TEACHER.DTYPE) and the student's mixed precision (SOLVER.AMP).

CUDA is faked where a test needs "a machine with a GPU" (``torch.cuda.is_available`` patched);
nothing here touches a real GPU.
"""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    REPO,
    TINY_RCNN_OPTS,
    build_cfg,
    load_script,
    run_train_net,
    save_untrained_teacher,
)

from kd.config import ConfigError, load_config, resolve_device

KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine whose torch sees one GPU (nothing may actually run on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------------------- MODEL.DEVICE
def test_no_base_config_pins_the_device():
    # The audit's finding: every Base-*.yaml set MODEL.DEVICE cpu, so a GPU machine trained on
    # the CPU. Whatever a config file says is the user's choice now; the Base files say nothing.
    bases = [p for d in ("kd_shapes", "bccd") for p in (REPO / "configs" / d).glob("Base-*.yaml")]
    assert len(bases) == 8
    for path in bases:
        assert "DEVICE" not in path.read_text(), path


def test_device_is_cuda_with_a_gpu_and_cpu_without(fake_gpu, monkeypatch):
    assert load_config(str(REPO / KD_CONFIG)).MODEL.DEVICE == "cuda"
    # An explicit cpu stays cpu on a GPU machine.
    cfg = load_config(str(REPO / KD_CONFIG), ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.DEVICE == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config(str(REPO / KD_CONFIG)).MODEL.DEVICE == "cpu"


def test_cuda_asked_for_without_a_gpu_is_one_line(no_gpu, tmp_path):
    with pytest.raises(ConfigError, match=r"^MODEL.DEVICE cuda \(on the command line\) but there"):
        load_config(str(REPO / KD_CONFIG), ["MODEL.DEVICE", "cuda"])
    # Set in a file (here a _BASE_ of the file given): the message names that file.
    base = tmp_path / "base.yaml"
    base.write_text(f'_BASE_: "{REPO / KD_CONFIG}"\nMODEL:\n  DEVICE: "cuda:0"\n')
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{base}"\n')
    with pytest.raises(ConfigError, match=f"MODEL.DEVICE cuda:0 \\(in {base}\\)") as e:
        load_config(str(child))
    assert "Set MODEL.DEVICE cpu" in str(e.value) and "\n" not in str(e.value)


def test_a_gpu_index_the_machine_lacks_is_refused(fake_gpu):
    cfg = build_cfg(KD_CONFIG, [])
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cuda:1"
    with pytest.raises(ConfigError, match="sees 1 GPU"):
        resolve_device(cfg, None, ["MODEL.DEVICE", "cuda:1"])


def test_train_net_without_cuda_stops_with_one_line(datasets_root):
    proc = run_train_net(
        ["--config-file", str(REPO / KD_CONFIG), "MODEL.DEVICE", "cuda"],
        datasets_root,
        check=False,
        timeout=120,
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "MODEL.DEVICE cuda (on the command line)" in errors[0]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- processes
def test_backend_follows_the_models_device(fake_gpu, monkeypatch):
    from kd import compat
    from kd.launch import uses_cuda

    cfg = types.SimpleNamespace(MODEL=types.SimpleNamespace(DEVICE="cpu"))
    assert not uses_cuda(cfg)
    cfg.MODEL.DEVICE = "cuda"
    assert uses_cuda(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not uses_cuda(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    # CPU models on a GPU machine: detectron2's (NCCL, one GPU per process) launcher is not used.
    import detectron2.engine

    def nccl_launch(*args, **kwargs):
        raise AssertionError("detectron2's GPU launcher used for CPU models")

    monkeypatch.setattr(detectron2.engine, "launch", nccl_launch)
    ran = []
    compat.launch(ran.append, 1, args=("ran",), cuda=False)
    assert ran == ["ran"]
    with pytest.raises(AssertionError, match="GPU launcher"):
        compat.launch(ran.append, 1, args=("ran",), cuda=True)


def test_more_gpu_processes_than_gpus_is_one_line(fake_gpu, monkeypatch, capsys):
    from kd.launch import launch

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    args = types.SimpleNamespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto")
    cfg = types.SimpleNamespace(MODEL=types.SimpleNamespace(DEVICE="cuda"))

    def main(_):
        raise AssertionError("a process was started")

    assert launch(main, args, check=lambda a: cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: --num-gpus 2 but this machine shows 1 GPU, and NCCL")


def test_ranks_sharing_a_gpu_are_found():
    from kd.device import shared_gpus

    assert shared_gpus(["h/a", "h/b", "g/a"]) == {}
    assert shared_gpus(["h/a", "h/b", "h/a", "h/b", "h/c"]) == {"h/a": [0, 2], "h/b": [1, 3]}


def test_fork_rng_forks_the_current_gpu_only(fake_gpu, monkeypatch, datasets_root, tmp_path):
    import kd.device
    from kd.teacher import build_teacher_model

    seen = []

    class Recorder:
        def __init__(self, devices=None, **kwargs):
            seen.append(devices)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.random, "fork_rng", Recorder)
    with kd.device.fork_rng():
        pass
    assert seen == [[0]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Building a teacher (on the CPU here) forks the CPU generator alone: an explicit empty list,
    # not torch's default of every visible GPU.
    cfg_file, _ = _tiny_teacher(tmp_path)
    build_teacher_model(build_cfg(KD_CONFIG, [*TINY_RCNN_OPTS, "KD.TEACHER.CONFIG_FILE", cfg_file]))
    assert seen[-1] == []


# ----------------------------------------------------------------------------- inputs
class _OnDevice(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        self._device = torch.device(device)

    @property
    def device(self):
        return self._device


def _old_student_inputs(batched_inputs, s):
    """The low-resolution resize as it was before it moved to the models' device (on the
    loader's CPU image): the reference the new code must equal bit for bit on the CPU."""
    out = []
    for x in batched_inputs:
        img = x["image"]
        h, w = img.shape[-2:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        small = F.interpolate(
            img[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
        )[0]
        out.append(small.round().clamp(0, 255).to(img.dtype))
    return out


def _batch():
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in ((40, 56), (37, 61)):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[2.0, 3.0, 30.0, 20.0]]))
        inst.gt_classes = torch.tensor([1])
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_inputs_are_prepared_on_the_models_device(device):
    from kd.meta_arch.base import Distiller

    model = Distiller(
        student=_OnDevice(device),
        teacher=_OnDevice(device),
        teacher_input_format="RGB",
        student_input_format="BGR",
        student_input_scale=0.5,
    )
    batch = _batch()
    before = copy.deepcopy(batch)
    teacher_in = model.teacher_inputs(batch)
    student_in = model.student_inputs(batch)
    for x in (*teacher_in, *student_in):
        assert x["image"].device.type == device  # was the loader's CPU image before
    if device == "cpu":
        for x, t, b in zip(before, teacher_in, batch):
            assert torch.equal(t["image"], x["image"][[2, 1, 0]])
            assert torch.equal(b["image"], x["image"])  # the loader's batch is not modified
        for s, ref in zip(student_in, _old_student_inputs(before, 0.5)):
            assert s["image"].dtype == torch.uint8 and torch.equal(s["image"], ref)
        assert student_in[0]["instances"].gt_boxes.tensor.tolist() == [[1.0, 1.5, 15.0, 10.0]]


# ----------------------------------------------------------------------------- native kernel
def test_native_deformable_attention_gets_float32(monkeypatch):
    from kd.modeling.detr import ms_deform_attn as msda

    seen = {}

    class FakeKernel:
        @staticmethod
        def ms_deform_attn_forward(value, shapes, starts, locations, weights, step):
            seen.update(value=value.dtype, locations=locations.dtype, weights=weights.dtype)
            b, _, h, d = value.shape
            return torch.zeros(b, locations.shape[1], h * d, dtype=value.dtype)

    monkeypatch.setattr(msda, "_NATIVE", FakeKernel)
    monkeypatch.setattr(msda, "_uses_native_kernel", lambda value: True)
    value = torch.randn(1, 20, 2, 4).bfloat16()
    shapes = torch.tensor([[4, 5]])
    starts = torch.tensor([0])
    locations = torch.rand(1, 3, 2, 1, 2, 2).bfloat16()
    weights = torch.rand(1, 3, 2, 1, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = msda.ms_deform_attn(value, shapes, starts, locations, weights)
    assert seen == dict(value=torch.float32, locations=torch.float32, weights=torch.float32)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 8)


# ----------------------------------------------------------------------------- precision
def _tiny_teacher(tmp_path):
    return save_untrained_teacher(
        tmp_path, "configs/kd_shapes/faster_rcnn_teacher.yaml", TINY_RCNN_OPTS, seed=0
    )


def test_precision_keys_are_checked():
    from kd.amp import amp_dtype
    from kd.device import parse_dtype

    assert parse_dtype("bfloat16", "KD.TEACHER.DTYPE", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="KD.TEACHER.DTYPE must be one of float32, bfloat16"):
        parse_dtype("half", "KD.TEACHER.DTYPE", "cpu")
    cfg = build_cfg(KD_CONFIG, ["SOLVER.AMP.DTYPE", "float32"])
    with pytest.raises(ConfigError, match="float32 is no mixed precision"):
        amp_dtype(cfg)


def test_half_precision_teacher_answers_float32_close_to_float32(
    datasets_root, tmp_path, one_thread
):
    """A bfloat16 teacher's answers (features, proposals' scores, box head) are float32 and
    within 3 % (relative L2) of the float32 teacher's on the same images; bfloat16 keeps 8
    significant bits (0.4 % per rounding), and the error measured here is about 1 %."""
    from kd.device import set_precision
    from kd.teacher import build_teacher

    cfg_file, weights = _tiny_teacher(tmp_path)
    opts = [*TINY_RCNN_OPTS, "KD.TEACHER.CONFIG_FILE", cfg_file, "KD.TEACHER.WEIGHTS", weights]
    cfg = build_cfg(KD_CONFIG, [*opts, "KD.TEACHER.DTYPE", "bfloat16"])
    half, _ = build_teacher(cfg, "GeneralizedRCNN")
    full, _ = build_teacher(build_cfg(KD_CONFIG, opts), "GeneralizedRCNN")
    images = torch.rand(2, 3, 64, 64) * 255

    def answers(teacher):
        with torch.no_grad():
            x = teacher.preprocess_image([{"image": i} for i in images])
            feats = teacher.backbone(x.tensor)
            pooled = teacher.roi_heads.box_pooler(
                [feats[f] for f in teacher.roi_heads.box_in_features],
                [_boxes(), _boxes()],
            )
            scores, deltas = teacher.roi_heads.box_predictor(teacher.roi_heads.box_head(pooled))
        return {**feats, "scores": scores, "deltas": deltas}

    a, b = answers(full), answers(half)
    for name in a:
        assert b[name].dtype == torch.float32, name
        assert torch.isfinite(b[name]).all(), name
        rel = ((a[name] - b[name]).norm() / a[name].norm()).item()
        assert 0 < rel < 0.03, (name, rel)  # 0: the teacher did not run in bfloat16 at all
    # A whole inference forward too: Instances of float32 boxes and scores.
    with torch.no_grad():
        out = half([{"image": images[0], "height": 64, "width": 64}])[0]["instances"]
    assert out.pred_boxes.tensor.dtype == torch.float32 and out.scores.dtype == torch.float32

    # float32 under the student's autocast (SOLVER.AMP): the teacher stays exactly float32.
    set_precision(full, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = answers(full)
    assert all(torch.equal(a[k], c[k]) for k in a)


def _boxes():
    from detectron2.structures import Boxes

    return Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 12.0, 60.0, 60.0]]))


def test_mixed_precision_student_step_on_cpu(datasets_root, tmp_path, one_thread):
    """SOLVER.AMP with bfloat16 trains a distiller (with a bfloat16 teacher) through the trainer
    on the CPU: finite losses, the student changed, no gradient scaler; float16 gets one."""
    from kd.amp import MixedPrecisionTrainer
    from kd.engine import Trainer

    cfg_file, weights = _tiny_teacher(tmp_path)
    opts = [
        *TINY_RCNN_OPTS,
        *("KD.TEACHER.CONFIG_FILE", cfg_file, "KD.TEACHER.WEIGHTS", weights),
        *("KD.TEACHER.DTYPE", "bfloat16", "SOLVER.AMP.ENABLED", "True"),
        *("SOLVER.AMP.DTYPE", "bfloat16", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2"),
        *("OUTPUT_DIR", str(tmp_path / "run")),
    ]
    trainer = Trainer(build_cfg(KD_CONFIG, opts))
    assert isinstance(trainer._trainer, MixedPrecisionTrainer)
    assert not trainer._trainer.grad_scaler.is_enabled()
    before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    trainer.train()
    losses = {k: v.values() for k, v in trainer.storage.histories().items() if "loss" in k}
    assert any(k.startswith("loss_kd_") for k in losses), sorted(losses)
    assert all(
        len(v) == 2 and all(torch.isfinite(torch.tensor(x)) for x, _ in v) for v in losses.values()
    )
    after = trainer.model.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    fp16 = build_cfg(KD_CONFIG, [*opts[:-2], "SOLVER.AMP.DTYPE", "float16"])
    model = torch.nn.Linear(2, 2)
    step = MixedPrecisionTrainer(
        model, [], torch.optim.SGD(model.parameters(), lr=0.1), dtype=torch.float16, device="cpu"
    )
    assert step.grad_scaler.is_enabled() and fp16.SOLVER.AMP.DTYPE == "float16"


# ----------------------------------------------------------------------------- pooling
def test_sync_free_pooling_equals_roi_pooler_bit_for_bit(monkeypatch):
    """kd.roi_align.pool_levels (the distillers' pooling on a GPU) gives detectron2's ROIPooler's
    values and gradients exactly, without a host-device sync; ROIPooler syncs once per level and
    once more."""
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes

    import kd.roi_align
    from kd.roi_align import pool_levels

    counter = load_script("tools/count_syncs.py").SyncCounter
    g = torch.Generator().manual_seed(0)
    pooler = ROIPooler((7, 7), (1 / 4, 1 / 8, 1 / 16, 1 / 32), 0, "ROIAlignV2")
    sizes = ((64, 64), (32, 32), (16, 16), (8, 8))
    features = [torch.randn(2, 8, h, w, generator=g, requires_grad=True) for h, w in sizes]
    # Boxes of 6 to 200 px: every level gets some.
    xy = torch.rand(2, 12, 2, generator=g) * 50
    wh = torch.logspace(0.8, 2.3, 12)[None, :, None].expand(2, -1, 2)
    boxes = [Boxes(torch.cat([xy[i], xy[i] + wh[i]], dim=1)) for i in range(2)]
    upstream = torch.randn(24, 8, 7, 7, generator=g)

    def run(fn):
        with counter() as c:
            out = fn(pooler, features, boxes)
        grads = torch.autograd.grad((out * upstream).sum(), features)
        return out, grads, sum(c.sites.values())

    monkeypatch.setattr(kd.roi_align, "SYNC_FREE_POOLING", "always")
    out, grads, syncs = run(pool_levels)
    ref, ref_grads, ref_syncs = run(lambda p, f, b: p(f, b))
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert syncs == 0 and ref_syncs == 5
    # On the CPU by default: ROIPooler itself (cheaper where nothing waits).
    monkeypatch.setattr(kd.roi_align, "SYNC_FREE_POOLING", "cuda")
    assert run(pool_levels)[2] == 5
