"""Hugging Face DETR teachers (kd/families/hf_detr.py), on tiny random models saved with
``save_pretrained`` and loaded offline: their answers are the model's own forward's.

The reference is always ``model(pixel_values, pixel_mask)`` of ``transformers`` itself, with the
pixels prepared here by hand from the processor conventions (RGB / 255, ImageNet mean/std for the
DETR-style models).
"""

import os

import pytest
import torch
from hf_models import FAMILIES, NORMALISED, REFUSED, save_tiny, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASSES = ("disc", "ring", "square")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory, one_thread):
    """(family, the model as built, the teacher loaded from its save_pretrained folder)."""
    from kd.families.hf_detr import HFDETRTeacher
    from kd.teacher import freeze

    family = request.param
    folder = tmp_path_factory.mktemp(family)
    model = save_tiny(family, folder, CLASSES)
    teacher = freeze(HFDETRTeacher.from_source(f"hf://{folder}"))
    return family, model, teacher


def _batch(seed: int = 0, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)}
        for _ in range(2)
    ]


def _reference(family, model, batch):
    pixels = torch.stack([x["image"].float() / 255 for x in batch])
    if family in NORMALISED:
        pixels = (pixels - MEAN) / STD
    mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long)
    with torch.no_grad():
        return model(pixel_values=pixels, pixel_mask=mask)


def test_loaded_teacher_holds_the_saved_weights_frozen(saved):
    family, model, teacher = saved
    theirs, ours = model.state_dict(), teacher.model.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert teacher.class_names == list(CLASSES) and teacher.num_classes == 3


def test_own_queries_answer_as_the_model_does(saved):
    from kd.modeling.detr.structures import QueryGroup

    family, model, teacher = saved
    batch = _batch()
    ref = _reference(family, model, batch)
    with torch.no_grad():
        encoded = teacher.encode(batch)
        own = QueryGroup(teacher.detection_anchors(encoded), teacher.detection_content(encoded))
        out = teacher.decode_groups(encoded, [own])[0]
    assert out.logits.shape[0] == teacher.num_decoder_layers
    torch.testing.assert_close(out.logits[-1], ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.boxes[-1], ref.pred_boxes, atol=1e-5, rtol=0)
    if family in ("rt_detr", "rt_detr_v2"):  # the model reports every layer
        torch.testing.assert_close(
            out.logits, ref.intermediate_logits.transpose(0, 1), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            out.boxes, ref.intermediate_reference_points.transpose(0, 1), atol=1e-5, rtol=0
        )
    # Its predictions (the teacher AP check) are the model's top sigmoid scores.
    with torch.no_grad():
        predictions = teacher(batch)
    expected = ref.logits.sigmoid().flatten(1).topk(30, dim=1).values
    for i, p in enumerate(predictions):
        assert p["instances"].image_size == (64, 64)
        torch.testing.assert_close(p["instances"].scores, expected[i], atol=1e-5, rtol=0)


def test_an_isolated_group_leaves_the_detection_queries_unchanged(saved):
    from kd.modeling.detr.structures import QueryGroup

    family, model, teacher = saved
    batch = _batch(1)
    points = torch.rand(2, 7, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    with torch.no_grad():
        encoded = teacher.encode(batch)
        own = QueryGroup(teacher.detection_anchors(encoded), teacher.detection_content(encoded))
        alone = teacher.decode_groups(encoded, [own])[0]
        points_alone = teacher.decode_groups(encoded, [QueryGroup(points)])[0]
        together = teacher.decode_groups(encoded, [own, QueryGroup(points)])
    torch.testing.assert_close(together[0].logits, alone.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[0].boxes, alone.boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1].logits, points_alone.logits, atol=1e-5, rtol=0)
    assert together[1].logits.shape == (teacher.num_decoder_layers, 2, 7, 3)


