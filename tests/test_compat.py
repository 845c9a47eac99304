"""Workarounds for detectron2 v0.6 in kd.compat."""

import pytest
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

import kd  # noqa: F401  (applies the runtime fixes)
from kd.config import add_kd_config


def test_retinanet_head_accepts_group_norm():
    # v0.6 probes the norm with get_norm("GN", 1) = GroupNorm(32, 1), which raises; with the fix
    # the head is built with detectron2's GroupNorm(32, C) after every tower convolution.
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.MODEL.RETINANET.NORM = "GN"
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    head = RetinaNetHead(cfg, [ShapeSpec(channels=64, stride=s) for s in (8, 16)])
    norms = [m for m in head.cls_subnet if isinstance(m, nn.GroupNorm)]
    assert [(n.num_groups, n.num_channels) for n in norms] == [(32, 64), (32, 64)]
    from kd.compat import group_norm

    # Narrow heads keep 2 channels a group (a 1x1 map of one image must be normalisable).
    assert group_norm(32).num_groups == 16 and group_norm(256).num_groups == 32
    assert sum(isinstance(m, nn.GroupNorm) for m in head.bbox_subnet) == 2


def test_map_dataset_falls_back_when_the_mapper_returns_none():
    # v0.6 draws the fallback with random.sample on a set, a TypeError since Python 3.11.
    from detectron2.data.common import MapDataset

    good = {0, 2, 4}
    dataset = MapDataset(list(range(6)), lambda x: ("mapped", x) if x in good else None)
    drawn = [dataset[i] for i in (1, 3, 5, 1, 3, 5, 0)]
    assert all(tag == "mapped" and x in good for tag, x in drawn)
    assert drawn[-1] == ("mapped", 0)  # a good index is mapped as itself
    # Only indices that the mapper failed on leave the candidates; the others stay drawable.
    assert sorted(dataset._fallback_candidates) == [0, 2, 4]
    # The same index falls back to the same item in a new dataset: the fallback RNG is seeded.
    again = MapDataset(list(range(6)), lambda x: ("mapped", x) if x in good else None)
    assert [again[i] for i in (1, 3, 5, 1, 3, 5, 0)] == drawn


def test_runtime_fixes_are_idempotent():
    from detectron2.data.common import MapDataset

    from kd.compat import apply_runtime_fixes

    init, getitem = MapDataset.__init__, MapDataset.__getitem__
    apply_runtime_fixes()
    assert (MapDataset.__init__, MapDataset.__getitem__) == (init, getitem)


def test_float_keys_take_whole_numbers(tmp_path):
    """`KD.TEACHER.MIN_AP 0` (DESIGN's spelling) and `BASE_LR: 1` in a YAML: yacs alone refuses
    an int for a float key; the value becomes the float, and a non-number is still refused."""
    from detectron2.config import get_cfg

    from kd.config import add_kd_config

    cfg = get_cfg()
    add_kd_config(cfg)
    cfg.merge_from_list(["KD.TEACHER.MIN_AP", "0"])
    assert cfg.KD.TEACHER.MIN_AP == 0.0 and type(cfg.KD.TEACHER.MIN_AP) is float
    (tmp_path / "c.yaml").write_text("SOLVER:\n  BASE_LR: 1\n")
    cfg.merge_from_file(str(tmp_path / "c.yaml"))
    assert cfg.SOLVER.BASE_LR == 1.0 and type(cfg.SOLVER.BASE_LR) is float
    with pytest.raises(ValueError, match="Type mismatch"):
        cfg.merge_from_list(["SOLVER.BASE_LR", "fast"])
    with pytest.raises(ValueError, match="Type mismatch"):
        cfg.merge_from_list(["SOLVER.MAX_ITER", "2.5"])  # a float for an int key stays refused
