"""The project's configs.

A KD config is a student config (``MODEL.*`` describes the student) whose
``MODEL.META_ARCHITECTURE`` names a distiller; the student's own meta-architecture moves to
``KD.STUDENT.META_ARCHITECTURE`` and the teacher comes from its own config file and weights.

* :mod:`kd.config.keys`: every ``KD.*`` key with its default (:func:`add_kd_config`);
* :mod:`kd.config.reading`: reading a config with one-line errors (:func:`merge_config`,
  :func:`load_config`), the device (:func:`resolve_device`), the student's config
  (:func:`student_config`).
"""

from kd.config.keys import add_kd_config
from kd.config.reading import (
    ConfigError,
    load_config,
    merge_config,
    python_tag_message,
    resolve_device,
    student_config,
)

__all__ = [
    "add_kd_config",
    "ConfigError",
    "load_config",
    "merge_config",
    "python_tag_message",
    "resolve_device",
    "student_config",
]
