"""Dataset validation before a run (kd.data.validation): every image file and every box."""

import json
import logging
import shutil
from pathlib import Path
from typing import List

import numpy as np
import pytest
from conftest import REPO, TINY_DATASET, TINY_RCNN_OPTS, build_cfg, run_train_net
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.structures import BoxMode
from PIL import Image

from kd.data import register_folder_datasets, validate_dataset
from kd.data.validation import (
    check_dataset_dicts,
    validate_test_datasets,
    validate_test_dicts,
    validate_train_dicts,
)

STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"
SIZE = 32

# (image index, annotation id, bbox XYWH_ABS) of a 5-image, 32x32 COCO file. Image 1's file is
# missing, image 2's is empty. Bad boxes, by hand (BOX_TOLERANCE 2):
#   11: width -4 (XYWH with a negative size; detectron2's transforms would flip it into [6, 10])
#   12: x2 = 20 + 20 = 40 > 32 + 2
#   41: width 0
#   52: x1 = 40 > 34, entirely right of the image
# Good: 13 reaches 1 px left of the image, 14 to x2 = 33.5 and y2 = 33 (both within 2 px).
BOXES = [
    (0, 11, [10, 5, -4, 6]),
    (0, 12, [20, 20, 20, 5]),
    (0, 13, [-1, 0, 10, 10]),
    (0, 14, [25, 25, 8.5, 8]),
    (1, 21, [1, 1, 5, 5]),
    (2, 31, [1, 1, 5, 5]),
    (3, 41, [3, 3, 0, 5]),
    (4, 51, [2, 2, 6, 6]),
    (4, 52, [40, 4, 5, 5]),
]
NUM_IMAGES = 5


