"""tools/predict.py: pictures and COCO-style detections of a detector, a student or a distiller's
student, checked against detectron2's own ``DefaultPredictor`` on the same images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_DATASET, TINY_RCNN_OPTS, build_cfg, load_script
from PIL import Image

STUDENT = "configs/kd_shapes/faster_rcnn_student.yaml"
KD_CONFIG = "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml"
# Four proposals per image keep the pictures readable; each gives one box per class.
OPTS = [*TINY_RCNN_OPTS, "MODEL.RPN.POST_NMS_TOPK_TEST", "4"]
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def predict():
    return load_script("tools/predict.py")


@pytest.fixture(scope="module")
def confident_model(tmp_path_factory, datasets_root, one_thread):
    """(config file, weights) of a tiny untrained student whose box classifier is made sure:
    every proposal scores about 0.73 for class 0 and 0.27 for class 1 (logits 4 and 3, the rest
    -4), so the 0.5 threshold keeps one class's boxes and drops the other's."""
    out = tmp_path_factory.mktemp("predict_model")
    from detectron2.modeling import build_model

    cfg = build_cfg(STUDENT, OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        bias = model.roi_heads.box_predictor.cls_score.bias
        bias.fill_(-4.0)
        bias[0], bias[1] = 4.0, 3.0
    config, weights = out / "student.yaml", out / "student.pth"
    config.write_text(cfg.dump())
    torch.save({"model": model.state_dict()}, weights)
    return str(config), str(weights)


@pytest.fixture(scope="module")
def images(tmp_path_factory, datasets_root):
    """Two validation images as they are and one resized to 96x80 and saved as JPEG (another
    size than the model's test size, so the boxes must be mapped back to it)."""
    folder = tmp_path_factory.mktemp("predict_images")
    val = sorted((datasets_root / TINY_DATASET / "val").glob("*.png"))
    paths = []
    for src in val[:2]:
        dst = folder / src.name
        dst.write_bytes(src.read_bytes())
        paths.append(dst)
    Image.open(val[2]).convert("RGB").resize((96, 80)).save(folder / "resized.jpg", quality=95)
    return folder, [*paths, folder / "resized.jpg"]


def dataset_category_ids(datasets_root: Path) -> list:
    """Contiguous class index -> the dataset's category id, read from its annotation file."""
    with open(datasets_root / TINY_DATASET / "annotations" / "instances_val.json") as f:
        return sorted(c["id"] for c in json.load(f)["categories"])


def reference_detections(config: str, weights: str, image_paths, category_ids) -> dict:
    """file name -> (all scores, records at or above the threshold), from detectron2's own
    DefaultPredictor fed BGR images decoded by PIL."""
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(build_cfg(config, ["MODEL.WEIGHTS", weights]))
    out = {}
    for path in image_paths:
        bgr = np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]
        instances = predictor(bgr)["instances"].to("cpu")
        keep = instances.scores >= THRESHOLD
        records = [
            {
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": s,
                "category_id": category_ids[c],
            }
            for (x0, y0, x1, y1), s, c in zip(
                instances.pred_boxes.tensor[keep].tolist(),
                instances.scores[keep].tolist(),
                instances.pred_classes[keep].tolist(),
            )
        ]
        out[str(path)] = (instances.scores.tolist(), records)
    return out


def assert_same_detections(written: list, expected: dict) -> None:
    by_file = {}
    for r in written:
        by_file.setdefault(r["file_name"], []).append(r)
    assert set(by_file) <= set(expected)
    for path, (_, records) in expected.items():
        got = sorted(by_file.get(path, []), key=lambda r: -r["score"])
        assert len(got) == len(records), path
        for g, e in zip(got, records):
            np.testing.assert_allclose(g["bbox"], e["bbox"], atol=1e-3)
            assert g["score"] == pytest.approx(e["score"], abs=1e-6)
            assert g["category_id"] == e["category_id"]
    image_ids = {r["file_name"]: r["image_id"] for r in written}
    assert len(set(image_ids.values())) == len(image_ids)


def assert_boxes_drawn(output: Path, image_paths, written: list) -> None:
    """Each picture has its input's size and differs from it along every written box's top
    edge (Visualizer draws the box outline there)."""
    for path in image_paths:
        original = np.asarray(Image.open(path).convert("RGB")).astype(int)
        picture_file = output / (Path(path).stem + ".png")
        assert picture_file.is_file()
        picture = np.asarray(Image.open(picture_file).convert("RGB")).astype(int)
        assert picture.shape == original.shape
        h, w = original.shape[:2]
        boxes = [r["bbox"] for r in written if r["file_name"] == str(path)]
        for x, y, bw, _ in boxes:
            row = min(max(int(round(y)), 0), h - 1)
            cols = slice(max(int(round(x)), 0), min(int(round(x + bw)), w - 1) + 1)
            changed = np.abs(picture[row, cols] - original[row, cols]).sum(axis=-1) > 0
            assert changed.mean() > 0.5, (path, (x, y, bw), changed.mean())


