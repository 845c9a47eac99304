"""Detector families: what a distiller needs of a teacher or student family, one module each,
registered in :data:`kd.families.registry.FAMILY_REGISTRY` (its ``__doc__`` states the interface).

* :mod:`kd.families.rcnn`: Faster R-CNN; its training step split where distillers look in
  (``rpn_step``, ``roi_step``), its box head asked at given boxes, its RPN as a dense view;
* :mod:`kd.families.dense`: RetinaNet, FCOS; the dense per-location view (``DenseView``: anchors,
  head outputs, label assignment) that GID compares prediction by prediction, the layout check;
* :mod:`kd.families.detr`: this project's DETR-style models;
* :mod:`kd.families.hf_detr`: Hugging Face ``transformers`` DETR teachers (``hf://``, loaded by
  :mod:`kd.families.hf_source`), behind the interface the DETR distillers use;
  :mod:`kd.families.hf_teacher_source` registers the ``hf://`` teacher source;
* :mod:`kd.families.boxes`: box encodings across two models (one model's deltas in another's).
"""

from kd.families import dense, detr, hf_detr, hf_teacher_source, rcnn  # noqa: F401  (registries)
