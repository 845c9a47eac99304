"""BCCD and the MobileNetV2 backbone: VOC loading, ImageNet weights, configs/bccd.

The data tests read a handful of BCCD's real XML files (copied into a temporary VOC folder) and
synthetic broken ones; the weights tests need torchvision's MobileNetV2 file in its cache, which
``make setup`` installs (tools/install_imagenet_weights.py).
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_cfg, run_train_net, save_untrained_teacher

BCCD = REPO.parent / "shared" / "data" / "bccd"
BCCD_CONFIGS = sorted(p.name for p in (REPO / "configs" / "bccd").glob("*.yaml"))

needs_bccd = pytest.mark.skipif(
    not (BCCD / "Annotations").is_dir(), reason=f"BCCD is not at {BCCD} (../shared/data/bccd)"
)


def _weights_present() -> bool:
    from kd.modeling.mobilenet import imagenet_weights_path

    return os.path.isfile(imagenet_weights_path())


needs_weights = pytest.mark.skipif(
    not _weights_present(),
    reason="torchvision's mobilenet_v2-b0353104.pth is not in its cache: run `make setup` "
    "(tools/install_imagenet_weights.py)",
)


# ------------------------------------------------------------------------ VOC loading
def _voc_folder(root: Path, ids, split: str = "train") -> Path:
    """A VOC folder with BCCD's own XML and JPEG files of ``ids``."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in ids:
        shutil.copy(BCCD / "Annotations" / f"{i}.xml", root / "Annotations")
        shutil.copy(BCCD / "JPEGImages" / f"{i}.jpg", root / "JPEGImages")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _xml(name: str, objects, size="<size><width>640</width><height>480</height></size>") -> str:
    body = "".join(
        f"<object><name>{cls}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for cls, b in objects
    )
    return f"<annotation><filename>{name}.jpg</filename>{size}{body}</annotation>"


