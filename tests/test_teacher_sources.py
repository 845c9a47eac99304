"""Teachers users already have: detectron2 model-zoo checkpoints and LazyConfig models.

* The COCO recipes name published model-zoo teachers, with this project's configs of their
  architectures; those configs build the zoo's parameter names and shapes, and a ``.pkl`` in the
  zoo's format loads through the teacher's verification (or is refused when it does not fit).
* A LazyConfig (``.py``) teacher builds the same model as the yacs teacher config, trains,
  evaluates and resumes through ``train_net.py``, and bad LazyConfig teachers are refused.
"""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, build_cfg, kd_opts, run_train_net

ZOO = "configs/coco/zoo"
R101_FRCNN = f"{ZOO}/faster_rcnn_R_101_FPN_3x.yaml"
R101_RETINANET = f"{ZOO}/retinanet_R_101_FPN_3x.yaml"
COCO_KD = "configs/coco/faster_rcnn_R50_FPN_1x_kd_chen2017.yaml"
LAZY_TEACHER = "configs/kd_shapes/lazy/faster_rcnn_teacher.py"
LAZY_KD = "configs/kd_shapes/lazy/faster_rcnn_kd_chen2017.yaml"

# The R-101 zoo models with every width cut down: the same parameter names (they depend on depth
# and structure only) at a size a test can write to disk.
NARROW = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
]  # fmt: skip


