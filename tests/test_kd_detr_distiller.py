"""The KD-DETR distiller on tiny DETRs: the points both models answer, the isolation of the
detection path, the loss wiring (layers, point sets, foreground weights), the frozen teacher, a
short run through train_net.py and the answers mode of tools/visualize_points.py."""

import copy
import json
import math

import pytest
import torch
from conftest import (
    REPO,
    TINY_DETR_OPTS,
    assert_resume_equals_uninterrupted,
    build_cfg,
    load_script,
    run_train_net,
    save_untrained_teacher,
)

from kd.losses.kd_detr import kd_detr_loss, paired_giou_loss
from kd.meta_arch.kd_detr import GENERAL, SPECIFIC, KDDETRDistiller
from kd.modeling.detr import DecoderOutput

pytestmark = pytest.mark.usefixtures("one_thread", "event_storage")

KD_CONFIG = "configs/kd_shapes/detr_kd_detr.yaml"
NUM_GENERAL = 7

# Tiny two-stage DETRs with denoising (the kd_shapes family) on 64 px images.
TINY = TINY_DETR_OPTS
# The student differs from the teacher in depth and number of queries.
STUDENT = ["MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.NUM_QUERIES", "8"]
TEACHER = ["MODEL.DETR.DEC_LAYERS", "3", "MODEL.DETR.NUM_QUERIES", "10"]


@pytest.fixture(scope="module")
def teacher(datasets_root, tmp_path_factory):
    """(config file, weights) of a tiny, untrained DETR teacher."""
    return save_untrained_teacher(
        tmp_path_factory.mktemp("kd_detr_teacher"),
        "configs/kd_shapes/detr_teacher.yaml",
        [*TINY, *TEACHER],
        seed=1,
    )


def kd_opts(teacher, out_dir, *extra):
    config, weights = teacher
    return [
        *TINY,
        *STUDENT,
        "KD.TEACHER.CONFIG_FILE", config,
        "KD.TEACHER.WEIGHTS", weights,
        "KD.KD_DETR.NUM_GENERAL_POINTS", str(NUM_GENERAL),
        "OUTPUT_DIR", str(out_dir),
        *extra,
    ]  # fmt: skip


def build(teacher, tmp_path, *extra) -> KDDETRDistiller:
    from detectron2.modeling import build_model

    model = build_model(build_cfg(KD_CONFIG, kd_opts(teacher, tmp_path, *extra)))
    model.train()
    return model


@pytest.fixture(scope="module")
def batch(datasets_root):
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    cfg = build_cfg("configs/kd_shapes/detr_student.yaml", TINY)
    mapper = DatasetMapper(cfg, True)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)[:2]
    torch.manual_seed(0)
    return [mapper(copy.deepcopy(d)) for d in dicts]


