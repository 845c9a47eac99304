"""Distillation points: where teacher and student are asked the same question.

A point is a box. Each method picks its points with a sampler of its own:

* random boxes (KD-DETR's general points, the heterogeneous distillers'): :mod:`kd.points.random`;
* GISM, GID's general instances: :mod:`kd.points.gism`;
* the student's own training samples, the RPN's sampled anchors and the ROI head's sampled
  proposals (Chen et al., DETR -> Faster R-CNN): :func:`kd.families.rcnn.rpn_step` and
  :func:`kd.families.rcnn.roi_step` keep them;
* a DETR's detection queries (KD-DETR's specific points): the teacher's
  ``detection_anchors`` (:mod:`kd.modeling.detr`, :mod:`kd.families.hf_detr`).

Points passed between families are batches of normalised boxes (:mod:`kd.points.batch`); the
answers at them come from the probes (:mod:`kd.probes`).
"""