def meta_state(config_file: str, opts=()) -> dict:
    """name -> shape of the model a config builds, built on the meta device (no memory)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    cfg = build_cfg(config_file, list(opts))
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- model zoo
def test_zoo_faster_rcnn_config_builds_the_published_names_and_shapes():
    """Names as the published Faster R-CNN FPN checkpoints spell them; shapes worked out by hand
    for R-101 (res4 has 23 blocks), FPN 256, a 1024-wide box head and 80 classes."""
    state = meta_state(R101_FRCNN)
    expected = {
        "backbone.bottom_up.stem.conv1.weight": (64, 3, 7, 7),
        "backbone.bottom_up.stem.conv1.norm.running_var": (64,),
        "backbone.bottom_up.res2.0.shortcut.weight": (256, 64, 1, 1),
        "backbone.bottom_up.res4.22.conv3.weight": (1024, 256, 1, 1),
        "backbone.bottom_up.res5.2.conv3.weight": (2048, 512, 1, 1),
        "backbone.fpn_lateral2.weight": (256, 256, 1, 1),
        "backbone.fpn_lateral5.weight": (256, 2048, 1, 1),
        "backbone.fpn_output5.weight": (256, 256, 3, 3),
        "proposal_generator.rpn_head.conv.weight": (256, 256, 3, 3),
        "proposal_generator.rpn_head.objectness_logits.weight": (3, 256, 1, 1),
        "proposal_generator.rpn_head.anchor_deltas.weight": (12, 256, 1, 1),
        "roi_heads.box_head.fc1.weight": (1024, 256 * 7 * 7),
        "roi_heads.box_head.fc2.weight": (1024, 1024),
        "roi_heads.box_predictor.cls_score.weight": (81, 1024),
        "roi_heads.box_predictor.bbox_pred.weight": (320, 1024),
    }
    assert {k: state.get(k) for k in expected} == expected
    assert "backbone.bottom_up.res4.23.conv1.weight" not in state
    assert not any(k.startswith(("roi_heads.mask_head", "pixel_")) for k in state)


def test_zoo_retinanet_config_builds_the_published_names_and_shapes():
    """RetinaNet: FPN on res3-res5 plus P6/P7 from C5, 4-conv heads, 9 anchors x 80 classes."""
    state = meta_state(R101_RETINANET)
    expected = {
        "backbone.fpn_lateral3.weight": (256, 512, 1, 1),
        "backbone.top_block.p6.weight": (256, 2048, 3, 3),
        "backbone.top_block.p7.weight": (256, 256, 3, 3),
        "backbone.bottom_up.res4.22.conv2.weight": (256, 256, 3, 3),
        "head.cls_subnet.6.weight": (256, 256, 3, 3),
        "head.bbox_subnet.6.weight": (256, 256, 3, 3),
        "head.cls_score.weight": (9 * 80, 256, 3, 3),
        "head.bbox_pred.weight": (9 * 4, 256, 3, 3),
    }
    assert {k: state.get(k) for k in expected} == expected
    assert "backbone.fpn_lateral2.weight" not in state and "head.cls_subnet.8.weight" not in state


def write_zoo_pkl(path: Path, state: dict) -> None:
    """A file as the model zoo publishes them: numpy arrays, plain pickle, an ``__author__``."""
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)


@pytest.fixture(scope="module")
def narrow_zoo_state():
    """name -> numpy array of a narrow R-101 zoo Faster R-CNN, with the full model's names."""
    from detectron2.modeling import build_model

    cfg = build_cfg(R101_FRCNN, [*NARROW, "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in build_model(cfg).state_dict().items()}
    assert state.keys() == meta_state(R101_FRCNN).keys()
    return state


def zoo_teacher_cfg(weights: Path, *extra):
    return build_cfg(
        COCO_KD,
        [
            "MODEL.DEVICE", "cpu",
            "KD.TEACHER.WEIGHTS", str(weights),
            "KD.TEACHER.OPTS", str(NARROW),
            *extra,
        ],
    )  # fmt: skip


def test_zoo_format_pkl_loads_through_the_teacher_checks(narrow_zoo_state, tmp_path):
    """The recipe's teacher config + a zoo-format file with exactly its names and shapes: loaded
    (through the arrays-only reader) and used as the frozen teacher."""
    from kd.teacher import build_teacher

    path = tmp_path / "model_final_zoo.pkl"
    write_zoo_pkl(path, narrow_zoo_state)
    teacher, info = build_teacher(zoo_teacher_cfg(path), "GeneralizedRCNN")
    loaded = teacher.state_dict()
    for k in (
        "roi_heads.box_predictor.cls_score.weight",
        "backbone.bottom_up.res4.22.conv3.weight",
    ):
        assert torch.equal(loaded[k], torch.from_numpy(narrow_zoo_state[k]))
    assert (info.input_format, info.num_classes, teacher.training) == ("BGR", 80, False)


def test_zoo_format_pkl_without_its_head_or_for_other_classes_is_refused(
    narrow_zoo_state, tmp_path
):
    from kd.teacher import TeacherError, build_teacher

    headless = {k: v for k, v in narrow_zoo_state.items() if "box_predictor" not in k}
    write_zoo_pkl(tmp_path / "headless.pkl", headless)
    with pytest.raises(TeacherError, match=r"4 of its weights are missing.*box_predictor"):
        build_teacher(zoo_teacher_cfg(tmp_path / "headless.pkl"), "GeneralizedRCNN")

    # The same model trained for 20 classes (VOC): 21 class scores, 20 x 4 box deltas.
    voc = dict(narrow_zoo_state)
    for name, rows in (("cls_score", 21), ("bbox_pred", 80)):
        for part in ("weight", "bias"):
            key = f"roi_heads.box_predictor.{name}.{part}"
            voc[key] = voc[key][:rows]
    write_zoo_pkl(tmp_path / "voc.pkl", voc)
    with pytest.raises(
        TeacherError, match=r"cls_score.weight: file \(21, 32\) vs model \(81, 32\)"
    ):
        build_teacher(zoo_teacher_cfg(tmp_path / "voc.pkl"), "GeneralizedRCNN")


def test_zoo_config_names(monkeypatch, tmp_path):
    """zoo:// names resolve through detectron2's model zoo where it ships its configs; here (the
    pure-Python package ships none) the error names this project's config of the architecture."""
    from detectron2 import model_zoo

    from kd.teacher import TeacherError, resolve_config_file

    name = "zoo://COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    with pytest.raises(TeacherError, match=r"configs/coco/zoo/faster_rcnn_R_101_FPN_3x.yaml"):
        resolve_config_file(name)
    with pytest.raises(TeacherError, match=r"has no config of it"):
        resolve_config_file("zoo://COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml")

    # The official install: get_config_file finds the file.
    official = tmp_path / "faster_rcnn_R_101_FPN_3x.yaml"
    official.write_text((REPO / R101_FRCNN).read_text().replace("Base-RCNN-FPN.yaml", "base.yaml"))
    (tmp_path / "base.yaml").write_text((REPO / ZOO / "Base-RCNN-FPN.yaml").read_text())
    asked = []
    monkeypatch.setattr(model_zoo, "get_config_file", lambda n: asked.append(n) or str(official))
    assert resolve_config_file(name) == str(official)
    assert asked == ["COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"]
    cfg = build_cfg(COCO_KD, ["MODEL.DEVICE", "cpu", "KD.TEACHER.CONFIG_FILE", name])
    from kd.teacher import load_teacher_config

    assert load_teacher_config(cfg).MODEL.RESNETS.DEPTH == 101


def _yaml_bases(path: Path):
    data = yaml.safe_load(path.read_text()) or {}
    base = data.get("_BASE_")
    return [] if base is None else [base]


def test_coco_recipes_need_no_file_the_install_lacks():
    """Every _BASE_ and KD.TEACHER.CONFIG_FILE under configs/coco is a file of this repository,
    and every teacher named by a detectron2:// URL is a published model of that architecture
    (the URL detectron2's own model-zoo index gives for the teacher config's name)."""
    from detectron2.model_zoo.model_zoo import _ModelZooUrls

    zoo_teachers = 0
    for path in sorted((REPO / "configs/coco").rglob("*.yaml")):
        for base in _yaml_bases(path):
            assert (path.parent / base).is_file(), f"{path}: _BASE_ {base}"
        cfg = build_cfg(str(path), [])
        teacher = cfg.KD.TEACHER.CONFIG_FILE
        if not teacher:
            continue
        assert (REPO / teacher).is_file(), f"{path}: KD.TEACHER.CONFIG_FILE {teacher}"
        weights = cfg.KD.TEACHER.WEIGHTS
        if weights.startswith("detectron2://"):
            name = "COCO-Detection/" + Path(teacher).stem
            assert weights == "detectron2://" + name + "/" + (
                _ModelZooUrls.CONFIG_PATH_TO_URL_SUFFIX[name]
            ), path
            zoo_teachers += 1
        else:
            # No published weights (FCOS, DETR family): the recipe trains its teacher.
            assert weights.startswith("output/"), path
    assert zoo_teachers == 3  # Chen et al., GID Faster R-CNN, GID RetinaNet


# ----------------------------------------------------------------------------- LazyConfig
def test_lazy_teacher_config_builds_the_yacs_teacher():
    """lazy/faster_rcnn_teacher.py and faster_rcnn_teacher.yaml: the same parameters, and with
    the same weights the same losses (same sampling) and the same detections."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    yacs = build_model(build_cfg("configs/kd_shapes/faster_rcnn_teacher.yaml", []))
    lazy = instantiate(LazyConfig.load(str(REPO / LAZY_TEACHER)).model)
    a, b = yacs.state_dict(), lazy.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    lazy.load_state_dict(a)

    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
    gt = Instances((128, 128))
    gt.gt_boxes = Boxes(torch.tensor([[10.0, 10, 50, 60], [70, 20, 120, 90]]))
    gt.gt_classes = torch.tensor([1, 3])
    batch = [{"image": image, "instances": gt, "height": 128, "width": 128}]
    losses = []
    for model in (yacs, lazy):
        torch.manual_seed(1)
        with EventStorage(0):
            losses.append({k: v.item() for k, v in model.train()(batch).items()})
    assert losses[0] == losses[1] and len(losses[0]) == 4
    with torch.no_grad():
        p, q = (m.eval()(batch)[0]["instances"] for m in (yacs, lazy))
    assert len(p) == 50  # TEST.DETECTIONS_PER_IMAGE of the kd_shapes configs
    assert torch.equal(p.pred_boxes.tensor, q.pred_boxes.tensor) and torch.equal(p.scores, q.scores)


# The tiny test teacher (R18, FPN 48, box head 64, small RPN) as LazyConfig overrides.
TINY_LAZY_TEACHER = [
    "model.backbone.bottom_up.stages.depth=18",
    "model.backbone.out_channels=48",
    "model.roi_heads.box_head.fc_dims=[64,64]",
    "model.roi_heads.batch_size_per_image=32",
    "model.proposal_generator.pre_nms_topk=[200,100]",
    "model.proposal_generator.post_nms_topk=[64,32]",
    "dataloader.train.dataset.names=kdtest_train",
]


def lazy_opts(tiny_teacher, out, *overrides):
    return [
        *kd_opts(tiny_teacher, out),
        "KD.TEACHER.CONFIG_FILE", LAZY_TEACHER,
        "KD.TEACHER.OPTS", str([*TINY_LAZY_TEACHER, *overrides]),
    ]  # fmt: skip


def test_lazy_teacher_trains_evaluates_and_resumes(datasets_root, tiny_teacher, tmp_path):
    """The yacs-trained tiny teacher's weights in the LazyConfig teacher, through train_net.py:
    its AP logged at iteration 0 (and read back from the cache on --resume), training, the
    final evaluation, and a resume that continues from the checkpoint."""
    out = tmp_path / "run"
    evaluate = ["KD.TEACHER.EVALUATE", "True", "KD.TEACHER.MIN_AP", "0.0", "SOLVER.MAX_ITER", "2"]
    argv = ["--config-file", LAZY_KD, *lazy_opts(tiny_teacher, out), *evaluate]
    run_train_net(argv, datasets_root)
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    teacher_rows = [r for r in rows if "teacher/bbox/AP" in r]
    assert [r["iteration"] for r in teacher_rows] == [0]
    cache = json.loads((out / "teacher_eval.json").read_text())
    assert cache[0]["results"]["bbox"]["AP"] == teacher_rows[0]["teacher/bbox/AP"]
    assert cache[0]["key"]["weights"] == os.path.abspath(tiny_teacher[1])
    assert (out / "eval_results.json").is_file() and (out / "model_final.pth").is_file()
    detections = out / "inference/teacher/kdtest_val/coco_instances_results.json"
    measured_at = detections.stat().st_mtime_ns

    resumed = run_train_net([*argv[:2], "--resume", *argv[2:-1], "3"], datasets_root)
    assert "Starting training from iteration 2" in resumed.stdout + resumed.stderr
    assert detections.stat().st_mtime_ns == measured_at  # not evaluated again
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    # The cached AP is logged again where the resumed run starts.
    assert [r["iteration"] for r in rows if "teacher/bbox/AP" in r] == [0, 2]


def test_bad_lazy_teachers_are_refused(tiny_teacher, tmp_path):
    from detectron2.modeling import build_model

    from kd.teacher import TeacherError

    def build(config_file, *overrides):
        opts = [*lazy_opts(tiny_teacher, tmp_path, *overrides), "KD.TEACHER.CONFIG_FILE"]
        return build_model(build_cfg(LAZY_KD, [*opts, str(config_file)]))

    with pytest.raises(TeacherError, match=r"'configs/kd_shapes/lazy/nope.py' does not exist"):
        build("configs/kd_shapes/lazy/nope.py")

    no_model = tmp_path / "no_model.py"
    no_model.write_text(
        "from omegaconf import OmegaConf\ndataloader = OmegaConf.create({'train': {}})\n"
    )
    with pytest.raises(TeacherError, match=r"without a 'model' node \(it has dataloader\)"):
        build(no_model)

    with pytest.raises(TeacherError, match=r"key=value overrides.*\['MODEL.DEVICE', 'cpu'\]"):
        yacs_style = ["KD.TEACHER.OPTS", "['MODEL.DEVICE', 'cpu']"]
        build_model(build_cfg(LAZY_KD, [*lazy_opts(tiny_teacher, tmp_path), *yacs_style]))
    # The .yaml that LazyConfig.save writes is read as a LazyConfig (not as yacs) and works.
    from detectron2.config import LazyConfig

    saved = tmp_path / "saved.yaml"
    LazyConfig.save(LazyConfig.load(str(REPO / LAZY_TEACHER)), str(saved))
    assert type(build(saved).teacher).__name__ == "GeneralizedRCNN"


def test_lazy_teacher_of_another_family_is_refused(tiny_teacher, tmp_path):
    """A RetinaNet LazyConfig teacher for Chen et al. (which needs Faster R-CNN): refused by the
    distiller's family check, naming the teacher's class."""
    from detectron2.modeling import build_model

    from kd.teacher import build_teacher_model

    retinanet = tmp_path / "retinanet.py"
    retinanet.write_text(RETINANET_LAZY)
    cfg = build_cfg(
        LAZY_KD, [*kd_opts(tiny_teacher, tmp_path), "KD.TEACHER.CONFIG_FILE", str(retinanet)]
    )
    model, info = build_teacher_model(cfg)
    assert (type(model).__name__, info.num_classes, info.input_format) == ("RetinaNet", 7, "RGB")
    torch.save({"model": model.state_dict()}, tmp_path / "retinanet.pth")
    cfg = build_cfg(
        LAZY_KD,
        [
            *kd_opts(tiny_teacher, tmp_path),
            "KD.TEACHER.CONFIG_FILE", str(retinanet),
            "KD.TEACHER.WEIGHTS", str(tmp_path / "retinanet.pth"),
        ],
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"Chen2017Distiller needs Faster R-CNN.*teacher is Retina"
    ):
        build_model(cfg)


# A tiny RetinaNet as a LazyConfig, its channel order given by its data loader only (as
# detectron2's own RGB LazyConfigs do): the teacher's input format must be read from there.
RETINANET_LAZY = """
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from omegaconf import OmegaConf

model = L(RetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
            out_features=["res3", "res4", "res5"],
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=16,
        top_block=L(LastLevelP6P7)(in_channels=16, out_channels=16, in_feature="p5"),
    ),
    head=L(RetinaNetHead)(
        input_shape=[ShapeSpec(channels=16)] * 5, num_classes=7, conv_dims=[16], num_anchors=3
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[8], [16], [32], [64], [128]], aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128], offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(
        thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True
    ),
    num_classes=7,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)
dataloader = OmegaConf.create({"train": {"mapper": {"image_format": "RGB"}}})
"""
