"""Shipping a student: tools/extract_student.py, tools/predict.py and tools/export_student.py on a
configs/bccd (MobileNetV2) KD checkpoint, and ONNX / TorchScript export of every student family,
compared with the PyTorch model by ONNX Runtime and ``torch.jit.load`` here, on tiny random models.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_DETR_OPTS, TINY_RCNN_OPTS, build_cfg, load_script
from PIL import Image

BCCD = REPO.parent / "shared" / "data" / "bccd"
needs_bccd = pytest.mark.skipif(
    not (BCCD / "JPEGImages").is_dir(), reason=f"BCCD is not at {BCCD} (../shared/data/bccd)"
)
BCCD_IMAGES = ["BloodImage_00000", "BloodImage_00001"]
NO_IMAGENET = ["MODEL.MOBILENET.IMAGENET_WEIGHTS", ""]
ATOL = 1e-3

# Tiny students of every family on both backbones; thresholds at 0 so that the untrained models
# detect something (RetinaNet's and FCOS's prior probability 0.01 is below their 0.05).
# fmt: off
TINY_DENSE = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
]
# configs/bccd students (MobileNetV2) on a quarter of BCCD's 640x480, for speed.
SMALL_BCCD = [*NO_IMAGENET, "INPUT.MIN_SIZE_TEST", "120", "INPUT.MAX_SIZE_TEST", "160"]
STUDENTS = {
    "kd_shapes/faster_rcnn": [*TINY_RCNN_OPTS, "INPUT.MAX_SIZE_TEST", "96"],
    "kd_shapes/retinanet": [*TINY_DENSE, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"],
    "kd_shapes/fcos": [*TINY_DENSE, "MODEL.FCOS.TEST_SCORE_THRESH", "0.0"],
    "kd_shapes/detr": [*TINY_DETR_OPTS, "MODEL.DETR.DEC_LAYERS", "2",
                       "MODEL.DETR.NUM_QUERIES", "8", "INPUT.MAX_SIZE_TEST", "96"],
    "bccd/faster_rcnn": [*SMALL_BCCD],
    "bccd/retinanet": [*SMALL_BCCD, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
                       "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "100"],
    "bccd/fcos": [*SMALL_BCCD, "MODEL.FCOS.TEST_SCORE_THRESH", "0.0",
                  "MODEL.FCOS.TOPK_CANDIDATES_TEST", "100"],
    "bccd/detr": [*SMALL_BCCD, "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2"],
}
# fmt: on


@pytest.fixture(scope="module")
def tools():
    return {
        name: load_script(f"tools/{name}.py")
        for name in ("extract_student", "predict", "export_student")
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two 640x480 images: BCCD's own when present, else random pixels."""
    folder = tmp_path_factory.mktemp("export_images")
    rng = np.random.default_rng(0)
    for name in BCCD_IMAGES:
        src = BCCD / "JPEGImages" / f"{name}.jpg"
        if src.is_file():
            shutil.copy(src, folder / src.name)
        else:
            pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}.jpg", quality=95)
    return folder


def _save_model(out: Path, config: str, opts, seed: int = 0):
    """(config file, weights) of a freshly built model of ``config``."""
    from detectron2.modeling import build_model

    cfg = build_cfg(config, opts)
    torch.manual_seed(seed)
    model = build_model(cfg)
    if hasattr(model, "roi_heads"):  # std 0.01 makes every class score 1/(K+1) to 1e-4: spread
        torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, out / "model.pth")
    (out / "config.yaml").write_text(cfg.dump())
    return str(out / "config.yaml"), str(out / "model.pth")