def record(model, name: str, calls: list):
    """Record every call of ``model.<name>`` (arguments and result) into ``calls``."""
    original = getattr(model, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    object.__setattr__(model, name, wrapper)


def test_both_models_answer_the_same_points_new_ones_every_step(teacher, tmp_path, batch):
    model = build(teacher, tmp_path)
    t_calls, s_calls, t_encoded = [], [], []
    record(model.teacher, "decode_groups", t_calls)
    record(model.student, "decode_groups", s_calls)
    record(model.teacher, "encode", t_encoded)
    for _ in range(2):
        model(batch)
    assert len(t_calls) == len(s_calls) == 2
    steps = []
    for (t_args, t_out), (s_args, s_out), (_, encoded) in zip(t_calls, s_calls, t_encoded):
        t_groups, s_groups = t_args[1], s_args[1]
        assert len(t_groups) == len(s_groups) == 2  # general, then specific
        for t_group, s_group in zip(t_groups, s_groups):
            assert torch.equal(t_group.anchors, s_group.anchors)
            # Zero content for the student, and (default) for the teacher too.
            assert t_group.content is None and s_group.content is None
        general, specific = (g.anchors for g in t_groups)
        assert general.shape == (2, NUM_GENERAL, 4)
        assert ((general > 0) & (general < 1)).all()
        # Specific points: the two-stage teacher's own selected proposals for these images.
        assert torch.equal(specific, encoded.anchors)
        assert specific.shape == (2, 10, 4)
        # Every student decoder layer answers; the teacher's answers come from all its layers.
        assert s_out[0].logits.shape[:3] == (2, 2, NUM_GENERAL)
        assert t_out[0].logits.shape[:3] == (3, 2, NUM_GENERAL)
        steps.append((general, specific))
    assert not torch.allclose(steps[0][0], steps[1][0]), "general points must be redrawn"
    assert torch.equal(steps[0][1], steps[1][1]), "same images, same teacher: same specific points"

    # The points come from the global RNG the trainer checkpoints: the same state, the same points.
    torch.manual_seed(3)
    model(batch)
    torch.manual_seed(3)
    model(batch)
    assert torch.equal(t_calls[-1][0][1][0].anchors, t_calls[-2][0][1][0].anchors)


def test_teacher_encodes_first_with_the_results_of_the_student_first_order(
    teacher, tmp_path, batch
):
    """The KD step encodes with the teacher before the student's forward (less fresh memory a
    step); its losses equal, bit for bit, and its gradients to float rounding, the step in the
    order that makes the teacher wait for the student's detection pass, written out here."""
    from kd.modeling.detr import QueryGroup

    model = build(teacher, tmp_path)
    order = []
    for who in ("teacher", "student"):
        encode = getattr(model, who).encode
        object.__setattr__(
            getattr(model, who), "encode", lambda x, f=encode, w=who: order.append(w) or f(x)
        )
    torch.manual_seed(5)
    losses = model(batch)
    assert order == ["teacher", "student"]
    sum(losses[k] for k in sorted(losses)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(5)
    student, t_model = model.student, model.teacher
    s_inputs = model.student_inputs(batch)
    encoded = student.encode(s_inputs)
    expected = student.forward_encoded(encoded, s_inputs)  # denoising draws its noise first
    with torch.no_grad():
        t_encoded = t_model.encode(model.teacher_inputs(batch))
        points = [torch.rand(2, NUM_GENERAL, 4), t_encoded.anchors.clone()]  # general, specific
        t_out = t_model.decode_groups(t_encoded, [QueryGroup(p) for p in points])
    s_out = student.decode_groups(encoded, [QueryGroup(p) for p in points])
    expected.update(
        model.distillation_losses(
            dict(zip([GENERAL, SPECIFIC], s_out)), dict(zip([GENERAL, SPECIFIC], t_out))
        )
    )
    assert sorted(losses) == sorted(expected)
    for k in losses:
        assert torch.equal(losses[k], expected[k]), k
    sum(expected[k] for k in sorted(expected)).backward()
    reached = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(reached) == sorted(grads) and len(grads) > 50
    # Gradients to float rounding: oneDNN's convolution weight-gradient reduction may sum in
    # another order from one call to the next (about one run in five differed in the backbone's
    # stem conv, by a few ulps), whatever order the distiller runs in.
    for name, grad in reached.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_learned_teacher_content_for_specific_points(teacher, tmp_path, batch):
    model = build(teacher, tmp_path, "KD.KD_DETR.SPECIFIC_TEACHER_CONTENT", "learned")
    t_calls = []
    record(model.teacher, "decode_groups", t_calls)
    model(batch)
    general, specific = t_calls[0][0][1]
    assert general.content is None
    expected = model.teacher.query_content.weight[None].expand(2, -1, -1)
    assert torch.equal(specific.content, expected)


def test_detection_path_is_unaffected_by_the_distillation_queries(teacher, tmp_path, batch):
    """The student's detection (and denoising) losses are exactly those of the student alone,
    and the distillation loss reaches no parameter that only the detection queries use."""
    model = build(teacher, tmp_path)
    torch.manual_seed(11)
    losses = model(batch)
    torch.manual_seed(11)
    alone = model.student(batch)
    assert {k for k in losses if not k.startswith("loss_kd_")} == set(alone)
    assert any("_dn" in k for k in alone), "denoising is on in this test"
    for k, v in alone.items():
        assert losses[k].item() == pytest.approx(v.item(), rel=1e-6, abs=1e-7), k

    kd = sum(v for k, v in losses.items() if k.startswith("loss_kd_kd_detr_"))
    model.zero_grad()
    kd.backward()
    student = model.student
    # Detection-only parts: the learned content queries, the encoder proposal heads, the
    # denoising label embedding. Shared parts (decoder, encoder, backbone) do learn from KD.
    for name, param in student.named_parameters():
        grad = param.grad
        reached = grad is not None and grad.abs().sum() > 0
        if name.startswith(("query_content", "query_selection", "denoising")):
            assert not reached, name
    assert student.decoder.class_heads[0].weight.grad.abs().sum() > 0
    assert student.backbone.stem.conv1.weight.grad.abs().sum() > 0


def test_loss_wiring_hand_computed():
    """distillation_losses: per set a mean over its points, summed over sets and the distilled
    student layers, every one against the teacher's final layer, weighted by its confidence."""
    log3 = math.log(3.0)
    # Teacher (3 layers, 2 classes): only its last layer counts; earlier layers are decoys.
    # Final logits: point 0 [log 3, 0] -> w = 3/4; point 1 [0, -log 3] -> w = 1/2.
    t_logits = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    t_logits[-1, 0] = torch.tensor([[log3, 0.0], [0.0, -log3]])
    t_logits[:-1] = 5.0
    t_boxes = torch.full((3, 1, 2, 4), 0.5, dtype=torch.float64)
    t_boxes[-1, 0] = torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.4, 0.4, 0.3, 0.3]])
    teacher_out = DecoderOutput(t_logits, t_boxes, t_logits)
    # Student (2 layers): the same class logits (KL 0); boxes off by known amounts per layer.
    s_logits = t_logits[-1:].expand(2, -1, -1, -1).clone()
    s_boxes = torch.tensor(
        [
            [[[0.5, 0.5, 0.2, 0.2], [0.4, 0.4, 0.2, 0.2]]],  # layer 0: L1 0.1, 0.2
            [[[0.6, 0.5, 0.2, 0.2], [0.4, 0.4, 0.4, 0.3]]],  # layer 1: L1 0.0, 0.1
        ],
        dtype=torch.float64,
    )
    student_out = DecoderOutput(s_logits, s_boxes, s_logits)
    giou = paired_giou_loss(s_boxes, t_boxes[-1:].expand(2, -1, -1, -1))[:, 0]  # (layer, point)
    w = [0.75, 0.5]
    l1 = [[0.1, 0.2], [0.0, 0.1]]

    def distiller(**kwargs):
        model = KDDETRDistiller.__new__(KDDETRDistiller)
        torch.nn.Module.__init__(model)
        defaults = dict(
            temperature=10.0, cls_weight=1.0, l1_weight=5.0, giou_weight=2.0,
            foreground_weight=True, normalize="num_queries",
        )  # fmt: skip
        defaults.update(kwargs.pop("loss", {}))
        model.loss_kwargs = defaults
        model.student_layers = kwargs.get("student_layers", [0, 1])
        model.teacher_layer = 2
        return model

    # Two sets (general and specific with the same values) and both student layers.
    sets = {GENERAL: student_out, SPECIFIC: student_out}
    t_sets = {GENERAL: teacher_out, SPECIFIC: teacher_out}
    out = distiller().distillation_losses(sets, t_sets)
    assert set(out) == {"loss_kd_kd_detr_cls", "loss_kd_kd_detr_l1", "loss_kd_kd_detr_giou"}
    expected_l1 = 2 * sum(5.0 * (w[0] * l1[k][0] + w[1] * l1[k][1]) / 2 for k in range(2))
    expected_giou = 2 * sum(2.0 * (w[0] * giou[k, 0] + w[1] * giou[k, 1]) / 2 for k in range(2))
    assert out["loss_kd_kd_detr_cls"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["loss_kd_kd_detr_l1"].item() == pytest.approx(expected_l1)
    assert out["loss_kd_kd_detr_giou"].item() == pytest.approx(float(expected_giou))

    # Only the last student layer; without the foreground weight; one set.
    out = distiller(student_layers=[1], loss=dict(foreground_weight=False)).distillation_losses(
        {GENERAL: student_out}, {GENERAL: teacher_out}
    )
    assert out["loss_kd_kd_detr_l1"].item() == pytest.approx(5.0 * (0.0 + 0.1) / 2)

    # The default normalisation: per set, a weighted mean (divided by w_0 + w_1 = 1.25).
    out = distiller(loss=dict(normalize="weight_sum")).distillation_losses(sets, t_sets)
    expected_l1 = 2 * sum(5.0 * (w[0] * l1[k][0] + w[1] * l1[k][1]) / 1.25 for k in range(2))
    assert out["loss_kd_kd_detr_l1"].item() == pytest.approx(expected_l1)

    # The KL at T = 10: teacher [10 log 3, 0] -> p_t = [3/4, 1/4], student [0, 0] -> [1/2, 1/2];
    # w = sigmoid(10 log 3) = 3^10 / (3^10 + 1).
    t_logits = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    t_logits[..., 0] = 10 * log3
    box = torch.full((1, 1, 1, 4), 0.5, dtype=torch.float64)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    model = distiller(student_layers=[0])
    model.teacher_layer = 0
    out = model.distillation_losses(
        {GENERAL: DecoderOutput(torch.zeros_like(t_logits), box, box)},
        {GENERAL: DecoderOutput(t_logits, box, box)},
    )
    assert out["loss_kd_kd_detr_cls"].item() == pytest.approx(3**10 / (3**10 + 1) * 100 * kl)


def test_forward_uses_the_configured_layers_and_sets(teacher, tmp_path, batch, event_storage):
    """The distiller's loss equals the pure loss on the answers it decoded, for the layers and
    point sets the config selects; ablation switches remove sets; nothing on: no teacher."""
    cases = {
        (): ([GENERAL, SPECIFIC], [0, 1]),
        ("KD.KD_DETR.STUDENT_LAYERS", "[-1]"): ([GENERAL, SPECIFIC], [1]),
        ("KD.KD_DETR.NUM_GENERAL_POINTS", "0"): ([SPECIFIC], [0, 1]),
        ("KD.KD_DETR.SPECIFIC_POINTS", "False", "KD.KD_DETR.FOREGROUND_WEIGHT", "False"): (
            [GENERAL],
            [0, 1],
        ),
    }
    for extra, (sets, layers) in cases.items():
        model = build(teacher, tmp_path, *extra)
        t_calls, s_calls = [], []
        record(model.teacher, "decode_groups", t_calls)
        record(model.student, "decode_groups", s_calls)
        losses = model(batch)
        t_out, s_out = t_calls[0][1], s_calls[0][1]
        assert len(t_out) == len(s_out) == len(sets), extra
        weighted = "KD.KD_DETR.FOREGROUND_WEIGHT" not in extra
        expected = {"cls": 0.0, "l1": 0.0, "giou": 0.0}
        for t, s in zip(t_out, s_out):
            for layer in layers:
                terms = kd_detr_loss(
                    s.logits[layer], s.boxes[layer], t.logits[-1], t.boxes[-1],
                    foreground_weight=weighted, normalize="weight_sum",
                )  # fmt: skip
                for k, v in terms.items():
                    expected[k] += v.item()
        for k, v in expected.items():
            assert losses[f"loss_kd_kd_detr_{k}"].item() == pytest.approx(v, rel=1e-5), (extra, k)
    assert "kd_detr/general_foreground_weight" in event_storage.latest()

    model = build(
        teacher,
        tmp_path,
        "KD.KD_DETR.NUM_GENERAL_POINTS", "0",
        "KD.KD_DETR.SPECIFIC_POINTS", "False",
    )  # fmt: skip
    t_calls = []
    record(model.teacher, "encode", t_calls)
    losses = model(batch)
    assert not [k for k in losses if k.startswith("loss_kd_")] and not t_calls


def test_low_resolution_student_answers_the_same_relative_points(teacher, tmp_path, batch):
    """Points are relative to each image, so a student at half resolution is asked about the
    same regions as the teacher at full resolution."""
    model = build(teacher, tmp_path, "KD.STUDENT.INPUT_SCALE", "0.5")
    t_calls, s_calls = [], []
    record(model.teacher, "decode_groups", t_calls)
    record(model.student, "encode", s_calls)
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert s_calls[0][1].image_sizes == [(32, 32)] * 2
    assert t_calls[0][1][0].logits.shape[2] == NUM_GENERAL


def test_bad_configurations_are_refused(teacher, tmp_path):
    with pytest.raises(ValueError, match="STUDENT_LAYERS"):
        build(teacher, tmp_path, "KD.KD_DETR.STUDENT_LAYERS", "[2]")
    with pytest.raises(ValueError, match="GENERAL_DISTRIBUTION"):
        build(teacher, tmp_path, "KD.KD_DETR.GENERAL_DISTRIBUTION", "gaussian")
    with pytest.raises(ValueError, match="needs a DETR student"):
        build(
            teacher,
            tmp_path,
            "KD.STUDENT.META_ARCHITECTURE", "GeneralizedRCNN",
            "MODEL.ROI_HEADS.NUM_CLASSES", "7",
        )  # fmt: skip


def test_teacher_frozen_and_eval_mode_is_the_student(teacher, tmp_path, batch):
    model = build(teacher, tmp_path, "KD.KD_DETR.GENERAL_DISTRIBUTION", "sigmoid_normal")
    assert not any(k.startswith("teacher.") for k in model.state_dict())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    assert not model.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k

    model.eval()
    with torch.no_grad():
        ours = model(batch)[0]["instances"]
        alone = model.student(batch)[0]["instances"]
    assert torch.equal(ours.pred_boxes.tensor, alone.pred_boxes.tensor)
    assert torch.equal(ours.scores, alone.scores)


def test_train_net_trains_and_evaluates(teacher, datasets_root, tmp_path):
    out = tmp_path / "run"
    run_train_net(["--config-file", str(REPO / KD_CONFIG), *kd_opts(teacher, out)], datasets_root)
    results = json.loads((out / "eval_results.json").read_text())
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last = [r for r in records if "loss_kd_kd_detr_cls" in r][-1]
    for term in ("cls", "l1", "giou"):
        assert math.isfinite(last[f"loss_kd_kd_detr_{term}"]), term
    assert "loss_class" in last and "loss_class_dn" in last


def test_resume_equals_uninterrupted(teacher, datasets_root, tmp_path):
    """The general points are drawn from the global RNG every step: a resumed run draws the same
    ones as an uninterrupted run only if the checkpoint restores the RNG state."""
    assert_resume_equals_uninterrupted(
        str(REPO / KD_CONFIG), lambda out: kd_opts(teacher, out), datasets_root, tmp_path
    )


def test_visualize_points_answers_mode(teacher, tmp_path):
    tool = load_script("tools/visualize_points.py")
    out = tmp_path / "vis"
    totals = tool.main(
        [
            "--config-file", str(REPO / KD_CONFIG),
            "--output", str(out),
            "--num-images", "2",
            "--top-k", "3",
            *kd_opts(teacher, tmp_path),
        ]
    )  # fmt: skip
    assert len(list(out.glob("*.png"))) == 2
    assert set(totals) == {GENERAL, SPECIFIC}
    assert totals[GENERAL]["points"] == 2 * NUM_GENERAL and totals[SPECIFIC]["points"] == 2 * 10
    for stats in totals.values():
        assert 0 <= stats["answer_iou"] <= 1 and 0 <= stats["teacher_score"] <= 1
    assert json.loads((out / "summary.json").read_text())["answers"] == totals


def test_prepare_point_decoding_decodes_the_kd_step_points(teacher, tmp_path, batch):
    """tools/benchmark_kd.py's hook: the closure decodes the points with both models as the KD
    step does (checked against decoding them directly), encodes nothing and can run again."""
    from kd.modeling.detr import QueryGroup

    model = build(teacher, tmp_path, "KD.KD_DETR.SPECIFIC_TEACHER_CONTENT", "learned")
    decode = model.prepare_point_decoding(batch)
    assert callable(decode)
    encodes, t_calls = [], []
    record(model.teacher, "encode", encodes)
    record(model.student, "encode", encodes)
    record(model.teacher, "decode_groups", t_calls)
    with torch.no_grad():
        points, t_out, s_out = decode()
    assert not encodes, "the encoders are the student's and the teacher's phases' to time"
    assert len(t_calls) == 1 and t_calls[0][0][1][1].content is not None  # the KD step's groups
    assert list(points) == list(t_out) == list(s_out) == [GENERAL, SPECIFIC]
    assert points[GENERAL].shape == (2, NUM_GENERAL, 4) and points[SPECIFIC].shape == (2, 10, 4)

    with torch.no_grad():
        t_encoded = model.teacher.encode(model.teacher_inputs(batch))
        content = model.teacher.query_content.weight[None].expand(2, -1, -1)
        t_expected = model.teacher.decode_groups(
            t_encoded,
            [QueryGroup(points[GENERAL]), QueryGroup(points[SPECIFIC], content)],
        )
        s_encoded = model.student.encode(model.student_inputs(batch))
        s_expected = model.student.decode_groups(
            s_encoded, [QueryGroup(points[GENERAL]), QueryGroup(points[SPECIFIC])]
        )
    assert torch.equal(points[SPECIFIC], t_encoded.anchors)
    for name, t_exp, s_exp in zip(points, t_expected, s_expected):
        m = points[name].shape[1]
        assert t_out[name].logits.shape[:3] == (3, 2, m)  # every teacher layer
        assert s_out[name].logits.shape[:3] == (2, 2, m)  # every student layer
        assert not s_out[name].logits.requires_grad
        torch.testing.assert_close(t_out[name].logits, t_exp.logits)
        torch.testing.assert_close(t_out[name].boxes, t_exp.boxes)
        torch.testing.assert_close(s_out[name].logits, s_exp.logits)
        torch.testing.assert_close(s_out[name].boxes, s_exp.boxes)
    # The benchmark calls each closure once per round.
    with torch.no_grad():
        again = decode()
    assert torch.equal(again[1][GENERAL].logits, t_out[GENERAL].logits)
    # With gradients (benchmark_kd's train floor), the student's answers have a graph down to its
    # encoder memory, as in the KD step; the teacher's never do.
    s_calls = []
    record(model.student, "decode_groups", s_calls)
    _, t_grad, s_grad = decode()
    assert s_grad[GENERAL].logits.requires_grad and not t_grad[GENERAL].logits.requires_grad
    memory = s_calls[0][0][0].memory  # the encoding the closure decodes from
    s_grad[GENERAL].logits.sum().backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0
