"""End to end through train_net.py: train, evaluate, resume, 2 processes, bad teachers, export."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    TINY_RCNN_OPTS,
    assert_resume_equals_uninterrupted,
    build_cfg,
    kd_opts,
    run_train_net,
)
from dist_worker import assert_ranks_identical

KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"
STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"


def test_train_eval_and_resume(datasets_root, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    first = run_train_net(
        ["--config-file", KD_CONFIG, *kd_opts(tiny_teacher, out), "SOLVER.CHECKPOINT_PERIOD", "2"],
        datasets_root,
    )
    # The kd loggers reach log.txt, and the console once (rank 0), as detectron2's do.
    teacher_line = f"Teacher GeneralizedRCNN loaded from {tiny_teacher[1]}"
    assert teacher_line in (out / "log.txt").read_text()
    assert (first.stdout + first.stderr).count(teacher_line) == 1
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}
    assert (out / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_kd_chen2017_hint" in m for m in metrics)
    # Resume with a longer schedule: training continues after the last iteration, not from 0.
    proc = run_train_net(
        [
            "--config-file",
            KD_CONFIG,
            "--resume",
            *kd_opts(tiny_teacher, out),
            "SOLVER.MAX_ITER",
            "4",
            "DATASETS.TEST",
            "()",
        ],
        datasets_root,
    )
    assert "Starting training from iteration 3" in proc.stdout + proc.stderr
    # --eval-only on the distiller's checkpoint evaluates the student.
    run_train_net(
        [
            "--config-file",
            KD_CONFIG,
            "--eval-only",
            *kd_opts(tiny_teacher, out),
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
        ],
        datasets_root,
    )


def test_resume_equals_uninterrupted(datasets_root, tiny_teacher, tmp_path):
    assert_resume_equals_uninterrupted(
        KD_CONFIG, lambda out: kd_opts(tiny_teacher, out), datasets_root, tmp_path
    )


def test_two_cpu_processes_end_with_identical_students(datasets_root, tiny_teacher, tmp_path):
    """--num-gpus 2 on CPU: both ranks end with the same student, parameters *and* buffers (the
    BatchNorm statistics each rank accumulates from its own images are made equal before the
    final checkpoint and evaluation)."""
    out = tmp_path / "ddp"
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore")
    # One thread per process: two processes with two threads each on 2 cores thrash.
    env["OMP_NUM_THREADS"] = "1"
    argv = ["--num-gpus", "2", "--config-file", KD_CONFIG, *kd_opts(tiny_teacher, out)]
    argv += ["DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "4"]
    code = (
        "import sys; sys.path.insert(0, 'tests'); from dist_worker import main; "
        f"sys.exit(main({str(out)!r}, {argv!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_ranks_identical(out, world_size=2, local_size=2)


@pytest.mark.parametrize(
    "case", ["missing", "unreadable", "wrong_architecture", "kd_checkpoint", "empty"]
)
def test_bad_teacher_weights_are_refused(datasets_root, tiny_teacher, tmp_path, case):
    from detectron2.modeling import build_model

    from kd.teacher import TeacherError

    config, weights = tiny_teacher
    bad = tmp_path / "bad.pth"
    if case == "missing":
        bad = tmp_path / "nowhere.pth"
        expect = "does not exist"
    elif case == "unreadable":
        bad.write_bytes(b"this is not a checkpoint")
        expect = "not a readable checkpoint"
    elif case == "wrong_architecture":
        # A student-sized model's weights for the (wider) teacher: shapes do not fit.
        student = build_model(build_cfg(STUDENT_CONFIG, TINY_RCNN_OPTS))
        torch.save({"model": student.state_dict()}, bad)
        expect = "does not fit the teacher"
    elif case == "kd_checkpoint":
        state = torch.load(weights, weights_only=True)["model"]
        torch.save({"model": {f"student.{k}": v for k, v in state.items()}}, bad)
        expect = "extract_student"
    else:
        bad = ""
        expect = "KD.TEACHER.WEIGHTS is empty"
    opts = [*kd_opts(tiny_teacher, tmp_path), "KD.TEACHER.WEIGHTS", str(bad)]
    with pytest.raises(TeacherError, match=expect):
        build_model(build_cfg(KD_CONFIG, opts))


def test_bad_teacher_stops_train_net_with_a_message(datasets_root, tiny_teacher, tmp_path):
    opts = [*kd_opts(tiny_teacher, tmp_path), "KD.TEACHER.WEIGHTS", str(tmp_path / "none.pth")]
    proc = run_train_net(["--config-file", KD_CONFIG, *opts], datasets_root, check=False)
    assert proc.returncode != 0
    # Once on the console, as the one line that ends the run; no traceback.
    assert (proc.stderr + proc.stdout).count("train the teacher first") == 1
    assert [line for line in proc.stderr.splitlines() if "train the teacher first" in line][
        0
    ].startswith("error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "train the teacher first" in (tmp_path / "log.txt").read_text()


def test_class_count_mismatch_is_refused(datasets_root, tiny_teacher, tmp_path):
    from detectron2.modeling import build_model

    from kd.teacher import TeacherError

    opts = [*kd_opts(tiny_teacher, tmp_path), "MODEL.ROI_HEADS.NUM_CLASSES", "5"]
    with pytest.raises(TeacherError, match="class-count mismatch"):
        build_model(build_cfg(KD_CONFIG, opts))


def test_missing_teacher_config_is_refused(datasets_root, tiny_teacher, tmp_path):
    from detectron2.modeling import build_model

    from kd.teacher import TeacherError

    opts = [*kd_opts(tiny_teacher, tmp_path), "KD.TEACHER.CONFIG_FILE", "configs/nope.yaml"]
    with pytest.raises(TeacherError, match="does not exist"):
        build_model(build_cfg(KD_CONFIG, opts))


def test_exported_student_is_the_same_detector(datasets_root, tiny_teacher, tmp_path):
    """extract_student's file, loaded in a plain detectron2 model, predicts exactly the same."""
    out = tmp_path / "kd"
    run_train_net(["--config-file", KD_CONFIG, *kd_opts(tiny_teacher, out)], datasets_root)
    exported = tmp_path / "student.pth"
    # With the KD config file alone the tiny overrides are missing: the weights do not fit.
    wrong = subprocess.run(
        [
            sys.executable,
            "tools/extract_student.py",
            "--config-file",
            KD_CONFIG,
            "--input",
            str(out / "model_final.pth"),
            "--output",
            str(tmp_path / "wrong.pth"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert wrong.returncode != 0 and "does not fit the config" in wrong.stderr
    subprocess.run(
        [
            sys.executable,
            "tools/extract_student.py",
            "--config-file",
            str(out / "config.yaml"),
            "--input",
            str(out / "model_final.pth"),
            "--output",
            str(exported),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    # Plain detectron2, no kd import, reading the exported config: the same AP.
    code = (
        "import json, sys\n"
        "from detectron2.config import get_cfg\n"
        "from detectron2.modeling import build_model\n"
        "from detectron2.checkpoint import DetectionCheckpointer\n"
        "from detectron2.data.datasets import register_coco_instances\n"
        "from detectron2.evaluation import COCOEvaluator, inference_on_dataset\n"
        "from detectron2.data import build_detection_test_loader\n"
        "root = sys.argv[3]\n"
        "register_coco_instances('plain_val', {}, f'{root}/kdtest/annotations/instances_val.json',"
        " f'{root}/kdtest/val')\n"
        "cfg = get_cfg(); cfg.merge_from_file(sys.argv[1])\n"
        "assert cfg.MODEL.WEIGHTS == sys.argv[2], cfg.MODEL.WEIGHTS  # the yaml names its .pth\n"
        "model = build_model(cfg); DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)\n"
        "ev = COCOEvaluator('plain_val', output_dir=None, use_fast_impl=False)\n"
        "res = inference_on_dataset(model, build_detection_test_loader(cfg, 'plain_val'), ev)\n"
        "print('RESULT', json.dumps(res['bbox']))\n"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "student.yaml"),
            str(exported),
            str(datasets_root),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.split("RESULT", 1)[1])
    distilled = json.loads((out / "eval_results.json").read_text())["bbox"]
    for k in ("AP", "AP50", "AP75"):
        assert plain[k] == pytest.approx(distilled[k], abs=1e-9) or (
            plain[k] != plain[k] and distilled[k] != distilled[k]  # both NaN: no detections
        )
    # Stronger than equal AP: identical predictions on an image.
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    kd_model = build_model(build_cfg(KD_CONFIG, kd_opts(tiny_teacher, out)))
    DetectionCheckpointer(kd_model).load(str(out / "model_final.pth"))
    student = build_model(build_cfg(str(tmp_path / "student.yaml"), []))
    DetectionCheckpointer(student).load(str(exported))
    kd_model.eval()
    student.eval()
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a = kd_model([{"image": image}])[0]["instances"]
        b = student([{"image": image}])[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)


def test_student_initialised_from_plain_checkpoint_and_pkl(datasets_root, tiny_teacher, tmp_path):
    """MODEL.WEIGHTS goes into the student (no 'student.' prefix needed), .pth and .pkl alike."""
    import pickle

    from detectron2.modeling import build_model

    from kd.checkpoint import load_weights

    donor = build_model(build_cfg(STUDENT_CONFIG, [*TINY_RCNN_OPTS, "SEED", "99"]))
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(1.0)  # unmistakably different from a fresh init
    pth = tmp_path / "plain.pth"
    torch.save({"model": donor.state_dict()}, pth)
    # An ImageNet-style .pkl holds only backbone weights, as numpy arrays.
    pkl = tmp_path / "backbone.pkl"
    backbone = {k: v.numpy() for k, v in donor.state_dict().items() if "bottom_up" in k}
    with open(pkl, "wb") as f:
        pickle.dump({"model": backbone, "__author__": "test"}, f)

    cfg = build_cfg(KD_CONFIG, kd_opts(tiny_teacher, tmp_path))
    for path, keys in ((pth, donor.state_dict().keys()), (pkl, backbone.keys())):
        model = build_model(cfg)
        load_weights(model, str(path), complete=False)
        got = model.student.state_dict()
        for k in keys:
            assert torch.equal(got[k], donor.state_dict()[k]), (path, k)
    # A distiller's own checkpoint (student.* and adapters) goes into the distiller.
    trained = build_model(cfg)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(2.0)
    kd_ckpt = tmp_path / "kd.pth"
    torch.save({"model": trained.state_dict()}, kd_ckpt)
    fresh = build_model(cfg)
    load_weights(fresh, str(kd_ckpt), complete=True)
    for k, v in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
