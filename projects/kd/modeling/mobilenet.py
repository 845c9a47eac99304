"""MobileNetV2 backbones for detectron2 whose body is torchvision's ``mobilenet_v2``.

The model definition is torchvision's: the backbone keeps ``mobilenet_v2().features`` (its
module names too, ``features.N.*``, so torchvision state dicts load as they are) and reads named
outputs at stage boundaries:

======  ==================  ======  ========
name    torchvision layers  stride  channels
======  ==================  ======  ========
stem    features[0:2]       2       16
m2      features[2:4]       4       24
m3      features[4:7]       8       32
m4      features[7:14]      16      96
m5      features[14:18]     32      320
======  ==================  ======  ========

(``features[18]``, the 1x1 conv to 1280 channels in front of the classifier, is left out, as
detection necks on MobileNetV2 usually do.) ``MODEL.BACKBONE.FREEZE_AT`` counts these stages as
detectron2's ResNet counts its own: 1 freezes the stem, 2 the stem and m2, and so on.

ImageNet initialisation (``MODEL.MOBILENET.IMAGENET_WEIGHTS``) reads torchvision's own file from
its cache, ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``), where
``make setup`` puts it (``tools/install_imagenet_weights.py``) and where torchvision downloads
it on a machine with internet. The whole file's sha256 is checked before it is read; a missing or
different file is an error that names the fix, never a silently random backbone.

Builders (``MODEL.BACKBONE.NAME``):

* ``build_mobilenetv2_backbone``: the named outputs alone (``MODEL.MOBILENET.OUT_FEATURES``),
  e.g. for the DETR family (``MODEL.DETR.IN_FEATURES``);
* ``build_mobilenetv2_fpn_backbone``: detectron2's ``FPN`` on ``MODEL.FPN.IN_FEATURES`` with P6
  max-pooled from P5, as R-CNN's FPN (Faster R-CNN);
* ``build_mobilenetv2_retinanet_fpn_backbone``: the same FPN with P6 and P7 computed from P5 by
  stride-2 convolutions, as detectron2's FCOS (RetinaNet, FCOS).
"""

import hashlib
import os
from typing import Dict, List, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import Tensor, nn

from kd.weights import load_checkpoint_file

__all__ = [
    "IMAGENET_PIXEL_MEAN",
    "IMAGENET_PIXEL_STD",
    "IMAGENET_SHA256",
    "ImageNetWeightsError",
    "MobileNetV2",
    "build_mobilenetv2_backbone",
    "build_mobilenetv2_fpn_backbone",
    "build_mobilenetv2_retinanet_fpn_backbone",
    "imagenet_weights_path",
    "sha256_of",
    "verify_imagenet_weights",
]

# Stage name -> (first, end) index into torchvision's ``features``, and its output stride.
STAGES = {
    "stem": (0, 2, 2),
    "m2": (2, 4, 4),
    "m3": (4, 7, 8),
    "m4": (7, 14, 16),
    "m5": (14, 18, 32),
}
# sha256 of the whole file of each torchvision weights entry we accept. torchvision's own check
# compares only the 8 hex digits in the file name, and only when it downloads.
IMAGENET_SHA256 = {
    "IMAGENET1K_V1": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}
# What torchvision's ImageNet weights expect: RGB in 0-255, normalised with these (its
# transforms' [0.485, 0.456, 0.406] and [0.229, 0.224, 0.225], times 255).
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)
_FIX = "run `make setup` or `python tools/install_imagenet_weights.py`"


class ImageNetWeightsError(RuntimeError):
    """The configured ImageNet weights file is missing or not the expected file."""


def _weights_enum(name: str):
    from torchvision.models import MobileNet_V2_Weights

    if name not in IMAGENET_SHA256:
        raise ValueError(
            f"MODEL.MOBILENET.IMAGENET_WEIGHTS {name!r} is not known: use one of "
            f"{sorted(IMAGENET_SHA256)} (torchvision's MobileNet_V2_Weights), or '' for a "
            "randomly initialised backbone"
        )
    return MobileNet_V2_Weights[name]


