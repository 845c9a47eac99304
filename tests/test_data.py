"""The synthetic kd_shapes generator, folder-dataset registration and dataset validation."""

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from conftest import load_script
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

from kd.data import register_folder_datasets, validate_dataset, validate_datasets
from kd.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parent.parent
CLASS_NAMES = ["disc", "ring", "square", "triangle", "star", "cross", "ellipse"]
SIZE = 128
NUM_TRAIN, NUM_VAL = 60, 12


def _tree_bytes(folder: Path) -> Dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _write_coco(path: Path, num_images: int, anns_per_image: int) -> None:
    """A hand-made COCO file with 32 px images, independent of the generator."""
    images = [
        {"id": i + 1, "file_name": f"img{i}.png", "width": 32, "height": 32}
        for i in range(num_images)
    ]
    annotations = [
        {
            "id": i * anns_per_image + j + 1,
            "image_id": i + 1,
            "category_id": 1 + j % 2,
            "bbox": [2.0 + j, 3.0, 10.0, 12.0],
            "area": 120.0,
            "iscrowd": 0,
        }
        for i in range(num_images)
        for j in range(anns_per_image)
    ]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def _make_folder_dataset(root: Path, name: str, split: str, num_images: int = 2) -> Path:
    json_path = root / name / "annotations" / f"instances_{split}.json"
    _write_coco(json_path, num_images, anns_per_image=2)
    image_dir = root / name / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        Image.new("RGB", (32, 32)).save(image_dir / f"img{i}.png")
    return json_path