def _synthetic(root: Path, xml_text: str, name: str = "img") -> Path:
    """A one-image VOC folder (a copy of a real BCCD image, 640x480) with the given XML."""
    _voc_folder(root, [])
    (root / "Annotations" / f"{name}.xml").write_text(xml_text)
    shutil.copy(BCCD / "JPEGImages" / "BloodImage_00000.jpg", root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets" / "Main" / "train.txt").write_text(f"{name}\n")
    return root


@needs_bccd
def test_voc_loader_reads_boxes_as_written(tmp_path):
    from kd.data.voc import BCCD_CLASSES, load_voc_instances

    root = _voc_folder(tmp_path, ["BloodImage_00000", "BloodImage_00001"])
    dicts = load_voc_instances(str(root), "train", BCCD_CLASSES)
    assert [d["image_id"] for d in dicts] == [0, 1]
    first = dicts[0]
    assert (first["width"], first["height"]) == (640, 480)
    assert first["file_name"] == str(root / "JPEGImages" / "BloodImage_00000.jpg")
    # BloodImage_00000.xml: 20 objects, the first a WBC at (260, 177)-(491, 376), the second an
    # RBC at (78, 336)-(184, 435) (read off the file).
    assert len(first["annotations"]) == 20
    wbc, rbc = first["annotations"][:2]
    assert wbc["bbox"] == [260.0, 177.0, 491.0, 376.0] and wbc["category_id"] == 1
    assert rbc["bbox"] == [78.0, 336.0, 184.0, 435.0] and rbc["category_id"] == 0
    assert wbc["ann_id"] == "BloodImage_00000.xml#0" and rbc["ann_id"] == "BloodImage_00000.xml#1"
    assert int(wbc["bbox_mode"]) == 0  # XYXY_ABS


@needs_bccd
def test_voc_loader_keeps_bad_boxes_unchanged(tmp_path):
    from kd.data.validation import NOT_POSITIVE, OUTSIDE, check_dataset_dicts
    from kd.data.voc import BCCD_CLASSES, load_voc_instances

    boxes = [
        ("RBC", (181, 329, 181, 329)),
        ("WBC", (600, 400, 700, 470)),
        ("RBC", (50, 60, 40, 90)),
    ]
    root = _synthetic(tmp_path, _xml("img", boxes))
    (record,) = load_voc_instances(str(root), "train", BCCD_CLASSES)
    assert [a["bbox"] for a in record["annotations"]] == [
        [181.0, 329.0, 181.0, 329.0],
        [600.0, 400.0, 700.0, 470.0],
        [50.0, 60.0, 40.0, 90.0],
    ]
    report = check_dataset_dicts([record], 2.0, len(BCCD_CLASSES))
    assert report.bad_indices.tolist() == [0, 1, 2]
    assert report.bad_flags.tolist() == [NOT_POSITIVE, OUTSIDE, NOT_POSITIVE]
    assert "img.xml#1" in report.examples([record])[1]


@needs_bccd
@pytest.mark.parametrize(
    "xml_text, message",
    [
        (_xml("img", [("RBC", (1, 2, 30, 40))])[:-20], "not well-formed XML"),
        (_xml("img", [("RBC", (1, 2, 30, 40)), ("Neutrophil", (5, 5, 50, 50))]), "'Neutrophil'"),
        (_xml("img", [("RBC", (1, "two", 30, 40))]), "no box of four numbers"),
        (
            _xml("img", [], "<size><width>320</width><height>240</height></size>"),
            "says 320x240",
        ),
    ],
    ids=["malformed", "unknown_class", "not_a_number", "wrong_size"],
)
def test_voc_loader_refuses_what_it_cannot_represent(tmp_path, xml_text, message):
    from kd.data.voc import BCCD_CLASSES, VOCFormatError, load_voc_instances

    root = _synthetic(tmp_path, xml_text)
    with pytest.raises(VOCFormatError, match=message) as e:
        load_voc_instances(str(root), "train", BCCD_CLASSES)
    assert str(root / "Annotations" / "img.xml") in str(e.value)


@needs_bccd
def test_coco_evaluator_scores_ground_truth_as_perfect(tmp_path):
    """A user's VOC folder evaluates with COCOEvaluator: its ground truth as predictions scores
    AP 100."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import Boxes, Instances

    from kd import compat
    from kd.data.voc import BCCD_CLASSES, register_voc_detection

    root = _voc_folder(tmp_path / "voc", ["BloodImage_00000", "BloodImage_00001"], "val")
    name = "kdtest_voc_val"
    register_voc_detection(name, str(root), "val", BCCD_CLASSES)
    try:
        evaluator = compat.build_coco_evaluator(name, output_dir=str(tmp_path / "eval"))
        evaluator.reset()
        for r in DatasetCatalog.get(name):
            inst = Instances((r["height"], r["width"]))
            inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in r["annotations"]]))
            inst.scores = torch.ones(len(inst))
            inst.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]])
            evaluator.process([{"image_id": r["image_id"]}], [{"instances": inst}])
        bbox = evaluator.evaluate()["bbox"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert bbox["AP"] == pytest.approx(100.0) and bbox["AP50"] == pytest.approx(100.0)


@needs_bccd
def test_bccd_registered_with_its_splits_and_two_point_boxes():
    """bccd_train / bccd_val: the dataset's own split (205 / 87 images, 2805 / 1138 boxes), with
    its two point-sized boxes kept and named."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import kd  # noqa: F401
    from kd.data.validation import check_dataset_dicts

    found = {}
    for split, images, boxes in (("train", 205, 2805), ("val", 87, 1138)):
        dicts = DatasetCatalog.get(f"bccd_{split}")
        assert len(dicts) == images and sum(len(d["annotations"]) for d in dicts) == boxes
        report = check_dataset_dicts(dicts, 2.0, 3)
        found[split] = [
            dicts[r]["annotations"][i]["ann_id"]
            for r, i in zip(report.bad_records, report.bad_indices)
        ]
    assert found == {"train": ["BloodImage_00343.xml#3"], "val": ["BloodImage_00338.xml#12"]}
    assert MetadataCatalog.get("bccd_val").thing_classes == ["RBC", "WBC", "Platelets"]


# ------------------------------------------------------------------------ MobileNetV2
@needs_weights
def test_imagenet_backbone_equals_torchvision_features():
    """The backbone's ImageNet body gives torchvision's own mobilenet_v2(weights=...) features,
    read through torchvision's loader in a separate forward, at every output stride."""
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    from kd.modeling.mobilenet import MobileNetV2, verify_imagenet_weights

    backbone = MobileNetV2(
        out_features=["m2", "m3", "m4", "m5"], norm="FrozenBN", imagenet_weights="IMAGENET1K_V1"
    ).eval()
    verify_imagenet_weights()  # torchvision's loader unpickles: read only the verified file
    reference = mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1).features.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = backbone(x)
        expected, y = {}, x
        for i, layer in enumerate(reference):  # torchvision's stages end after 4, 7, 14, 18 layers
            y = layer(y)
            expected[i + 1] = y
    for name, end, stride, channels in (
        ("m2", 4, 4, 24),
        ("m3", 7, 8, 32),
        ("m4", 14, 16, 96),
        ("m5", 18, 32, 320),
    ):
        assert out[name].shape == (2, channels, 96 // stride, 128 // stride)
        torch.testing.assert_close(out[name], expected[end], rtol=1e-4, atol=1e-5)
        assert backbone.output_shape()[name].stride == stride


def test_freeze_at_and_norm():
    from detectron2.layers import FrozenBatchNorm2d

    from kd.modeling.mobilenet import MobileNetV2

    backbone = MobileNetV2(out_features=["m3", "m5"], norm="BN", freeze_at=2, imagenet_weights="")
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[1] for n, p in backbone.named_parameters() if not p.requires_grad}
    # FREEZE_AT 2: the stem (features 0-1) and m2 (2-3); m5 ends at features 17.
    assert frozen == {"0", "1", "2", "3"} and trainable == {str(i) for i in range(4, 18)}
    frozen_bn = [n for n, m in backbone.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen_bn and all(int(n.split(".")[1]) < 4 for n in frozen_bn)
    assert isinstance(backbone.features[4].conv[0][1], torch.nn.BatchNorm2d)
    everything = MobileNetV2(out_features=["m4"], norm="FrozenBN", imagenet_weights="")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in everything.modules())
    assert len(everything.features) == 14


