"""Models: importing this registers the DETR family, FCOS and the distiller meta-architectures."""

from kd import meta_arch  # noqa: F401
from kd.modeling import detr, fcos  # noqa: F401
