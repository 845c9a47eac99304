"""The DETR meta-architecture: padding masks, isolated query groups, denoising isolation, and a
short training + COCO evaluation for each configuration switch.

Tiny models (width 32, one encoder and two decoder layers, 10 queries, 64 px images) keep the
whole file to a few seconds per switch on a 2-core CPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import kd  # noqa: F401  (registers the DETR meta-architecture)
from kd import compat
from kd.modeling.detr import QueryGroup, add_detr_config, denormalize_boxes, normalize_boxes

pytestmark = pytest.mark.usefixtures("one_thread")


SWITCHES = {
    "single_scale": dict(attention="standard"),
    "deformable": dict(attention="deformable"),
    "two_stage": dict(attention="deformable", two_stage=True),
    "denoising": dict(attention="deformable", two_stage=True, denoising=True),
}


def tiny_cfg(attention="standard", two_stage=False, denoising=False, num_classes=2):
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DETR"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    d = cfg.MODEL.DETR
    d.NUM_CLASSES = num_classes
    d.HIDDEN_DIM = 32
    d.NHEADS = 4
    d.DIM_FEEDFORWARD = 64
    d.DROPOUT = 0.0
    d.ENC_LAYERS = 1
    d.DEC_LAYERS = 2
    d.NUM_QUERIES = 10
    d.ATTENTION = attention
    if attention == "deformable":
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        d.IN_FEATURES = ["res3", "res4", "res5"]
        d.NUM_FEATURE_LEVELS = 4
    else:
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    d.TWO_STAGE = two_stage
    d.DENOISING.ENABLED = denoising
    d.DENOISING.MAX_QUERIES = 12
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    return cfg


def tiny_model(**switches):
    torch.manual_seed(0)
    return build_model(tiny_cfg(**switches))


# Two classes of axis-aligned squares: bright red (0) and bright green (1) on a dark background.
_OBJECTS = [
    [(0, 8, 8, 28, 28), (1, 36, 30, 58, 52)],
    [(1, 6, 34, 26, 58), (0, 30, 6, 56, 32)],
    [(0, 20, 20, 44, 44)],
]


def toy_dataset():
    """Detectron2 dataset dicts with their image tensors ("image", BGR 0-255, 64 x 64)."""
    dicts = []
    for i, objects in enumerate(_OBJECTS):
        image = torch.full((3, 64, 64), 20.0)
        annotations = []
        for cls, x0, y0, x1, y1 in objects:
            image[:, y0:y1, x0:x1] = torch.tensor(
                [30.0, 230.0, 40.0] if cls else [40.0, 30.0, 230.0]
            )[:, None, None]
            annotations.append({"bbox": [x0, y0, x1, y1], "bbox_mode": 0, "category_id": cls})
        dicts.append(
            {
                "file_name": f"toy_{i}.png",
                "image_id": i,
                "height": 64,
                "width": 64,
                "annotations": annotations,
                "image": image,
            }
        )
    return dicts


def to_inputs(dicts, with_instances=True):
    inputs = []
    for d in dicts:
        x = {"image": d["image"], "image_id": d["image_id"], "height": 64, "width": 64}
        if with_instances:
            instances = Instances((64, 64))
            instances.gt_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]]).float())
            instances.gt_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
            x["instances"] = instances
        inputs.append(x)
    return inputs


# ------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("switch", ["single_scale", "two_stage"])
def test_padding_does_not_change_an_image_outputs(switch):
    """An image's detections are the same alone and batched with a larger image.

    The backbone is run per image (a CNN's border features spill into padding, in any detector);
    everything after it sees the padding only through the masks, which is what this checks.
    """
    model = tiny_model(**SWITCHES[switch]).eval()
    small = torch.rand(3, 64, 64) * 255
    large = torch.rand(3, 128, 96) * 255
    with torch.no_grad():
        alone = model.preprocess_image([{"image": small}])
        batched = model.preprocess_image([{"image": small}, {"image": large}])
        assert batched.tensor.shape[-2:] != alone.tensor.shape[-2:]
        f_small = model.backbone(alone.tensor)
        f_large = model.backbone(model.preprocess_image([{"image": large}]).tensor)
        features = {}
        for name, big in f_large.items():
            pad = (
                0,
                big.shape[-1] - f_small[name].shape[-1],
                0,
                big.shape[-2] - f_small[name].shape[-2],
            )
            features[name] = torch.cat([F.pad(f_small[name], pad), big])
        out_alone = model.detect(model.encode_features(f_small, alone)).queries
        out_batched = model.detect(model.encode_features(features, batched)).queries
    torch.testing.assert_close(out_batched.logits[:, :1], out_alone.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_batched.boxes[:, :1], out_alone.boxes, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ query groups


@pytest.mark.parametrize("switch", ["single_scale", "two_stage"])
def test_query_groups_are_isolated(switch):
    model = tiny_model(**SWITCHES[switch]).eval()
    inputs = to_inputs(toy_dataset()[:2], with_instances=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        encoded = model.encode(inputs)
        detection = model.detect(encoded).queries
        probe = QueryGroup(anchors=torch.rand(2, 6, 4, generator=g))
        other = QueryGroup(anchors=torch.rand(2, 9, 4, generator=g), content=torch.randn(2, 9, 32))
        changed = QueryGroup(anchors=torch.rand(2, 4, 4, generator=g))
        out_a = model.decode_groups(encoded, [probe, other])
        out_b = model.decode_groups(encoded, [changed, probe])
        out_alone = model.decode_groups(encoded, [probe])[0]
        after = model.detect(encoded).queries
        # The detection queries decoded as a group reproduce the detection path.
        content = model.query_content.weight[None].expand(2, -1, -1)
        as_group = model.decode_groups(
            encoded, [QueryGroup(model.detection_anchors(encoded), content), probe]
        )[0]
    assert [o.logits.shape for o in out_a] == [(2, 2, 6, 2), (2, 2, 9, 2)]
    assert out_a[1].boxes.shape == (2, 2, 9, 4) and out_a[1].hidden.shape == (2, 2, 9, 32)
    for out in (out_a[0], out_b[1]):
        torch.testing.assert_close(out.logits, out_alone.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.boxes, out_alone.boxes, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(after.logits, detection.logits, atol=0, rtol=0)
    torch.testing.assert_close(as_group.logits, detection.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_group.boxes, detection.boxes, atol=1e-6, rtol=1e-5)


def test_denoising_queries_do_not_leak_into_detection_queries():
    model = tiny_model(**SWITCHES["denoising"]).train()  # dropout is 0: train mode is deterministic
    inputs = to_inputs(toy_dataset())
    with torch.no_grad():
        encoded = model.encode_features(
            model.backbone(model.preprocess_image(inputs).tensor), model.preprocess_image(inputs)
        )
        targets = model.prepare_targets(inputs)
        with_dn = model.detect(encoded, targets)
        without = model.detect(encoded)
        groups = model.decode_groups(encoded, [QueryGroup(model.detection_anchors(encoded))])
    assert with_dn.denoising is not None and without.denoising is None
    assert with_dn.denoising.logits.shape[2] == with_dn.denoising_meta.num_queries
    torch.testing.assert_close(with_dn.queries.logits, without.queries.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn.queries.boxes, without.queries.boxes, atol=1e-6, rtol=1e-5)
    assert groups[0].logits.shape[2] == model.num_queries  # no denoising queries in groups


def test_batch_without_boxes_reports_zero_denoising_losses():
    model = tiny_model(**SWITCHES["denoising"]).train()
    inputs = to_inputs(toy_dataset()[:2])
    for x in inputs:
        x["instances"] = x["instances"][:0]
    losses = model(inputs)
    with_boxes = model(to_inputs(toy_dataset()[:2]))
    assert set(losses) == set(with_boxes)
    assert all(losses[k].item() == 0 for k in losses if "_dn" in k)
    sum(losses.values()).backward()
    assert model.denoising.label_embed.weight.grad is not None


def test_interface_shapes_and_box_conversions():
    model = tiny_model(**SWITCHES["single_scale"])
    assert model.query_anchors.shape == (10, 4)
    assert ((model.query_anchors > 0) & (model.query_anchors < 1)).all()
    assert model.anchors_to_queries(torch.rand(3, 5, 4)).shape == (3, 5, 32)
    two_stage = tiny_model(**SWITCHES["two_stage"]).eval()
    assert two_stage.query_anchors is None
    with torch.no_grad():
        encoded = two_stage.encode(to_inputs(toy_dataset()[:2], with_instances=False))
    assert encoded.anchors.shape == (2, 10, 4) and not encoded.anchors.requires_grad
    assert encoded.memory.shape[:2] == encoded.padding_mask.shape
    assert encoded.valid_ratios.shape == (2, 4, 2) and encoded.spatial_shapes.shape == (4, 2)
    boxes = torch.tensor([[[8.0, 16.0, 40.0, 48.0]]])
    anchors = normalize_boxes(boxes, [(64, 80)])
    torch.testing.assert_close(anchors, torch.tensor([[[0.3, 0.5, 0.4, 0.5]]]))
    torch.testing.assert_close(denormalize_boxes(anchors, [(64, 80)]), boxes)


def test_normalize_boxes_clips_corners():
    """A box sticking out of the image keeps the part inside (corners clamped, then converted)."""
    # Image 80 wide, 64 high. Out on the left: x0 = -16 -> 0, so x in [0, 48] = [0, 0.6].
    # Out on the right and bottom: x in [60, 80] = [0.75, 1], y in [32, 64] = [0.5, 1].
    boxes = torch.tensor([[[-16.0, 8.0, 48.0, 40.0], [60.0, 32.0, 100.0, 90.0]]])
    expected = torch.tensor([[[0.3, 0.375, 0.6, 0.5], [0.875, 0.75, 0.25, 0.5]]])
    torch.testing.assert_close(normalize_boxes(boxes, [(64, 80)]), expected)
    # Wholly outside: an empty box on the border, not a box of the original size.
    outside = normalize_boxes(torch.tensor([[[90.0, 10.0, 120.0, 20.0]]]), [(64, 80)])
    assert outside[0, 0, 0] == 1.0 and outside[0, 0, 2] == 0.0


# ------------------------------------------------------------------------------ training


def _evaluate(model, dicts, name, tmp_path):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    plain = [{k: v for k, v in d.items() if k != "image"} for d in dicts]
    DatasetCatalog.register(name, lambda: copy.deepcopy(plain))
    MetadataCatalog.get(name).set(thing_classes=["red", "green"])
    evaluator = compat.build_coco_evaluator(name, output_dir=str(tmp_path))
    evaluator.reset()
    model.eval()
    inputs = to_inputs(dicts, with_instances=False)
    with torch.no_grad():
        outputs = model(inputs)
    for instances in outputs:
        fields = instances["instances"].get_fields()
        assert set(fields) == {"pred_boxes", "scores", "pred_classes"}
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()["bbox"]


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_switch_trains_and_evaluates(switch, tmp_path):
    """A few iterations on a toy set: finite, decreasing losses, then COCO evaluation."""
    model = tiny_model(**SWITCHES[switch]).train()
    dicts = toy_dataset()
    inputs = to_inputs(dicts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    totals = []
    for _ in range(30):
        losses = model(inputs)
        total = sum(losses.values())
        assert torch.isfinite(total), {k: v.item() for k, v in losses.items()}
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        totals.append(total.item())
    if switch == "denoising":
        assert any("_dn" in k for k in losses) and any("_enc" in k for k in losses)
    assert sum(totals[-3:]) / 3 < 0.7 * sum(totals[:3]) / 3, totals
    results = _evaluate(model, dicts, f"detr_toy_{switch}", tmp_path)
    assert set(results) >= {"AP", "AP50", "AP75"}
    assert results["AP50"] >= 0