@needs_weights
def test_corrupted_or_missing_weights_are_refused(tmp_path, monkeypatch):
    from kd.modeling.mobilenet import ImageNetWeightsError, MobileNetV2, imagenet_weights_path

    real = imagenet_weights_path()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = Path(imagenet_weights_path())
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    with pytest.raises(ImageNetWeightsError, match="make setup"):
        MobileNetV2(out_features=["m5"], imagenet_weights="IMAGENET1K_V1")
    cached.parent.mkdir(parents=True)
    data = bytearray(Path(real).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor
    cached.write_bytes(bytes(data))
    with pytest.raises(ImageNetWeightsError, match="sha256") as e:
        MobileNetV2(out_features=["m5"], imagenet_weights="IMAGENET1K_V1")
    assert str(cached) in str(e.value) and "install_imagenet_weights.py" in str(e.value)


@needs_weights
def test_install_tool_copies_verified_file_and_refuses_a_corrupted_one(tmp_path, monkeypatch):
    """tools/install_imagenet_weights.py seeds an empty cache from the installed package (no
    download) and refuses a cached file whose sha256 differs."""
    from conftest import load_script

    from kd.modeling.mobilenet import IMAGENET_SHA256, imagenet_weights_path, sha256_of

    tool = load_script("tools/install_imagenet_weights.py")
    real = Path(imagenet_weights_path())
    if tool.packaged_file(real.name) is None:
        pytest.skip(f"{tool.PACKAGE} is not installed (make setup installs it)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tool.main()
    cached = tmp_path / "hub" / "checkpoints" / real.name
    assert sha256_of(str(cached)) == IMAGENET_SHA256["IMAGENET1K_V1"]
    data = bytearray(cached.read_bytes())
    data[-100] ^= 0x01
    cached.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="not torchvision's MobileNetV2 IMAGENET1K_V1 file"):
        tool.main()


def test_imagenet_weights_need_their_pixel_format():
    from detectron2.modeling import build_backbone

    cfg = build_cfg(
        "configs/bccd/retinanet_student.yaml",
        ["INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]"],
    )
    with pytest.raises(ValueError, match='INPUT.FORMAT "RGB".*PIXEL_MEAN'):
        build_backbone(cfg)


# ------------------------------------------------------------------------ configs/bccd
@pytest.fixture(scope="module")
def bccd_teachers(tmp_path_factory):
    """Untrained teachers of every family, saved (enough to build and wire the distillers)."""
    out = tmp_path_factory.mktemp("bccd_teachers")
    teachers = {}
    for family in ("faster_rcnn", "retinanet", "fcos", "detr"):
        (out / family).mkdir()
        teachers[family] = save_untrained_teacher(
            out / family, f"configs/bccd/{family}_teacher.yaml", [], seed=0
        )
    return teachers


def _teacher_family(config: str) -> str:
    teacher = build_cfg(f"configs/bccd/{config}", []).KD.TEACHER.CONFIG_FILE
    return Path(teacher).name.replace("_teacher.yaml", "")


@needs_weights
@pytest.mark.parametrize("config", [c for c in BCCD_CONFIGS if not c.startswith("Base-")])
def test_bccd_config_builds(config, bccd_teachers, one_thread):
    from detectron2.modeling import build_model

    opts = []
    if "teacher" not in config and "student" not in config:
        cfg_file, weights = bccd_teachers[_teacher_family(config)]
        opts = ["KD.TEACHER.CONFIG_FILE", cfg_file, "KD.TEACHER.WEIGHTS", weights]
    cfg = build_cfg(f"configs/bccd/{config}", opts)
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.MOBILENET.IMAGENET_WEIGHTS == "IMAGENET1K_V1"
    assert list(cfg.DATASETS.TRAIN) == ["bccd_train"] and list(cfg.DATASETS.TEST) == ["bccd_val"]
    model = build_model(cfg)
    student = getattr(model, "student", model)
    assert "mobilenet" in cfg.MODEL.BACKBONE.NAME
    # The ImageNet weights are in: the first conv equals the file's.
    from kd.modeling.mobilenet import imagenet_weights_path
    from kd.weights import load_checkpoint_file

    first = load_checkpoint_file(imagenet_weights_path())["model"]["features.0.0.weight"]
    body = (
        student.backbone.bottom_up if hasattr(student.backbone, "bottom_up") else student.backbone
    )
    assert torch.equal(body.features[0][0].weight, first)


@needs_bccd
@needs_weights
def test_kd_train_step_on_two_bccd_images(tmp_path, monkeypatch, bccd_teachers):
    """One training step and an evaluation of the low-resolution Chen et al. config on BCCD
    images (two to train on, one to evaluate), through train_net.py."""
    root = _voc_folder(tmp_path / "bccd", ["BloodImage_00000", "BloodImage_00001"])
    _voc_folder(root, ["BloodImage_00338"], "val")  # holds a point-sized box, kept for evaluation
    monkeypatch.setenv("KD_BCCD_ROOT", str(root))
    config, weights = bccd_teachers["faster_rcnn"]
    out = tmp_path / "run"
    # fmt: off
    run_train_net([
        "--config-file", str(REPO / "configs/bccd/faster_rcnn_kd_chen2017.yaml"),
        "KD.TEACHER.CONFIG_FILE", config, "KD.TEACHER.WEIGHTS", weights,
        "KD.TEACHER.MIN_AP", "0",  # untrained: its AP on the one val image is 0
        "INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", "256",
        "INPUT.MIN_SIZE_TEST", "192", "INPUT.MAX_SIZE_TEST", "256",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "()", "OUTPUT_DIR", str(out),
    ], tmp_path)
    # fmt: on
    metrics = (out / "metrics.json").read_text()
    assert "loss_kd_chen2017_hint" in metrics and "loss_kd_chen2017_rcn_soft_cls" in metrics
    assert (out / "eval_results.json").is_file()
    log = (out / "log.txt").read_text()
    assert "BloodImage_00338.xml#12" in log  # the bad val box is named, not dropped silently


def test_benchmark_suite_bccd_records_apart_from_kd_shapes(tmp_path):
    """tools/benchmark_table.py --suite bccd: configs/bccd, its own output folder, and record keys
    and identities that cannot be taken for kd_shapes runs of the same names."""
    from conftest import load_script

    bt = load_script("tools/benchmark_table.py")

    def plan(suite):
        args = bt.argparse.Namespace(
            suite=suite,
            output=str(tmp_path / suite),
            seeds=[1],
            families=["fcos"],
            methods=["^GID$"],
            teacher_iters=None,
            student_iters=None,
        )
        return bt.plan(args), str(tmp_path / suite)

    (teacher, baseline, gid), out = plan("bccd")
    assert gid["config"] == "fcos_kd_gid.yaml" and os.path.isfile(
        REPO / "configs/bccd/fcos_kd_gid.yaml"
    )
    assert (teacher["iters"], baseline["iters"]) == (500, 300)
    assert bt.run_key(gid, out) == "bccd/fcos/seed1/gid"
    assert bt.run_identity(gid, out)["suite"] == "bccd"
    kd_shapes_gid = plan("kd_shapes")[0][2]
    assert bt.run_key(kd_shapes_gid, str(tmp_path / "kd_shapes")) == "fcos/seed1/gid"
    assert "suite" not in bt.run_identity(kd_shapes_gid, str(tmp_path / "kd_shapes"))
    record = {}
    bt.record_run(gid, out, record, {"AP": 50.0, "AP50": 80.0, "AP75": 55.0})
    assert bt.recorded(gid, out, record) == {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}
    assert bt.recorded(kd_shapes_gid, str(tmp_path / "kd_shapes"), record) is None
