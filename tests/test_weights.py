"""Weight files are read without running code, checkpoints survive a kill, loads must fit.

Issue findings reproduced here: (1) a payload in a .pkl / .pth executed when loaded through any
entry point; (2) a kill while rewriting model_final.pth destroyed the only checkpoint; (3)
``--eval-only`` with a distiller checkpoint and the plain student's config evaluated an untrained
model and exited 0; (5) ``--resume`` when ``last_checkpoint`` names a deleted file crashed.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY_RCNN_OPTS,
    build_cfg,
    kd_opts,
    load_script,
    run_train_net,
    student_weights,
)
from torch import nn

KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"
STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"


class _Payload:
    """Unpickling this creates the file ``marker`` (harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payloads(folder: Path):
    """(pkl, pth, marker): two weight files whose loading would create ``marker``."""
    marker = folder / "payload-ran"
    pkl, pth = folder / "evil.pkl", folder / "evil.pth"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "extra": _Payload(marker)}, f)
    # torch.save of an arbitrary object is a pickle inside the zip: weights_only refuses it.
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, pth)
    return pkl, pth, marker


def test_plain_pickle_would_run_the_payload(tmp_path):
    """The test files are real payloads: the unsafe readers do run them (so the tests below can
    fail)."""
    pkl, pth, marker = write_payloads(tmp_path)
    with open(pkl, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    torch.load(pth, weights_only=False)
    assert marker.exists()


def test_safe_reader_refuses_payloads_and_reads_arrays(tmp_path):
    from kd.weights import UnsafeWeightsError, load_checkpoint_file

    pkl, pth, marker = write_payloads(tmp_path)
    for path in (pkl, pth):
        with pytest.raises(UnsafeWeightsError, match="refusing to read"):
            load_checkpoint_file(str(path))
    assert not marker.exists()
    # What real files hold is read: a model-zoo .pkl (numpy arrays, __author__), a Detectron
    # .pkl with blobs, a protocol-2 pickle, and a plain state dict .pth.
    zoo = tmp_path / "zoo.pkl"
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(3)}
    with open(zoo, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    got = load_checkpoint_file(str(zoo))
    assert got["__author__"] == "Detectron2 Model Zoo"
    np.testing.assert_array_equal(got["model"]["a.weight"], arrays["a.weight"])
    blobs = tmp_path / "c2.pkl"
    with open(blobs, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.ones(3), "conv1_w_momentum": np.ones(3)}}, f)
    got = load_checkpoint_file(str(blobs))
    assert list(got["model"]) == ["conv1_w"] and got["matching_heuristics"]
    plain = tmp_path / "plain.pth"
    torch.save({"x": torch.ones(2)}, plain)
    assert torch.equal(load_checkpoint_file(str(plain))["model"]["x"], torch.ones(2))


def test_payloads_through_every_entry_point(datasets_root, tiny_teacher, tmp_path):
    """Teacher, MODEL.WEIGHTS (training init and --eval-only), --resume and the tools: each
    refuses both payloads with a message, and nothing runs."""
    from detectron2.modeling import build_model

    from kd.checkpoint import WeightsError, load_weights
    from kd.teacher import TeacherError
    from kd.weights import KDCheckpointer

    pkl, pth, marker = write_payloads(tmp_path)
    cfg = build_cfg(KD_CONFIG, kd_opts(tiny_teacher, tmp_path / "run"))
    model = build_model(cfg)
    for path in (pkl, pth):
        opts = [*kd_opts(tiny_teacher, tmp_path / "run"), "KD.TEACHER.WEIGHTS", str(path)]
        with pytest.raises(TeacherError, match="refusing to read"):
            build_model(build_cfg(KD_CONFIG, opts))
        for complete in (False, True):  # training init / evaluation
            with pytest.raises(WeightsError, match="refusing to read"):
                load_weights(model, str(path), complete=complete)
        # --resume: last_checkpoint names the payload, and nothing else can be resumed from.
        run_dir = tmp_path / f"resume_{path.suffix[1:]}"
        run_dir.mkdir()
        os.link(path, run_dir / f"model_final{path.suffix}")
        (run_dir / "last_checkpoint").write_text(f"model_final{path.suffix}")
        with pytest.raises(WeightsError, match="no checkpoint .* can be read"):
            KDCheckpointer(model, str(run_dir)).resume_or_load("", resume=True)
        extract = load_script("tools/extract_student.py")
        argv = ["extract_student.py", "--config-file", KD_CONFIG, "--input", str(path)]
        argv += ["--output", str(tmp_path / "out.pth")]
        sys_argv, sys.argv = sys.argv, argv
        try:
            with pytest.raises(SystemExit, match="refusing to read"):
                extract.main()
        finally:
            sys.argv = sys_argv
    assert not marker.exists()
    # End to end: --eval-only with the .pkl payload stops with one line, no traceback.
    proc = run_train_net(
        ["--config-file", KD_CONFIG, "--eval-only", *kd_opts(tiny_teacher, tmp_path / "e")]
        + ["MODEL.WEIGHTS", str(pkl)],
        datasets_root,
        check=False,
    )
    assert proc.returncode != 0
    assert "refusing to read" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


