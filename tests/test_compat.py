"""Workarounds for detectron2 v0.6 in kd.compat."""

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