def imagenet_weights_path(name: str = "IMAGENET1K_V1") -> str:
    """Where torchvision keeps the file of weights ``name``: its hub cache
    (``torch.hub.get_dir()/checkpoints/``, i.e. ``$TORCH_HOME/hub/checkpoints``)."""
    url = _weights_enum(name).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def sha256_of(path: str) -> str:
    """The sha256 of a file's contents, as a hex string."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_imagenet_weights(name: str = "IMAGENET1K_V1") -> str:
    """Check that torchvision's cache holds the expected file of weights ``name``.

    Args:
        name: a ``MobileNet_V2_Weights`` entry, e.g. "IMAGENET1K_V1".

    Returns:
        The file's path.

    Raises:
        ImageNetWeightsError: the file is missing or its sha256 differs; the message names the fix.
    """
    path = imagenet_weights_path(name)
    if not os.path.isfile(path):
        raise ImageNetWeightsError(
            f"MobileNetV2 ImageNet weights {name} not found at {path} (torchvision's cache, "
            f"$TORCH_HOME/hub/checkpoints). Fix: {_FIX}; or set MODEL.MOBILENET.IMAGENET_WEIGHTS "
            "'' to train from random initialisation on purpose."
        )
    actual = sha256_of(path)
    if actual != IMAGENET_SHA256[name]:
        raise ImageNetWeightsError(
            f"MobileNetV2 ImageNet weights {path} are not torchvision's {name} file (sha256 "
            f"{actual}, expected {IMAGENET_SHA256[name]}): corrupted or replaced. Fix: delete it "
            f"and {_FIX}."
        )
    return path


def _load_torchvision_mobilenet_v2(imagenet_weights: str) -> nn.Module:
    """torchvision's ``mobilenet_v2``, with the verified ImageNet weights when asked for.

    The file is read with the project's safe loader (``torch.load(weights_only=True)``) into
    torchvision's model; torchvision's own ``weights=`` path reads it with a full unpickler.
    """
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None)
    if imagenet_weights:
        path = verify_imagenet_weights(imagenet_weights)
        model.load_state_dict(load_checkpoint_file(path)["model"])
    return model


class MobileNetV2(Backbone):
    """torchvision's MobileNetV2 ``features`` with detectron2's named outputs (see module doc)."""

    def __init__(
        self,
        *,
        out_features: Sequence[str],
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        imagenet_weights: str = "",
    ):
        """
        Args:
            out_features: stage names to output, among "stem", "m2".."m5".
            norm: "FrozenBN" (every BatchNorm converted to detectron2's FrozenBatchNorm2d, the
                usual choice when fine-tuning ImageNet weights with small batches) or "BN"
                (torchvision's BatchNorm2d, trained).
            freeze_at: freeze (no gradient, FrozenBN) the first this many stages: 0 none,
                1 the stem, 2 the stem and m2, ...
            imagenet_weights: a ``MobileNet_V2_Weights`` entry ("IMAGENET1K_V1") whose file must
                be in torchvision's cache, or "" for random initialisation.
        """
        super().__init__()
        unknown = [f for f in out_features if f not in STAGES]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.MOBILENET.OUT_FEATURES {list(out_features)}: each must be one of "
                f"{list(STAGES)}"
            )
        if norm not in ("FrozenBN", "BN"):
            raise ValueError(f"MODEL.MOBILENET.NORM must be 'FrozenBN' or 'BN', got {norm!r}")
        if not 0 <= freeze_at <= len(STAGES):
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must be in 0..{len(STAGES)}: {freeze_at}")
        names = list(STAGES)
        self._out_features = sorted(out_features, key=names.index)
        last = max(names.index(f) for f in out_features)
        # Slicing keeps torchvision's module names (features.0 ... features.17).
        self.features = _load_torchvision_mobilenet_v2(imagenet_weights).features[
            : STAGES[names[last]][1]
        ]
        if norm == "FrozenBN":
            self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)
        self._ends = {STAGES[n][1]: n for n in names[: last + 1]}
        for name in names[:freeze_at]:
            first, end, _ = STAGES[name]
            for i in range(first, min(end, len(self.features))):
                layer = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features[i])
                for p in layer.parameters():
                    p.requires_grad_(False)
                self.features[i] = layer
        self._out_feature_strides = {n: STAGES[n][2] for n in self._out_features}
        self._out_feature_channels = {
            n: self._stage_channels(STAGES[n][1] - 1) for n in self._out_features
        }

    def _stage_channels(self, index: int) -> int:
        convs = [m for m in self.features[index].modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x: (N, 3, H, W) normalised RGB images.

        Returns:
            The stages named in ``out_features``, by name.
        """
        if x.dim() != 4:
            raise ValueError(f"MobileNetV2 takes (N, C, H, W) inputs, got shape {tuple(x.shape)}")
        outputs = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            name = self._ends.get(i + 1)
            if name in self._out_feature_strides:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }


