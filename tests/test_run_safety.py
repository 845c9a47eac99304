"""What careless and hostile users do to a run (issue 26): a shared or unwritable OUTPUT_DIR,
config files that would run code, a changed model or teacher on --resume, a full disk, a URL that
never answers, restrictive file modes, rotated JPEGs, and detectron2 used without ``kd``."""

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RCNN_OPTS, run_train_net
from PIL import Image
from torch import nn

STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"


pytestmark = pytest.mark.usefixtures("rng_left_as_found")


def _error_lines(proc: subprocess.CompletedProcess) -> list:
    return [line for line in proc.stderr.splitlines() if "error" in line.lower()]


# ----------------------------------------------------------------------------- OUTPUT_DIR


def test_a_live_runs_lock_refuses_and_a_dead_ones_is_taken_over(tmp_path):
    from kd.run_dir import RUN_LOCK_FILE, RunLocked, process_start_time, run_lock

    lock = tmp_path / RUN_LOCK_FILE
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_time(live.pid)
        lock.write_text(f"{live.pid} {start} {socket.gethostname()}")
        with pytest.raises(RunLocked, match=rf"another run \(pid {live.pid}\) is using"):
            with run_lock(str(tmp_path)):
                pass
        # The same pid with another start time is another process (a pid reused): stale.
        lock.write_text(f"{live.pid} 1 {socket.gethostname()}")
        with run_lock(str(tmp_path)):
            assert lock.read_text().split()[0] == str(os.getpid())
    finally:
        live.kill()
        live.wait()
    lock.write_text(f"{live.pid} {start} {socket.gethostname()}")  # its process is gone now
    with run_lock(str(tmp_path)):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def _tiny(out, *more) -> list:
    return [
        "--config-file", STUDENT_CONFIG, *more, *TINY_RCNN_OPTS,
        "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out),
    ]  # fmt: skip