def test_detections_and_pictures_match_default_predictor(
    predict, confident_model, images, datasets_root, tmp_path
):
    config, weights = confident_model
    folder, paths = images
    output = tmp_path / "out"
    predict.main(["--config-file", config, "--weights", weights, "--input", str(folder),
                  "--output", str(output)])  # fmt: skip
    written = json.loads((output / "detections.json").read_text())
    expected = reference_detections(config, weights, paths, dataset_category_ids(datasets_root))
    all_scores = [s for scores, _ in expected.values() for s in scores]
    # The threshold is exercised: the model answers on both sides of it.
    assert min(all_scores) < THRESHOLD <= max(all_scores)
    assert sum(len(records) for _, records in expected.values()) >= len(paths)
    assert_same_detections(written, expected)
    assert_boxes_drawn(output, paths, written)
    assert {p.name for p in output.iterdir()} == {p.stem + ".png" for p in paths} | {
        "detections.json"
    }


def test_kd_config_with_distiller_checkpoint_runs_its_student(
    predict, confident_model, images, datasets_root, tmp_path
):
    """A KD config and a distillation checkpoint (student.* keys and an adapter) give exactly
    the detections of the plain student; the teacher is not needed (its weights do not exist)."""
    config, weights = confident_model
    _, paths = images
    student = torch.load(weights, weights_only=True)["model"]
    distiller = {f"student.{k}": v for k, v in student.items()}
    distiller["adapters.hint.weight"] = torch.ones(3, 3)
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": distiller, "iteration": 3}, checkpoint)
    output = tmp_path / "out"
    predict.main(["--config-file", str(REPO / KD_CONFIG), "--weights", str(checkpoint),
                  "--input", *map(str, paths), "--output", str(output), *OPTS,
                  "KD.TEACHER.WEIGHTS", str(tmp_path / "missing_teacher.pth")])  # fmt: skip
    written = json.loads((output / "detections.json").read_text())
    expected = reference_detections(config, weights, paths, dataset_category_ids(datasets_root))
    assert_same_detections(written, expected)
    assert_boxes_drawn(output, paths, written)


def test_class_names_from_the_test_dataset_or_the_option(predict, datasets_root):
    with open(datasets_root / TINY_DATASET / "annotations" / "instances_val.json") as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    cfg = build_cfg(STUDENT, OPTS)
    assert predict.dataset_metadata(cfg, None).thing_classes == [c["name"] for c in categories]
    names = [f"c{i}" for i in range(len(categories))]
    named = predict.dataset_metadata(cfg, names)
    assert named.thing_classes == names
    ids = sorted(c["id"] for c in categories)
    assert named.thing_dataset_id_to_contiguous_id == {i: k for k, i in enumerate(ids)}
    unregistered = build_cfg(STUDENT, [*OPTS, "DATASETS.TEST", "('nowhere_val',)"])
    assert not hasattr(predict.dataset_metadata(unregistered, None), "thing_classes")


def test_bad_input_one_line(predict, confident_model, images, tmp_path, capsys):
    config, weights = confident_model
    _, paths = images
    base = ["--config-file", config, "--weights", weights, "--output", str(tmp_path / "o")]

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            predict.main([*base, *argv])
        message = str(e.value.code)
        assert message.startswith("predict.py: error: ") and "\n" not in message
        return message

    assert "does not exist" in error("--input", str(tmp_path / "nope.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in error("--input", str(empty))
    with pytest.raises(SystemExit) as e:
        predict.main(["--config-file", config, "--weights", str(tmp_path / "no.pth"),
                      "--input", str(paths[0]), "--output", str(tmp_path / "o")])  # fmt: skip
    assert "does not exist" in str(e.value.code) and "no.pth" in str(e.value.code)

    # An unreadable image is skipped and counted; the readable one is still drawn.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "broken.png").write_bytes(b"not an image")
    (mixed / "good.png").write_bytes(paths[0].read_bytes())
    message = error("--input", str(mixed))
    assert "1 of 2 images could not be read" in message
    assert "broken.png" in capsys.readouterr().err
    assert (tmp_path / "o" / "good.png").is_file()
    assert not (tmp_path / "o" / "broken.png").exists()
    written = json.loads((tmp_path / "o" / "detections.json").read_text())
    assert {r["file_name"] for r in written} == {str(mixed / "good.png")}