@pytest.fixture
def registered() -> List[str]:
    """Names a test registers; removed from the catalogs afterwards so tests stay independent."""
    names: List[str] = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A small generated dataset folder ``ROOT/kdshapes_test``."""
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(
        str(root),
        "kdshapes_test",
        seed=5,
        num_train=NUM_TRAIN,
        num_val=NUM_VAL,
        image_size=SIZE,
        verbose=False,
    )
    return root


# ----------------------------------------------------------------------------- generator


def test_generation_is_deterministic_by_seed(tmp_path):
    args = dict(num_train=6, num_val=3, image_size=64, verbose=False)
    generate_dataset(str(tmp_path / "a"), "det", seed=11, **args)
    generate_dataset(str(tmp_path / "b"), "det", seed=11, **args)
    generate_dataset(str(tmp_path / "c"), "det", seed=12, **args)
    a, b, c = (_tree_bytes(tmp_path / x / "det") for x in "abc")
    expected = ["annotations/instances_train.json", "annotations/instances_val.json"]
    expected += [f"train/{i:06d}.png" for i in range(6)] + [f"val/{i:06d}.png" for i in range(3)]
    assert sorted(a) == sorted(expected)
    assert a == b
    assert sorted(c) == sorted(a)
    assert all(c[key] != a[key] for key in a), "another seed must change every file"
    # Train and val come from different seeds: their first images differ.
    assert a["train/000000.png"] != a["val/000000.png"]


def test_image_does_not_depend_on_count_and_stale_images_are_removed(tmp_path):
    generate_dataset(str(tmp_path), "det", seed=3, num_train=5, num_val=0, verbose=False)
    first = _tree_bytes(tmp_path / "det")
    generate_dataset(str(tmp_path), "det", seed=3, num_train=2, num_val=0, verbose=False)
    second = _tree_bytes(tmp_path / "det")
    assert sorted(second) == [
        "annotations/instances_train.json",
        "train/000000.png",
        "train/000001.png",
    ]
    assert second["train/000000.png"] == first["train/000000.png"]
    assert second["train/000001.png"] == first["train/000001.png"]
    assert not (tmp_path / "det" / "annotations" / "instances_val.json").exists()


def test_cli_matches_library(tmp_path, capsys):
    cli = load_script("datasets/prepare_synthetic.py")
    common = ["--seed", "4", "--num-train", "3", "--num-val", "2", "--image-size", "48"]
    cli.main(["--root", str(tmp_path / "cli"), "--name", "viacli", *common])
    out = capsys.readouterr().out
    assert "3 images" in out and "2 images" in out  # the summary of each split
    generate_dataset(
        str(tmp_path / "lib"),
        "viacli",
        seed=4,
        num_train=3,
        num_val=2,
        image_size=48,
        verbose=False,
    )
    assert _tree_bytes(tmp_path / "cli" / "viacli") == _tree_bytes(tmp_path / "lib" / "viacli")


@pytest.mark.parametrize("split,count", [("train", NUM_TRAIN), ("val", NUM_VAL)])
def test_generated_files_are_valid_coco(shapes, split, count):
    folder = shapes / "kdshapes_test"
    coco = COCO(str(folder / "annotations" / f"instances_{split}.json"))
    assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == CLASS_NAMES
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == count
    for image in images:
        with Image.open(folder / split / image["file_name"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (image["width"], image["height"]) == (SIZE, SIZE)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert 1 <= len(anns) <= 8
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert ann["iscrowd"] == 0
            assert ann["category_id"] in coco.getCatIds()
            # The area is the shape's coverage, which lies inside its box.
            assert 0 < ann["area"] <= w * h + 1e-6
            assert 0.3 <= ann["visibility"] <= 1.0
    ann_ids = coco.getAnnIds()
    assert len(set(ann_ids)) == len(ann_ids)


def test_generated_objects_cover_classes_and_sizes(shapes):
    with open(shapes / "kdshapes_test" / "annotations" / "instances_train.json") as f:
        data = json.load(f)
    anns = data["annotations"]
    assert {a["category_id"] for a in anns} == set(range(1, len(CLASS_NAMES) + 1))
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).any(), "no COCO-small objects"
    assert ((areas >= 32**2) & (areas < 96**2)).any(), "no COCO-medium objects"
    longest_side = np.array([max(a["bbox"][2:]) for a in anns])
    assert longest_side.min() <= 10, "no tiny objects (~6-8 px)"
    assert longest_side.max() >= 0.4 * SIZE, "no large objects (~60% of the image)"
    # Some objects are partly hidden by later ones but still annotated.
    assert any(a["visibility"] < 0.9 for a in anns)


def test_images_are_not_trivial(shapes):
    # Textured backgrounds: no image is a flat colour outside its objects; images differ.
    folder = shapes / "kdshapes_test" / "val"
    arrays = [np.asarray(Image.open(folder / f"{i:06d}.png"), np.float32) for i in range(4)]
    for arr in arrays:
        assert arr.std(axis=(0, 1)).min() > 5
    assert all(np.abs(arrays[0] - other).mean() > 10 for other in arrays[1:])


# ----------------------------------------------------------------------------- registration


def test_register_folder_datasets_explicit_root(shapes, registered):
    names = register_folder_datasets(str(shapes))
    registered.extend(names)
    assert sorted(names) == ["kdshapes_test_train", "kdshapes_test_val"]
    assert register_folder_datasets(str(shapes)) == []  # idempotent

    dicts = DatasetCatalog.get("kdshapes_test_train")
    assert len(dicts) == NUM_TRAIN
    with open(shapes / "kdshapes_test" / "annotations" / "instances_train.json") as f:
        num_anns = len(json.load(f)["annotations"])
    assert sum(len(d["annotations"]) for d in dicts) == num_anns
    first = dicts[0]
    assert first["file_name"] == str(shapes / "kdshapes_test" / "train" / "000000.png")
    assert os.path.isfile(first["file_name"])
    assert first["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    assert len(DatasetCatalog.get("kdshapes_test_val")) == NUM_VAL
    assert MetadataCatalog.get("kdshapes_test_val").thing_classes == CLASS_NAMES
    validate_datasets(["kdshapes_test_train", "kdshapes_test_val", "kdshapes_test_train"])


def test_register_folder_datasets_from_env_registers_present_splits_only(
    tmp_path, monkeypatch, registered
):
    _make_folder_dataset(tmp_path, "envset", "val", num_images=3)
    (tmp_path / "not_a_dataset").mkdir()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    names = register_folder_datasets()
    registered.extend(names)
    assert names == ["envset_val"]
    assert len(DatasetCatalog.get("envset_val")) == 3
    assert MetadataCatalog.get("envset_val").image_root == str(tmp_path / "envset" / "val")


def test_register_missing_root_registers_nothing(tmp_path):
    assert register_folder_datasets(str(tmp_path / "nowhere")) == []


# ----------------------------------------------------------------------------- validation


def test_validate_unregistered_name_suggests_close_names_and_how_to_create(
    tmp_path, monkeypatch, registered
):
    _make_folder_dataset(tmp_path, "valshapes", "train")
    registered.extend(register_folder_datasets(str(tmp_path)))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(ValueError) as e:
        validate_dataset("valshapes_trian")
    msg = str(e.value)
    assert "valshapes_trian" in msg and "valshapes_train" in msg
    assert "prepare_synthetic.py" in msg and "--name kd_shapes" in msg
    assert "DETECTRON2_DATASETS" in msg and str(tmp_path) in msg


def test_validate_unregistered_folder_name_names_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(ValueError) as e:
        validate_datasets(["nosuchset_val"])
    expected = os.path.join(str(tmp_path), "nosuchset", "annotations", "instances_val.json")
    assert expected in str(e.value)
    assert "prepare_synthetic.py" in str(e.value)


def test_validate_missing_annotation_file(tmp_path, registered):
    json_path = _make_folder_dataset(tmp_path, "gone", "val")
    registered.extend(register_folder_datasets(str(tmp_path)))
    validate_dataset("gone_val")
    json_path.unlink()
    with pytest.raises(FileNotFoundError) as e:
        validate_dataset("gone_val")
    msg = str(e.value)
    assert str(json_path) in msg
    assert "Fix:" in msg and f"prepare_synthetic.py --root {tmp_path} --name gone" in msg


def test_validate_missing_image_folder(tmp_path, registered):
    _make_folder_dataset(tmp_path, "noimages", "train")
    shutil.rmtree(tmp_path / "noimages" / "train")
    registered.extend(register_folder_datasets(str(tmp_path)))
    with pytest.raises(FileNotFoundError) as e:
        validate_dataset("noimages_train")
    assert str(tmp_path / "noimages" / "train") in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize(
    "num_images,anns_per_image,what", [(0, 0, "zero images"), (2, 0, "zero annotations")]
)
def test_validate_empty_annotation_file(tmp_path, registered, num_images, anns_per_image, what):
    json_path = _make_folder_dataset(tmp_path, "emptyset", "train")
    registered.extend(register_folder_datasets(str(tmp_path)))
    validate_dataset("emptyset_train")
    # Rewritten after a successful check: the change must be noticed, not hidden by a cache.
    _write_coco(json_path, num_images, anns_per_image)
    with pytest.raises(ValueError) as e:
        validate_dataset("emptyset_train")
    assert what in str(e.value) and str(json_path) in str(e.value)
    assert "Fix:" in str(e.value) and "prepare_synthetic.py" in str(e.value)


def test_validate_invalid_json(tmp_path, registered):
    json_path = _make_folder_dataset(tmp_path, "broken", "val")
    json_path.write_text(json_path.read_text()[:50])
    registered.extend(register_folder_datasets(str(tmp_path)))
    with pytest.raises(ValueError) as e:
        validate_dataset("broken_val")
    msg = str(e.value)
    assert "not valid JSON" in msg and str(json_path) in msg
    assert "Fix:" in msg and "prepare_synthetic.py" in msg


def test_validate_builtin_coco_checks_its_json_file():
    json_file = MetadataCatalog.get("coco_2017_val").json_file
    if os.path.isfile(json_file):
        pytest.skip("COCO is installed here")
    with pytest.raises(FileNotFoundError) as e:
        validate_dataset("coco_2017_val")
    msg = str(e.value)
    assert json_file in msg
    assert "DETECTRON2_DATASETS" in msg and "coco/{train2017,val2017,annotations}" in msg