def test_output_dir_that_cannot_be_written_or_is_in_use_is_one_line(datasets_root, tmp_path):
    # Under a regular file (root ignores permission bits, so a read-only folder would not do).
    (tmp_path / "file").write_text("")
    proc = run_train_net(_tiny(tmp_path / "file" / "run"), datasets_root, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert _error_lines(proc) == [
        f"error: OUTPUT_DIR '{tmp_path / 'file' / 'run'}' cannot be written (Not a directory): "
        "choose a folder you can write to, e.g. OUTPUT_DIR ./output/<run>"
    ]
    # Another live run holds the folder: this one stops before writing anything into it.
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; sys.path.insert(0, 'projects'); from kd.run_dir import run_lock\n"
            f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(120)",
        ],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_train_net(_tiny(out), datasets_root, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(_error_lines(proc)) == 1
    assert f"another run (pid {holder.pid}) is using {out}" in proc.stderr
    assert not (out / "config.yaml").exists()


def test_resume_says_what_it_finds_and_files_keep_the_umask(datasets_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".model_0000000.pth.k1ll3d.tmp"  # a process killed while saving left it
    stale.write_bytes(b"partial")
    previous = os.umask(0o022)
    try:
        first = run_train_net(_tiny(out, "--resume"), datasets_root)
    finally:
        os.umask(previous)
    said = first.stdout + first.stderr
    assert said.count(f"--resume: no checkpoint in {out}, starting from iteration 0") == 1
    assert not stale.exists()
    for name in ("model_final.pth", "last_checkpoint"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    # The model changed since: said before training, and the checkpoint is refused in one line.
    changed = run_train_net(
        _tiny(out, "--resume") + ["MODEL.ROI_BOX_HEAD.FC_DIM", "32", "SOLVER.MAX_ITER", "2"],
        datasets_root,
        check=False,
    )
    assert changed.returncode == 1
    said = changed.stdout + changed.stderr
    assert "--resume with another model than the run in" in said
    assert "MODEL.ROI_BOX_HEAD.FC_DIM 64 -> 32" in said
    errors = _error_lines(changed)
    assert len(errors) == 1 and "does not fit the model built from the config" in errors[0]
    assert "Traceback" not in changed.stderr


def test_batch_that_does_not_split_over_the_processes_is_refused_before_they_start():
    import train_net
    from kd.config import ConfigError

    args = argparse.Namespace(
        config_file=str(REPO / STUDENT_CONFIG),
        opts=["SOLVER.IMS_PER_BATCH", "3"],
        num_gpus=2,
        num_machines=1,
        eval_only=False,
    )
    with pytest.raises(ConfigError, match="IMS_PER_BATCH 3 does not split over 2 processes"):
        train_net.check_args(args)
    args.opts = ["SOLVER.IMS_PER_BATCH", "4"]
    train_net.check_args(args)


# ----------------------------------------------------------------------------- configs are data


def _tagged(tmp_path: Path, name: str, body: str) -> Path:
    marker = tmp_path / f"{name}.ran"
    path = tmp_path / f"{name}.yaml"
    path.write_text(body.replace("CMD", f'!!python/object/apply:os.system ["touch {marker}"]'))
    return path


def test_yaml_configs_with_python_tags_are_refused_without_running(tmp_path):
    from detectron2.config import get_cfg

    from kd.config import ConfigError, add_kd_config, load_config
    from kd.teacher import TeacherError, load_teacher_config

    base = _tagged(
        tmp_path, "base", f'_BASE_: "{REPO / STUDENT_CONFIG}"\nSOLVER:\n  BASE_LR: CMD\n'
    )
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{base}"\nSEED: 3\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(base))
    assert str(e.value).startswith(f"refusing to read --config-file '{base}': {base}, line 3 has")
    assert "!!python/object/apply:os.system" in str(e.value)
    with pytest.raises(ConfigError, match=f"'{child}': {base}, line 3"):
        load_config(str(child))  # the tag is in a _BASE_ file: that file is named
    lazy = _tagged(tmp_path, "lazy", "model: CMD\n")  # a LazyConfig-style YAML
    for teacher_config, error in ((base, ConfigError), (lazy, TeacherError)):
        cfg = get_cfg()
        add_kd_config(cfg)
        cfg.KD.TEACHER.CONFIG_FILE = str(teacher_config)
        with pytest.raises(error, match="refusing to read KD.TEACHER.CONFIG_FILE"):
            load_teacher_config(cfg)
    assert not list(tmp_path.glob("*.ran")), "a config file ran code"


# ----------------------------------------------------------------------------- the teacher


def test_teacher_ap_cache_is_keyed_by_content(tmp_path):
    from detectron2.config import get_cfg

    from kd.config import add_kd_config
    from kd.teacher_eval import _cache_key

    weights, config = tmp_path / "teacher.pth", tmp_path / "teacher.yaml"
    weights.write_bytes(b"A" * 1000)
    config.write_text("MODEL: {}\n")
    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.KD.TEACHER.WEIGHTS, cfg.KD.TEACHER.CONFIG_FILE = str(weights), str(config)
    before = _cache_key(cfg, "kdtest_val")
    # Another teacher of the same size, its modification time kept (cp -p, rsync -a, tar).
    st = weights.stat()
    weights.write_bytes(b"B" * 1000)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert _cache_key(cfg, "kdtest_val") != before


def test_teacher_without_predictions_fails_the_min_ap_gate():
    from detectron2.config import get_cfg

    from kd.config import add_kd_config
    from kd.teacher import TeacherError
    from kd.teacher_eval import TeacherEvalHook

    cfg = get_cfg()
    add_kd_config(cfg)
    # COCOEvaluator's AP when the model predicted no box at all.
    with pytest.raises(TeacherError, match="box AP on kdtest_val is 0.00, below KD.TEACHER"):
        TeacherEvalHook._gate(cfg, "kdtest_val", float("nan"))
    cfg.KD.TEACHER.MIN_AP = 0.0
    TeacherEvalHook._gate(cfg, "kdtest_val", float("nan"))


# ----------------------------------------------------------------------------- files written


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_are_written_with_the_umask(tmp_path, umask, mode):
    from kd.weights import atomic_write

    previous = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "f"), lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "f").stat().st_mode & 0o777 == mode


def test_a_failed_save_names_the_os_error_and_keeps_the_last_checkpoint(tmp_path):
    """A full disk: torch.save alone says "[enforce fail at inline_container.cc] unexpected pos".
    A file-size limit gives the same failure with EFBIG, without filling a disk."""
    from kd.weights import KDCheckpointer

    checkpointer = KDCheckpointer(nn.Linear(256, 256), save_dir=str(tmp_path))  # 257 kB
    checkpointer.save("model_0000000")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OSError) as e:
            checkpointer.save("model_0000001")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(e.value).startswith(
        f"[Errno 27] cannot write {tmp_path / 'model_0000001.pth'}: File too large (EFBIG)"
    )
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000000.pth"]