def _check_pixel_format(cfg: CfgNode) -> None:
    """ImageNet weights see the pixels they were trained on, or the run stops here."""
    wrong = []
    if cfg.INPUT.FORMAT != "RGB":
        wrong.append(f'INPUT.FORMAT "RGB" (is {cfg.INPUT.FORMAT!r})')
    for key, expected in (("PIXEL_MEAN", IMAGENET_PIXEL_MEAN), ("PIXEL_STD", IMAGENET_PIXEL_STD)):
        value = list(cfg.MODEL[key])
        if len(value) != 3 or any(abs(a - b) > 1e-3 for a, b in zip(value, expected)):
            wrong.append(f"MODEL.{key} {list(expected)} (is {value})")
    if wrong:
        raise ValueError(
            "MODEL.MOBILENET.IMAGENET_WEIGHTS: torchvision's ImageNet weights expect RGB images in "
            "0-255 normalised with ImageNet's mean and std; set " + ", ".join(wrong)
        )


def _mobilenet_from_config(cfg: CfgNode, out_features: List[str]) -> MobileNetV2:
    m = cfg.MODEL.MOBILENET
    if m.IMAGENET_WEIGHTS:
        _check_pixel_format(cfg)
    return MobileNetV2(
        out_features=out_features,
        norm=m.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        imagenet_weights=m.IMAGENET_WEIGHTS,
    )


def _check_input(input_shape: ShapeSpec) -> None:
    if input_shape.channels != 3:
        raise ValueError(
            f"MobileNetV2 takes 3-channel images; MODEL.PIXEL_MEAN has {input_shape.channels}"
        )


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """MobileNetV2 with the outputs ``MODEL.MOBILENET.OUT_FEATURES`` (no FPN)."""
    _check_input(input_shape)
    return _mobilenet_from_config(cfg, list(cfg.MODEL.MOBILENET.OUT_FEATURES))


def _fpn(cfg: CfgNode, input_shape: ShapeSpec, top_block: nn.Module) -> Backbone:
    _check_input(input_shape)
    return FPN(
        bottom_up=_mobilenet_from_config(cfg, list(cfg.MODEL.FPN.IN_FEATURES)),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """MobileNetV2-FPN on ``MODEL.FPN.IN_FEATURES``, plus P6 max-pooled from P5 (R-CNN)."""
    return _fpn(cfg, input_shape, LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_retinanet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """MobileNetV2-FPN on ``MODEL.FPN.IN_FEATURES``, plus P6 and P7 by stride-2 convs from P5
    (RetinaNet, FCOS)."""
    out = cfg.MODEL.FPN.OUT_CHANNELS
    return _fpn(cfg, input_shape, LastLevelP6P7(out, out, in_feature="p5"))
