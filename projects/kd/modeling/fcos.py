"""detectron2's FCOS, buildable from a yacs config (``MODEL.FCOS.*``, see ``kd.config``).

detectron2 v0.6 ships :class:`detectron2.modeling.meta_arch.fcos.FCOS` for its lazy configs only:
it has no ``from_config`` and is not in ``META_ARCH_REGISTRY``. This subclass adds both, and
computes the losses in float32 under AMP; it changes nothing else, so a checkpoint of it loads into
detectron2's own FCOS and vice versa.
"""

from typing import List

from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead
from torch import Tensor, nn

from kd.compat import group_norm

__all__ = ["FCOS"]


class FCOS(_D2FCOS):
    """FCOS (Tian et al., ICCV 2019) as implemented by detectron2, built from ``MODEL.FCOS``."""

    @configurable
    def __init__(self, *, input_format: str = "BGR", vis_period: int = 0, **kwargs):
        """
        Args:
            input_format: the channel order of the input images (``INPUT.FORMAT``), used by
                :meth:`visualize_training`.
            vis_period: kept for interface parity with RetinaNet (detectron2's FCOS does not
                visualise during training).
            kwargs: arguments of :class:`detectron2.modeling.meta_arch.fcos.FCOS`.
        """
        super().__init__(**kwargs)
        self.input_format = input_format
        self.vis_period = vis_period

    def losses(
        self,
        anchors,
        pred_logits: List[Tensor],
        gt_labels: List[Tensor],
        pred_anchor_deltas: List[Tensor],
        gt_boxes: List[Tensor],
        pred_centerness: List[Tensor],
    ):
        # Under autocast the head's outputs are half precision and the targets float32: v0.6's
        # GIoU loss (fvcore) then fails writing float32 values into a half tensor. The losses are
        # float32 computations anyway (sums over every location).
        def full(ts: List[Tensor]) -> List[Tensor]:
            return [t.float() for t in ts]

        return super().losses(
            anchors,
            full(pred_logits),
            gt_labels,
            full(pred_anchor_deltas),
            gt_boxes,
            full(pred_centerness),
        )

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        c = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in c.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES {missing} are not outputs of the backbone "
                f"({sorted(shapes)}); FCOS on P3-P7 needs MODEL.BACKBONE.NAME "
                "build_retinanet_resnet_fpn_backbone"
            )
        feature_shapes = [shapes[f] for f in c.IN_FEATURES]
        head = FCOSHead(
            input_shape=feature_shapes,
            num_classes=c.NUM_CLASSES,
            conv_dims=[feature_shapes[0].channels] * c.NUM_CONVS,
            norm=group_norm if c.HEAD_NORM == "GN" else c.HEAD_NORM,
            prior_prob=c.PRIOR_PROB,
        )
        nn.init.constant_(head.bbox_pred.bias, c.BBOX_REG_BIAS_INIT)
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(c.IN_FEATURES),
            "num_classes": c.NUM_CLASSES,
            "center_sampling_radius": c.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": c.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": c.FOCAL_LOSS_GAMMA,
            "test_score_thresh": c.TEST_SCORE_THRESH,
            "test_topk_candidates": c.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": c.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "vis_period": cfg.VIS_PERIOD,
        }


# A newer detectron2 (or another package) may register its own "FCOS": keep that one.
if "FCOS" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(FCOS)