def test_probe_points_answer_one_by_one(saved):
    """probe_detr's "point" isolation (DETR -> Faster R-CNN): each point as if decoded alone."""
    from kd.probes import probe_detr

    family, model, teacher = saved
    points = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.2
    with torch.no_grad():
        encoded = teacher.encode(_batch(2))
        answer = probe_detr(teacher, encoded, points, isolation="point")
        for j in (0, 3):
            one = teacher.decode(encoded, None, points[:, j : j + 1])
            torch.testing.assert_close(
                answer.logits[:, :, j], one.logits[:, :, 0], atol=1e-5, rtol=0
            )
        valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
        grouped = probe_detr(teacher, encoded, points, isolation="group", valid=valid)
        first_two = teacher.decode(encoded, None, points[:, :2])
    torch.testing.assert_close(grouped.logits[:, 1, :2], first_two.logits[:, 1], atol=1e-5, rtol=0)


def test_images_of_another_size_are_resized_and_padded_as_the_processor_does(saved):
    family, model, teacher = saved
    batch = [
        {"image": torch.zeros(3, 32, 48, dtype=torch.uint8)},
        {"image": torch.zeros(3, 48, 32, dtype=torch.uint8)},
    ]
    pixels, mask = teacher.preprocess(batch)
    if family in NORMALISED:  # shortest edge 64 (longest 64): 43 x 64 and 64 x 43, padded
        assert pixels.shape == (2, 3, 64, 64)
        assert mask[0].sum(0)[0] == 43 and mask[0].sum(1)[0] == 64
        torch.testing.assert_close(pixels[0, :, 0, 0], (-MEAN / STD).flatten())
    else:  # fixed 64 x 64, no padding, no normalisation
        assert pixels.shape == (2, 3, 64, 64) and bool(mask.all())
        assert float(pixels.abs().max()) == 0.0


@pytest.mark.parametrize("family", REFUSED)
def test_learned_query_families_are_refused_in_one_line(family, tmp_path):
    from kd.families.hf_detr import HFDETRTeacher, HFTeacherError

    tiny_config(family, CLASSES).save_pretrained(str(tmp_path))
    with pytest.raises(HFTeacherError) as e:
        HFDETRTeacher.from_source(f"hf://{tmp_path}")
    message = str(e.value)
    assert "\n" not in message and "cannot express a box" in message
    assert "RT-DETR" in message and "D-FINE" in message and "two-stage Deformable DETR" in message


def test_weights_that_do_not_fit_are_refused(tmp_path, one_thread):
    from safetensors.torch import load_file, save_file

    from kd.families.hf_detr import HFDETRTeacher, HFTeacherError

    save_tiny("rt_detr", tmp_path, CLASSES)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    del state[sorted(k for k in state if "class_embed" in k)[0]]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(HFTeacherError, match="do not match|cannot be loaded"):
        HFDETRTeacher.from_source(f"hf://{tmp_path}")


def test_a_missing_folder_says_so(tmp_path):
    from kd.families.hf_detr import HFDETRTeacher, HFTeacherError

    with pytest.raises(HFTeacherError, match="save_pretrained"):
        HFDETRTeacher.from_source(f"hf://{tmp_path / 'nothing'}")


def test_a_bfloat16_teacher_answers_in_float32(tmp_path, one_thread):
    """KD.TEACHER.DTYPE: the decoder runs under the teacher's autocast, what it hands the
    distillers (memory, answers) is float32 and close to the float32 teacher's."""
    from kd.device import set_precision
    from kd.families.hf_detr import HFDETRTeacher
    from kd.modeling.detr.structures import QueryGroup

    save_tiny("rt_detr", tmp_path, CLASSES)
    teacher = HFDETRTeacher.from_source(f"hf://{tmp_path}").eval()
    points = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.2
    with torch.no_grad():
        ref = teacher.decode_groups(teacher.encode(_batch()), [QueryGroup(points)])[0]
        set_precision(teacher, torch.bfloat16, "cpu")
        encoded = teacher.encode(_batch())
        out = teacher.decode_groups(encoded, [QueryGroup(points)])[0]
    assert encoded.memory.dtype == out.logits.dtype == out.boxes.dtype == torch.float32
    assert not torch.equal(out.logits, ref.logits)  # it did run in bfloat16
    torch.testing.assert_close(out.logits, ref.logits, atol=0.1, rtol=0.05)
    torch.testing.assert_close(out.boxes, ref.boxes, atol=0.02, rtol=0)
