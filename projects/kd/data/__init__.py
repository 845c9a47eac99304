"""Datasets: folder-convention registration (on import), validation, and the kd_shapes generator.

Importing this package registers every ``NAME/annotations/instances_{train,val}.json`` under
``$DETECTRON2_DATASETS`` (default ``./datasets``) as ``NAME_train`` / ``NAME_val``, and BCCD
(``bccd_train`` / ``bccd_val``, VOC format) from ``$KD_BCCD_ROOT`` or ``../shared/data/bccd``.
"""

from kd.data.registration import (
    datasets_root,
    register_folder_datasets,
    validate_dataset,
    validate_datasets,
)
from kd.data.synthetic import generate_dataset
from kd.data.voc import load_voc_instances, register_bccd, register_voc_detection

__all__ = [
    "datasets_root",
    "generate_dataset",
    "load_voc_instances",
    "register_bccd",
    "register_folder_datasets",
    "register_voc_detection",
    "validate_dataset",
    "validate_datasets",
]

register_folder_datasets()
register_bccd()
