"""Distiller meta-architectures, registered in detectron2's ``META_ARCH_REGISTRY``."""

from kd.meta_arch.base import Distiller, student_config  # noqa: F401
from kd.meta_arch.chen2017 import Chen2017Distiller  # noqa: F401
from kd.meta_arch.gid import GIDDistiller, GIDFCOSDistiller, GIDRetinaNetDistiller  # noqa: F401
from kd.meta_arch.gid_rcnn import GIDFasterRCNNDistiller  # noqa: F401
from kd.meta_arch.hetero_detr_to_rcnn import DETRToRCNNDistiller  # noqa: F401
from kd.meta_arch.hetero_rcnn_to_detr import RCNNToDETRDistiller  # noqa: F401
from kd.meta_arch.kd_detr import KDDETRDistiller  # noqa: F401
