"""Models: importing this registers the DETR family, FCOS, the MobileNetV2 backbones and the
distiller meta-architectures."""

from kd import meta_arch  # noqa: F401
from kd.modeling import detr, fcos, mobilenet  # noqa: F401
