"""Datasets: folder-convention registration (on import), validation, and the kd_shapes generator.

Importing this package registers every ``NAME/annotations/instances_{train,val}.json`` under
``$DETECTRON2_DATASETS`` (default ``./datasets``) as ``NAME_train`` / ``NAME_val``.
"""

from kd.data.registration import (
    datasets_root,
    register_folder_datasets,
    validate_dataset,
    validate_datasets,
)
from kd.data.synthetic import generate_dataset

__all__ = [
    "datasets_root",
    "generate_dataset",
    "register_folder_datasets",
    "validate_dataset",
    "validate_datasets",
]

register_folder_datasets()