def test_a_url_that_never_answers_times_out_with_one_line(tmp_path, monkeypatch):
    from kd.checkpoint import WeightsError, load_weights

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    connections = []
    threading.Thread(target=lambda: connections.append(server.accept()), daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/silent/model.pth"
    monkeypatch.setenv("KD_DOWNLOAD_TIMEOUT", "2")
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    outcome = []

    def fetch():
        try:
            load_weights(nn.Linear(2, 2), url, complete=False)
        except Exception as e:  # noqa: BLE001 (what it raised is checked below)
            outcome.append(e)

    start = time.time()
    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout=30)  # before the fix: it hangs for ever
    try:
        assert not worker.is_alive(), "the download did not time out"
        assert connections, "the download never reached the server"
        assert time.time() - start < 20
        assert len(outcome) == 1 and isinstance(outcome[0], WeightsError)
        assert str(outcome[0]).startswith(f"MODEL.WEIGHTS '{url}': the server sent nothing for 2 s")
        assert "\n" not in str(outcome[0])
    finally:
        for conn, _ in connections:
            conn.close()
        server.close()


# ----------------------------------------------------------------------------- EXIF orientation


def _rotated_jpeg(path: Path) -> tuple:
    """A 64x48 JPEG stored unrotated, with EXIF orientation 6 (shown turned 90 degrees
    clockwise, 48x64), a white block at stored (10, 5)-(30, 15); returns that box."""
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[5:15, 10:30] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return [10.0, 5.0, 30.0, 15.0]


def _voc(root: Path, size, box) -> None:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Main/train.txt").write_text("a\n")
    x1, y1, x2, y2 = box
    (root / "Annotations/a.xml").write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"
        f"<object><name>block</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>"
    )


def test_exif_rotated_images_are_sized_and_boxed_as_detectron2_reads_them(tmp_path):
    from detectron2.data.detection_utils import check_image_size, read_image

    from kd.data.voc import VOCFormatError, load_voc_instances

    stored_box = _rotated_jpeg(tmp_path / "image.jpg")
    for case, size, box in (
        ("stored", (64, 48), stored_box),  # a labelling tool that ignores EXIF
        ("displayed", (48, 64), [33.0, 10.0, 43.0, 30.0]),  # one that applies it
    ):
        root = tmp_path / case
        _voc(root, size, box)
        os.replace(tmp_path / "image.jpg", root / "JPEGImages/a.jpg")
        (record,) = load_voc_instances(str(root), "train", ["block"])
        image = read_image(record["file_name"], format="RGB")  # EXIF applied, as in training
        check_image_size(record, image)  # "Mismatched image shape" before the fix
        assert (record["width"], record["height"]) == (48, 64) == image.shape[1::-1]
        x1, y1, x2, y2 = (int(round(v)) for v in record["annotations"][0]["bbox"])
        assert (x1, y1, x2, y2) == (33, 10, 43, 30), case
        inside = image[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean()
        outside = np.concatenate([image[:, : x1 - 2].ravel(), image[:, x2 + 2 :].ravel()]).mean()
        assert inside > 200 and outside < 30, case
        os.replace(root / "JPEGImages/a.jpg", tmp_path / "image.jpg")
    _voc(tmp_path / "other", (50, 50), stored_box)
    os.replace(tmp_path / "image.jpg", tmp_path / "other/JPEGImages/a.jpg")
    with pytest.raises(VOCFormatError, match=r"says 50x50 but .* is 48x64 \(stored 64x48"):
        load_voc_instances(str(tmp_path / "other"), "train", ["block"])


# ----------------------------------------------------------------------------- detectron2 alone


def test_plain_detectron2_gets_the_map_dataset_fix():
    """A script that imports detectron2 alone, in the project's environment (the .pth file that
    ``make setup`` writes loads kd.compat's import hook at interpreter start)."""
    code = (
        "import sys\n"
        "from detectron2.data.common import MapDataset\n"
        "assert 'kd' not in sys.modules, 'kd was imported'\n"
        "dataset = MapDataset(list(range(4)), lambda x: None if x == 1 else x)\n"
        "print(dataset[1])\n"
    )
    python = REPO / ".venv" / "bin" / "python"
    proc = subprocess.run(
        [str(python if python.exists() else sys.executable), "-c", code],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() in {"0", "2", "3"}
