"""Detector-family adapters: what a distiller needs of a family it does not implement itself.

* :mod:`kd.families.hf_detr`: Hugging Face ``transformers`` DETR teachers (``hf://``), behind
  the interface the DETR distillers use; importing it registers the ``hf://`` teacher source.
"""

from kd.families import hf_detr  # noqa: F401  (registers the hf:// teacher source)
