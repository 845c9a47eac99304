"""Knowledge distillation for object detection, inside detectron2.

``import kd`` registers everything: the distiller meta-architectures and the DETR family
(``kd.modeling``) and the datasets found under ``$DETECTRON2_DATASETS`` (``kd.data``).
``kd.config.add_kd_config`` adds every ``KD.*`` key.
"""

from kd import compat

compat.install_import_hook()
compat.apply_runtime_fixes()

from kd import data, modeling  # noqa: E402,F401  (registration side effects)
from kd.config import add_kd_config  # noqa: E402,F401

__version__ = "0.1.0"
