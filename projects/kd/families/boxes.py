"""Box encodings across two models: one model's deltas as another model's transform encodes them.

Teacher and student may encode box refinements differently (``BBOX_REG_WEIGHTS``, scale clamps,
another transform class); their deltas are comparable only under one encoding. Every distiller
that compares deltas (Chen et al.'s bounded regression, GID's response loss) converts the
teacher's with :func:`deltas_in_student_space`.
"""

import torch

__all__ = ["same_transform", "deltas_in_student_space"]


def same_transform(a, b) -> bool:
    """True when two box transforms (detectron2's ``Box2BoxTransform``, or another class) encode
    boxes identically: the same class and the same settings (weights, scale clamp)."""
    return type(a) is type(b) and _settings(a) == _settings(b)


def _settings(transform) -> dict:
    # Weights read from a config may be a list or a tuple: the same encoding either way.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(transform).items()}


def deltas_in_student_space(
    t_deltas: torch.Tensor, boxes: torch.Tensor, *, student, teacher
) -> torch.Tensor:
    """The teacher's deltas as the student's transform encodes the same refined boxes: decoded
    with the teacher's transform, re-encoded with the student's (its targets' encoding); returned
    unchanged when the two transforms are the same.

    Args:
        t_deltas: (..., 4) the teacher's deltas.
        boxes: the absolute xyxy boxes (anchors / proposals) they refine, broadcastable to
            ``t_deltas``: (N, 4) for N deltas, or (R, 4) anchors shared by a batch of (N, R, 4).
        student, teacher: the two models' box transforms.

    Returns:
        A tensor shaped like ``t_deltas``.
    """
    if same_transform(student, teacher):
        return t_deltas
    rows = boxes.expand_as(t_deltas).reshape(-1, 4)
    refined = teacher.apply_deltas(t_deltas.reshape(-1, 4), rows)
    return student.get_deltas(rows, refined).view_as(t_deltas)