def _pytorch_detections(config: str, weights: str, image_file: Path):
    """(boxes, scores, classes) of the model on one image, computed here: read and resized as
    detectron2's DefaultPredictor does, Faster R-CNN without postprocessing (its boxes are in the
    resized image), the others through ``forward``; and the resized image."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import GeneralizedRCNN, build_model

    from kd.config import add_kd_config

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_file(config)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    image = read_image(str(image_file), format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    tensor = torch.as_tensor(aug.get_transform(image).apply_image(image).astype("float32"))
    tensor = tensor.permute(2, 0, 1)
    with torch.no_grad():
        if isinstance(model, GeneralizedRCNN):
            out = model.inference([{"image": tensor}], do_postprocess=False)[0]
        else:
            out = model([{"image": tensor}])[0]["instances"]
    return (out.pred_boxes.tensor.numpy(), out.scores.numpy(), out.pred_classes.numpy()), tensor


def _assert_same(expected, got, what: str) -> None:
    """Equal detections up to their order (scores that tie may sort either way): an optimal
    one-to-one assignment pairs every detection with one of its class within ATOL."""
    from scipy.optimize import linear_sum_assignment

    boxes, scores, classes = (np.asarray(t) for t in got)
    assert len(boxes) == len(expected[0]) > 0, what
    cost = np.maximum(
        np.abs(expected[0][:, None, :] - boxes[None, :, :]).max(axis=2),
        np.abs(expected[1][:, None] - scores[None, :]),
    )
    cost[expected[2][:, None] != classes[None, :]] = 1e6
    rows, cols = linear_sum_assignment(cost)
    # Scores tying (to 1e-6) with the lowest kept one may be swapped at the top-k cut: any
    # number may tie there (3 did on the synthetic images, an untrained RetinaNet), but not so
    # many that the comparison would excuse most detections.
    at_cut = expected[1][rows] - min(expected[1].min(), scores.min()) <= 1e-6
    assert at_cut.sum() < len(rows) / 2, what
    assert cost[rows, cols][~at_cut].max() <= ATOL, f"{what}: {cost[rows, cols].max()}"


@pytest.mark.parametrize("student", sorted(STUDENTS))
def test_export_equals_pytorch_in_onnxruntime_and_torchscript(
    student, tools, images, tmp_path, one_thread
):
    """Each family, each backbone: the ONNX file in ONNX Runtime and the TorchScript file give the
    PyTorch model's boxes, scores and classes on two 640x480 images (BCCD's where present)."""
    import onnxruntime as ort

    config, weights = _save_model(
        tmp_path / "model", f"configs/{student}_student.yaml", STUDENTS[student]
    )
    out = tmp_path / "export"
    argv = ["--config-file", config, "--weights", weights, "--output", str(out)]
    record = tools["export_student"].run(
        tools["export_student"].parse_args([*argv, "--check", str(images)])
    )
    assert record["check"]["images"] == 2 and record["check"]["detections"] > 0
    assert not any(w["failed"] for w in record["check"]["runtimes"].values())
    assert json.loads((out / "export.json").read_text())["outputs"] == [
        "boxes",
        "scores",
        "classes",
    ]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(out / "model.ts"))
    for image_file in sorted(images.iterdir()):
        expected, tensor = _pytorch_detections(config, weights, image_file)
        assert list(tensor.shape) == record["input"]["shape"]
        onnx_out = session.run(["boxes", "scores", "classes"], {"image": tensor.numpy()})
        _assert_same(expected, onnx_out, f"{student} onnxruntime {image_file.name}")
        with torch.no_grad():
            ts_out = [t.numpy() for t in scripted(tensor)]
        _assert_same(expected, ts_out, f"{student} torchscript {image_file.name}")


def test_check_flags_a_model_that_differs(tools, images, tmp_path, one_thread):
    """--check compares for real: a model whose box classifier changed after export differs from
    the files; an image of another size than the traced one is refused."""
    export = tools["export_student"]
    opts = STUDENTS["kd_shapes/faster_rcnn"]
    config, weights = _save_model(
        tmp_path / "model", "configs/kd_shapes/faster_rcnn_student.yaml", opts
    )
    argv = ["--config-file", config, "--weights", weights, "--output", str(tmp_path / "export")]
    record = export.run(export.parse_args([*argv, "--check", str(images)]))
    cfg, model, aug = export.load_model(config, weights, [])
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] += 1.0
    files = sorted(str(p) for p in images.iterdir())
    result = export.check(record, model, cfg, aug, files, ATOL)
    assert all(len(w["failed"]) == 2 for w in result["runtimes"].values())
    small = tmp_path / "small.png"
    Image.new("RGB", (320, 320)).save(small)
    with pytest.raises(export.InputError, match="resizes to"):
        export.check(record, model, cfg, aug, [str(small)], ATOL)


def test_compare_counts_classes_and_tolerance():
    compare = load_script("tools/export_student.py").compare
    boxes = np.array([[0, 0, 10, 10], [5, 5, 8, 9], [20, 20, 30, 40]], dtype=np.float32)
    ref = (boxes, np.array([0.9, 0.5, 0.2], dtype=np.float32), np.array([1, 2, 0]))
    assert compare(ref, ref, 1e-3)["ok"] == 1.0
    moved = (boxes + np.float32(0.01), ref[1], ref[2])
    # The two above the lowest score have no pair; the lowest is excused (see the tie below).
    assert compare(ref, moved, 1e-3)["unpaired"] == 2.0
    assert compare(ref, moved, 0.02)["box_diff"] == pytest.approx(0.01, abs=1e-5)
    result = compare(ref, (boxes, ref[1], np.array([1, 0, 0])), 1e-3)
    assert result["ok"] == 0.0 and result["unpaired"] == 1.0
    assert compare(ref, tuple(t[:2] for t in ref), 1e-3)["same_count"] == 0.0
    # Order does not matter; the detection with the lowest score may be another one.
    assert compare(ref, tuple(t[::-1] for t in ref), 1e-3)["ok"] == 1.0
    other_at_cut = (np.concatenate([boxes[:2], [[50, 50, 60, 60]]]), ref[1], ref[2])
    assert compare(ref, other_at_cut, 1e-3)["ok"] == 1.0


@needs_bccd
def test_bccd_kd_checkpoint_extracts_predicts_and_exports(tools, images, tmp_path, one_thread):
    """Issue 25 finding 6: a configs/bccd KD checkpoint (MobileNetV2 student, the README's Faster
    R-CNN GID run) goes through extract_student, predict and export_student; the student's config
    keeps MODEL.MOBILENET and says that `import kd` must register its backbone."""
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    from kd.config import add_kd_config

    teacher_config, teacher_weights = _save_model(
        tmp_path / "teacher", "configs/bccd/faster_rcnn_teacher.yaml", NO_IMAGENET
    )
    kd_opts = [*NO_IMAGENET, "KD.TEACHER.CONFIG_FILE", teacher_config]
    kd_opts += ["KD.TEACHER.WEIGHTS", teacher_weights]
    cfg = build_cfg("configs/bccd/faster_rcnn_kd_gid.yaml", kd_opts)
    torch.manual_seed(1)
    distiller = build_model(cfg)
    kd_config, kd_weights = tmp_path / "kd.yaml", tmp_path / "kd.pth"
    kd_config.write_text(cfg.dump())
    torch.save({"model": distiller.state_dict()}, kd_weights)
    assert any(k.startswith("gid.") for k in distiller.state_dict())  # adapters, left out

    student_pth = tmp_path / "student" / "student.pth"
    tools["extract_student"].main(
        ["--config-file", str(kd_config), "--input", str(kd_weights), "--output", str(student_pth)]
    )
    student_yaml = student_pth.with_suffix(".yaml")
    text = student_yaml.read_text()
    assert text.startswith("# This model uses what the kd package registers")
    assert "MODEL.BACKBONE.NAME build_mobilenetv2_fpn_backbone" in text.splitlines()[0]
    assert "`import kd`" in text
    with pytest.raises(KeyError, match="Non-existent config key"):  # why the comment says so
        get_cfg().merge_from_file(str(student_yaml))
    scfg = get_cfg()
    add_kd_config(scfg)
    scfg.merge_from_file(str(student_yaml))
    assert scfg.MODEL.WEIGHTS == str(student_pth) and scfg.MODEL.MOBILENET.IMAGENET_WEIGHTS == ""
    assert scfg.MODEL.MOBILENET.NORM == "FrozenBN" and "\nKD:" not in text  # KD keys left out

    # predict.py on the KD checkpoint and on the extracted student: the same detections, equal
    # to detectron2's DefaultPredictor with the student's config (its weights from MODEL.WEIGHTS).
    image = sorted(images.iterdir())[0]
    detections = []
    for config, weights in ((kd_config, kd_weights), (student_yaml, student_pth)):
        out = tmp_path / f"predict_{config.stem}"
        argv = ["--config-file", str(config), "--weights", str(weights), "--input", str(image)]
        tools["predict"].main([*argv, "--output", str(out), "--score-threshold", "0"])
        detections.append(json.loads((out / "detections.json").read_text()))
    assert detections[0] == detections[1] and len(detections[0]) > 0
    import cv2

    reference = DefaultPredictor(scfg)(cv2.imread(str(image)))["instances"]
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in detections[1])])
    np.testing.assert_allclose(xyxy, reference.pred_boxes.tensor.numpy(), atol=1e-3)
    np.testing.assert_allclose(
        [d["score"] for d in detections[1]], reference.scores.numpy(), atol=1e-6
    )

    # export_student.py on the KD checkpoint: the student alone, equal in ONNX Runtime.
    export = tools["export_student"]
    argv = ["--config-file", str(kd_config), "--weights", str(kd_weights)]
    argv += ["--output", str(tmp_path / "export"), "--check", str(images)]
    record = export.run(export.parse_args(argv))
    assert record["meta_architecture"] == "GeneralizedRCNN"
    assert record["backbone"] == "build_mobilenetv2_fpn_backbone"
    assert record["input"]["shape"] == [3, 240, 320]
    assert not any(w["failed"] for w in record["check"]["runtimes"].values())


def test_config_options_after_check_images_are_options(tools, images):
    """``--check IMAGES KEY VALUE``: the options are not taken for image paths."""
    args = tools["export_student"].parse_args(
        ["--config-file", "c.yaml", "--output", "o", "--check", str(images)]
        + ["MODEL.MOBILENET.IMAGENET_WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "120"]
    )
    assert args.check == [str(images)]
    assert args.opts == ["MODEL.MOBILENET.IMAGENET_WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "120"]


def test_check_that_compared_nothing_fails(tools, images, tmp_path, one_thread):
    """An untrained RetinaNet detects nothing at its 0.05 threshold: --check must not pass."""
    opts = [
        o
        for o in STUDENTS["kd_shapes/retinanet"]
        if o not in ("MODEL.RETINANET.SCORE_THRESH_TEST", "0.0")
    ]
    config, weights = _save_model(
        tmp_path / "model", "configs/kd_shapes/retinanet_student.yaml", opts
    )
    argv = ["--config-file", config, "--weights", weights, "--output", str(tmp_path / "export")]
    with pytest.raises(SystemExit, match="compared nothing"):
        tools["export_student"].main([*argv, "--format", "onnx", "--check", str(images)])