class _Tiny(nn.Module):
    def __init__(self, value: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        nn.init.constant_(self.linear.weight, value)


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    from kd.weights import KDCheckpointer, WeightsError

    for value, name in ((1.0, "model_0000001"), (2.0, "model_0000003"), (3.0, "model_final")):
        KDCheckpointer(_Tiny(value), str(tmp_path)).save(name)
        os.utime(tmp_path / f"{name}.pth", (value, value))  # distinct, ordered mtimes
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    def resumed() -> float:
        model = _Tiny()
        KDCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
        return model.linear.weight[0, 0].item()

    assert resumed() == 3.0
    # The named file cut short (a kill while it was copied): the newest that loads is used.
    data = (tmp_path / "model_final.pth").read_bytes()
    (tmp_path / "model_final.pth").write_bytes(data[: len(data) // 3])
    assert resumed() == 2.0
    # The named file deleted: same.
    (tmp_path / "model_final.pth").unlink()
    assert resumed() == 2.0
    for name in ("model_0000001.pth", "model_0000003.pth"):
        (tmp_path / name).unlink()
    with pytest.raises(WeightsError, match="Start without --resume"):
        KDCheckpointer(_Tiny(), str(tmp_path)).resume_or_load("", resume=True)


# A stand-in for `kill -9` at the worst moment: torch.save writes part of model_final.pth's
# bytes, then the process is killed.
_KILL_DURING_FINAL_SAVE = """
import io, os, runpy, signal, sys, torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")
    if "model_final" not in str(name):
        return _save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    _save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.argv = ["train_net.py"] + sys.argv[1:]
runpy.run_path("train_net.py", run_name="__main__")
"""


def test_kill_while_rewriting_the_final_checkpoint_loses_nothing(
    datasets_root, tiny_teacher, tmp_path
):
    """Finding 2: a finished run extended with --resume rewrites model_final.pth, the file
    last_checkpoint names; a kill in that write must leave it intact, and the run resumed after
    the kill ends with the weights of a run that was never interrupted."""
    common = ["SOLVER.STEPS", "(4,)", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "1000"]
    straight, extended = tmp_path / "straight", tmp_path / "extended"

    def argv(out: Path, max_iter: int, *flags: str):
        return ["--config-file", KD_CONFIG, *flags, *kd_opts(tiny_teacher, out), *common] + [
            "SOLVER.MAX_ITER",
            str(max_iter),
        ]

    run_train_net(argv(straight, 6), datasets_root)
    run_train_net(argv(extended, 3), datasets_root)
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore")
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_FINAL_SAVE, *argv(extended, 6, "--resume")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_train_net(argv(extended, 6, "--resume"), datasets_root)
    a = student_weights(straight / "model_final.pth")
    b = student_weights(extended / "model_final.pth")
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distiller_checkpoint_for_a_plain_student_is_read_as_its_student(tiny_teacher, tmp_path):
    """Finding 3: the distiller's checkpoint with the student's config gives the student's
    weights (not a model with every key missed); a file that fits almost nothing is refused."""
    from detectron2.modeling import build_model

    from kd.checkpoint import WeightsError, load_weights

    distiller = build_model(build_cfg(KD_CONFIG, kd_opts(tiny_teacher, tmp_path)))
    with torch.no_grad():
        for p in distiller.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "kd.pth"
    torch.save({"model": distiller.state_dict()}, ckpt)
    student = build_model(build_cfg(STUDENT_CONFIG, TINY_RCNN_OPTS))
    load_weights(student, str(ckpt), complete=True)
    expected = {
        k[len("student.") :]: v for k, v in distiller.state_dict().items() if "student." in k
    }
    got = student.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    # A file of another architecture: nothing fits.
    other = tmp_path / "other.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, other)
    for complete in (True, False):
        with pytest.raises(WeightsError, match="does not fit"):
            load_weights(
                build_model(build_cfg(STUDENT_CONFIG, TINY_RCNN_OPTS)),
                str(other),
                complete=complete,
            )
    # Evaluation needs all of it: the backbone alone is refused for --eval-only, fine for init.
    backbone = tmp_path / "backbone.pth"
    torch.save({"model": {k: v for k, v in got.items() if "bottom_up" in k}}, backbone)
    with pytest.raises(WeightsError, match="untrained weights"):
        load_weights(
            build_model(build_cfg(STUDENT_CONFIG, TINY_RCNN_OPTS)), str(backbone), complete=True
        )
    load_weights(
        build_model(build_cfg(STUDENT_CONFIG, TINY_RCNN_OPTS)), str(backbone), complete=False
    )


def test_eval_only_of_an_unfitting_file_exits_with_one_line(datasets_root, tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, other)
    proc = run_train_net(
        ["--config-file", STUDENT_CONFIG, "--eval-only", *TINY_RCNN_OPTS]
        + ["MODEL.WEIGHTS", str(other), "OUTPUT_DIR", str(tmp_path / "e")],
        datasets_root,
        check=False,
    )
    assert proc.returncode != 0
    assert "does not fit" in proc.stderr and "Traceback" not in proc.stderr