def _write_dataset(root: Path, name: str, boxes=BOXES) -> Path:
    """A COCO folder dataset ``root/name`` (train split) with the defects described above."""
    image_dir = root / name / "train"
    image_dir.mkdir(parents=True)
    for i in range(NUM_IMAGES):
        if i != 1:
            Image.new("RGB", (SIZE, SIZE)).save(image_dir / f"img{i}.png")
    (image_dir / "img2.png").write_bytes(b"")
    data = {
        "images": [
            {"id": i + 1, "file_name": f"img{i}.png", "width": SIZE, "height": SIZE}
            for i in range(NUM_IMAGES)
        ],
        "annotations": [
            {"id": ann_id, "image_id": i + 1, "category_id": 1, "bbox": box, "iscrowd": 0}
            for i, ann_id, box in boxes
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    json_path = root / name / "annotations" / "instances_train.json"
    json_path.parent.mkdir()
    json_path.write_text(json.dumps(data))
    return json_path


@pytest.fixture
def registered() -> List[str]:
    names: List[str] = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture
def bad_set(tmp_path, registered) -> Path:
    """``badset_train`` registered; returns its image folder."""
    _write_dataset(tmp_path, "badset")
    registered.extend(register_folder_datasets(str(tmp_path)))
    return tmp_path / "badset" / "train"


def _cfg(*opts: str):
    return build_cfg(STUDENT_CONFIG, ["DATASETS.TRAIN", "('badset_train',)", *opts])


def _ids(dicts) -> List[List[int]]:
    return [[a["id"] for a in d["annotations"]] for d in dicts]


def test_stop_names_each_bad_item_by_file_and_annotation_id(bad_set):
    dicts = DatasetCatalog.get("badset_train")
    with pytest.raises(ValueError) as e:
        validate_train_dicts(_cfg(), dicts)
    msg = str(e.value)
    assert msg.startswith("Dataset 'badset_train': 2 of 5 images have a missing or empty file; ")
    assert "4 of 9 annotations are bad (2 not positive in size, 2 outside the image)" in msg
    lines = msg.splitlines()
    # The first five in dataset order, each with its file and the COCO annotation id.
    f = {i: str(bad_set / f"img{i}.png") for i in range(NUM_IMAGES)}
    assert lines[1].startswith(f"  {f[0]}: annotation id 11: width -4 and height 6 ")
    assert lines[1].endswith("bbox [10, 5, -4, 6] (XYWH_ABS) = XYXY_ABS [10, 5, 6, 11]")
    assert lines[2].startswith(f"  {f[0]}: annotation id 12: box reaches beyond the 32x32 image")
    assert "BOX_TOLERANCE = 2 px" in lines[2] and lines[2].endswith("[20, 20, 40, 25]")
    assert lines[3] == f"  {f[1]}: image file is missing"
    assert lines[4] == f"  {f[2]}: image file is empty (0 bytes)"
    assert lines[5].startswith(f"  {f[3]}: annotation id 41: width 0 and height 5 ")
    assert "annotation id 13" not in msg and "annotation id 14" not in msg  # within tolerance
    assert "DATALOADER.ON_BAD_ANNOTATIONS skip" in lines[-1]


def test_skip_drops_exactly_the_bad_ones_and_logs_them(bad_set, caplog):
    dicts = DatasetCatalog.get("badset_train")
    with caplog.at_level(logging.WARNING, logger="kd.data.validation"):
        kept = validate_train_dicts(_cfg("DATALOADER.ON_BAD_ANNOTATIONS", "skip"), dicts)
    # img1, img2: no file; img3: its only box is bad, so with FILTER_EMPTY_ANNOTATIONS (True)
    # nothing is left of it; img0 keeps 13 and 14, img4 keeps 51.
    assert [Path(d["file_name"]).name for d in kept] == ["img0.png", "img4.png"]
    assert _ids(kept) == [[13, 14], [51]]
    assert _ids(dicts) == [[11, 12, 13, 14], [21], [31], [41], [51, 52]]  # not modified
    (record,) = [r for r in caplog.records if "ON_BAD_ANNOTATIONS skip" in r.getMessage()]
    text = record.getMessage()
    assert "2 of 5 images have a missing or empty file" in text
    assert "without the 4 bad annotations and 2 images, and 1 images left without" in text
    assert "(2 images left)" in text and "annotation id 52" not in text  # first 5 only
    assert "annotation id 11" in text and "img2.png: image file is empty" in text


def test_skip_keeps_emptied_images_when_empty_images_are_wanted(bad_set):
    cfg = _cfg(
        "DATALOADER.ON_BAD_ANNOTATIONS", "skip", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False"
    )
    kept = validate_train_dicts(cfg, DatasetCatalog.get("badset_train"))
    assert _ids(kept) == [[13, 14], [], [51]]


def test_skip_that_leaves_nothing_stops(tmp_path, registered):
    _write_dataset(tmp_path, "allbad", boxes=[(0, 11, [10, 5, -4, 6]), (3, 41, [3, 3, 0, 5])])
    registered.extend(register_folder_datasets(str(tmp_path)))
    cfg = build_cfg(
        STUDENT_CONFIG,
        ["DATASETS.TRAIN", "('allbad_train',)", "DATALOADER.ON_BAD_ANNOTATIONS", "skip"],
    )
    # As the trainer loads them: images without boxes (img4) are already left out.
    dicts = get_detection_dataset_dicts(["allbad_train"], filter_empty=True)
    with pytest.raises(ValueError, match="leaves no image to train on"):
        validate_train_dicts(cfg, dicts)


def test_tolerance_is_a_config_key(bad_set):
    # With 10 px, box 12 (x2 = 40 <= 42) passes; 52 (x2 = 45 > 42) and the others stay bad.
    dicts = DatasetCatalog.get("badset_train")
    report = check_dataset_dicts(dicts, box_tolerance=10.0, num_classes=2)
    bad = [dicts[r]["annotations"][i]["id"] for r, i in zip(report.bad_records, report.bad_indices)]
    assert bad == [11, 41, 52]


def test_bad_category_and_malformed_boxes_in_dicts(tmp_path, registered):
    image = tmp_path / "a.png"
    Image.new("RGB", (SIZE, SIZE)).save(image)

    def ann(category, bbox, mode=BoxMode.XYXY_ABS, **extra):
        return {"category_id": category, "bbox": bbox, "bbox_mode": mode, **extra}

    dicts = [
        {
            "file_name": str(image),
            "width": SIZE,
            "height": SIZE,
            "annotations": [
                ann(0, [1, 1, 5, 5], ann_id="A"),
                ann(2, [1, 1, 5, 5], ann_id="B"),  # 2 classes: 0 and 1
                ann(1, [1, 1, 5]),  # three numbers, no id: named by its index
                ann(1, [1, 1, float("nan"), 5]),
                ann(1, [0.1, 0.1, 0.5, 0.5], BoxMode.XYWH_REL),
                ann(1, [1, 1, 5, 5], BoxMode.XYWH_ABS),
            ],
        }
    ]
    DatasetCatalog.register("dictset_train", lambda: dicts)
    MetadataCatalog.get("dictset_train").thing_classes = ["x", "y"]
    registered.append("dictset_train")
    cfg = build_cfg(STUDENT_CONFIG, ["DATASETS.TRAIN", "('dictset_train',)"])
    with pytest.raises(ValueError) as e:
        validate_train_dicts(cfg, DatasetCatalog.get("dictset_train"))
    lines = str(e.value).splitlines()
    assert "4 of 6 annotations are bad (3 malformed, 1 invalid category)" in lines[0]
    assert lines[1] == (
        f"  {image}: annotation id B: category_id 2 is not a class (0..1): "
        "bbox [1, 1, 5, 5] (XYXY_ABS) = XYXY_ABS [1, 1, 5, 5]"
    )
    assert lines[2].startswith(f"  {image}: annotation #2 of the image: bbox / bbox_mode is not")
    assert lines[2].endswith("bbox [1, 1, 5] (XYXY_ABS)")
    assert "annotation #3 of the image" in lines[3] and "annotation #4 of the image" in lines[4]
    assert "XYWH_REL" in lines[4]


def test_undeclared_coco_category_is_named_before_loading(tmp_path, registered):
    json_path = _write_dataset(tmp_path, "catset", boxes=[(0, 7, [1, 1, 5, 5])])
    data = json.loads(json_path.read_text())
    data["annotations"][0]["category_id"] = 9
    json_path.write_text(json.dumps(data))
    registered.extend(register_folder_datasets(str(tmp_path)))
    with pytest.raises(ValueError) as e:
        validate_dataset("catset_train")
    msg = str(e.value)
    assert "img0.png: annotation id 7: category_id 9" in msg and str(json_path) in msg
    assert "[1, 2]" in msg and "Fix:" in msg


def test_evaluation_stops_on_a_missing_image_even_under_skip(bad_set, caplog):
    cfg = build_cfg(
        STUDENT_CONFIG,
        ["DATASETS.TEST", "('badset_train',)", "DATALOADER.ON_BAD_ANNOTATIONS", "skip"],
    )
    with pytest.raises(ValueError) as e:
        validate_test_datasets(cfg)
    assert f"{bad_set / 'img1.png'}: image file is missing" in str(e.value)
    assert "Evaluation needs every image" in str(e.value)
    # With the files back, bad boxes alone are only logged under skip (inference ignores them)...
    Image.new("RGB", (SIZE, SIZE)).save(bad_set / "img1.png")
    Image.new("RGB", (SIZE, SIZE)).save(bad_set / "img2.png")
    dicts = DatasetCatalog.get("badset_train")
    with caplog.at_level(logging.WARNING, logger="kd.data.validation"):
        assert validate_test_dicts(cfg, dicts, "badset_train") is dicts
    assert "4 of 9 annotations are bad" in caplog.text
    # ... and stop under "stop".
    with pytest.raises(ValueError, match="annotation id 11"):
        validate_test_dicts(_cfg(), dicts, "badset_train")


def test_unknown_choice_is_refused(bad_set):
    with pytest.raises(ValueError, match="must be one of stop, skip, got 'ignore'"):
        validate_train_dicts(_cfg("DATALOADER.ON_BAD_ANNOTATIONS", "ignore"), [])


def test_vectorised_check_agrees_with_box_by_box_conversion():
    # A second method: detectron2's BoxMode.convert of each box and plain comparisons.
    rng = np.random.default_rng(0)
    n = 2000
    boxes = np.round(rng.uniform(-10, 60, size=(n, 4)), 1)
    modes = rng.choice([BoxMode.XYXY_ABS, BoxMode.XYWH_ABS], size=n)
    dicts = [
        {
            "file_name": __file__,
            "width": 50,
            "height": 40,
            "annotations": [
                {"bbox": boxes[k].tolist(), "bbox_mode": modes[k], "category_id": 0}
                for k in range(i, i + 10)
            ],
        }
        for i in range(0, n, 10)
    ]
    expected = []
    for k in range(n):
        x1, y1, x2, y2 = BoxMode.convert(boxes[k].tolist(), modes[k], BoxMode.XYXY_ABS)
        positive = x2 > x1 and y2 > y1
        inside = x1 >= -2 and y1 >= -2 and x2 <= 52 and y2 <= 42
        area = min(x2, 50) > max(x1, 0) and min(y2, 40) > max(y1, 0)
        expected.append(not (positive and inside and area))
    report = check_dataset_dicts(dicts, box_tolerance=2.0, num_classes=1)
    got = np.zeros(n, dtype=bool)
    got[report.bad_records * 10 + report.bad_indices] = True
    assert 100 < sum(expected) < n - 100  # both kinds are there
    assert got.tolist() == expected


@pytest.fixture
def late_defects_root(datasets_root, tmp_path) -> Path:
    """A copy of the tiny dataset as ``kdbad``: a box of negative width in the first training
    image, and the last training image missing."""
    root = tmp_path / "datasets"
    shutil.copytree(datasets_root / TINY_DATASET, root / "kdbad")
    json_path = root / "kdbad" / "annotations" / "instances_train.json"
    data = json.loads(json_path.read_text())
    data["annotations"][0]["bbox"][2] = -5.0
    json_path.write_text(json.dumps(data))
    # The last image that training uses (images without boxes are left out of it).
    used = {a["image_id"] for a in data["annotations"]}
    last = max(im["id"] for im in data["images"] if im["id"] in used)
    files = {im["id"]: im["file_name"] for im in data["images"]}
    (root / "kdbad" / "train" / files[last]).unlink()
    return root


def test_train_net_stops_before_training_or_skips(late_defects_root, tmp_path):
    data = json.loads((late_defects_root / "kdbad/annotations/instances_train.json").read_text())
    bad_id = data["annotations"][0]["id"]
    opts = [*TINY_RCNN_OPTS, "DATASETS.TRAIN", "('kdbad_train',)", "DATASETS.TEST", "()"]
    argv = ["--config-file", str(REPO / STUDENT_CONFIG), *opts, "SOLVER.MAX_ITER", "2"]
    proc = run_train_net(
        [*argv, "OUTPUT_DIR", str(tmp_path / "stop")], late_defects_root, check=False
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    num_images = len({a["image_id"] for a in data["annotations"]})
    assert (
        f"Dataset 'kdbad_train': 1 of {num_images} images have a missing or empty file; 1 of "
        f"{len(data['annotations'])} annotations are bad (1 not positive in size). First ones:"
    ) in proc.stderr
    assert f"annotation id {bad_id}: width -5" in proc.stderr
    assert "image file is missing" in proc.stderr
    assert not (tmp_path / "stop" / "metrics.json").exists()  # not a single step
    proc = run_train_net(
        [*argv, "OUTPUT_DIR", str(tmp_path / "skip"), "DATALOADER.ON_BAD_ANNOTATIONS", "skip"],
        late_defects_root,
    )
    assert "DATALOADER.ON_BAD_ANNOTATIONS skip: training without the 1 bad annotations" in (
        proc.stdout + proc.stderr
    )
    assert (tmp_path / "skip" / "model_final.pth").is_file()
