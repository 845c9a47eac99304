"""A teacher's classes mapped to the student's (``KD.TEACHER.CLASS_MAP``).

A teacher trained on other classes than the student (a COCO teacher for a student on a subset of
COCO's classes; a teacher of all of a dataset's classes for a student of some) is compared with
the student on the classes both have, matched by name:

* the teacher's names are its training dataset's ``thing_classes`` (yacs / LazyConfig teachers)
  or its ``config.id2label`` (Hugging Face teachers; COCO's 91-id spaces keep their "N/A" holes,
  which match nothing); the student's are ``MetadataCatalog.get(DATASETS.TRAIN[0]).thing_classes``;
* names match exactly, else ignoring case, spaces, ``_`` and ``-``; ``"student=teacher"``
  entries of ``KD.TEACHER.CLASS_MAP`` are aliases that win over the names, and ``"student="``
  leaves a student class out;
* a student class the teacher lacks is left out of every class term (the KL over classes, the
  foreground weight, the teacher's top class): the teacher says nothing about it, never a made-up
  probability. Teacher classes the student lacks are dropped (they are background to the
  student). The teacher's top class and confidence are taken among the mapped classes;
* ``KD.TEACHER.CLASS_MAP ["index"]`` compares classes index by index (the counts must agree).

With the same names in the same order the map is the identity and nothing changes. Pure: no
detectron2, no config; :func:`kd.teacher.build_teacher` builds the map from the config.
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["ClassMap", "ClassMapError", "build_class_map", "INDEX"]

INDEX = "index"


class ClassMapError(ValueError):
    """``KD.TEACHER.CLASS_MAP`` cannot be applied; the message says how to fix it."""


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


@dataclass(frozen=True)
class ClassMap:
    """Which teacher class column answers for which student class.

    Attributes:
        student_classes: the student's K_s class names, in its order.
        teacher_classes: the teacher's K_t class names, in its column order.
        student_index: the student classes the teacher has (M of them), ascending.
        teacher_index: for each of those, the teacher's column.
    """

    student_classes: Tuple[str, ...]
    teacher_classes: Tuple[str, ...]
    student_index: Tuple[int, ...]
    teacher_index: Tuple[int, ...]

    @property
    def is_identity(self) -> bool:
        k = len(self.student_classes)
        return (
            len(self.teacher_classes) == k
            and self.student_index == tuple(range(k))
            and self.teacher_index == tuple(range(k))
        )

    @property
    def missing(self) -> List[str]:
        """The student classes the teacher lacks (left out of every class term)."""
        have = set(self.student_index)
        return [c for i, c in enumerate(self.student_classes) if i not in have]

    def pairs(self) -> List[Tuple[str, str]]:
        """(student name, teacher name) of each mapped class."""
        return [
            (self.student_classes[s], self.teacher_classes[t])
            for s, t in zip(self.student_index, self.teacher_index)
        ]

    def teacher_columns(self, logits: Tensor) -> Tensor:
        """(..., K_t) teacher logits -> (..., M) the mapped columns, in student order."""
        return logits.index_select(-1, self._index(self.teacher_index, logits.device))

    def student_columns(self, logits: Tensor) -> Tensor:
        """(..., K_s [+ extra]) student logits -> (..., M) the mapped classes' columns."""
        return logits.index_select(-1, self._index(self.student_index, logits.device))

    def student_class(self, mapped: Tensor) -> Tensor:
        """Indices into the M mapped classes -> the student's class ids."""
        return self._index(self.student_index, mapped.device)[mapped]

    def teacher_to_student(self, device: Optional[torch.device] = None) -> Tensor:
        """(K_t,) long: the student class of each teacher column, -1 where the student has none."""
        out = torch.full((len(self.teacher_classes),), -1, dtype=torch.long)
        for s, t in zip(self.student_index, self.teacher_index):
            out[t] = s
        return out.to(device)

    @staticmethod
    def _index(index: Tuple[int, ...], device) -> Tensor:
        return torch.tensor(index, dtype=torch.long, device=device)

    def describe(self) -> str:
        parts = [f"{s}<-{t}" if s != t else s for s, t in self.pairs()]
        text = f"{len(parts)} of the student's {len(self.student_classes)} classes: " + ", ".join(
            parts
        )
        if self.missing:
            text += f"; not in the teacher (left out of the class terms): {', '.join(self.missing)}"
        return text


def _aliases(spec: Sequence[str], student: Sequence[str], teacher: Sequence[str]) -> Dict:
    aliases: Dict[str, Optional[str]] = {}
    for entry in spec:
        if "=" not in entry:
            raise ClassMapError(
                f"KD.TEACHER.CLASS_MAP entry {entry!r}: use 'student_class=teacher_class' aliases "
                f"(or 'student_class=' to leave a class out), or ['{INDEX}'] alone"
            )
        s, t = (x.strip() for x in entry.split("=", 1))
        if s not in student:
            raise ClassMapError(
                f"KD.TEACHER.CLASS_MAP entry {entry!r}: the student has no class {s!r} (its "
                f"classes: {list(student)})"
            )
        if t and t not in teacher:
            raise ClassMapError(
                f"KD.TEACHER.CLASS_MAP entry {entry!r}: the teacher has no class {t!r} (its "
                f"classes: {[c for c in teacher if c != 'N/A']})"
            )
        aliases[s] = t or None
    return aliases


def build_class_map(
    student_classes: Sequence[str], teacher_classes: Sequence[str], spec: Sequence[str] = ()
) -> ClassMap:
    """Map the teacher's classes to the student's (see the module docstring).

    Args:
        student_classes: the student's class names, in order.
        teacher_classes: the teacher's class names, in its column order.
        spec: ``KD.TEACHER.CLASS_MAP``: empty (by name), ``["index"]``, or aliases.

    Raises:
        ClassMapError: bad aliases, two student classes on one teacher class, or no class in
            common.
    """
    student, teacher = list(map(str, student_classes)), list(map(str, teacher_classes))
    spec = [str(s) for s in spec]
    if spec == [INDEX]:
        if len(student) != len(teacher):
            raise ClassMapError(
                f"KD.TEACHER.CLASS_MAP ['{INDEX}']: the teacher has {len(teacher)} classes, the "
                f"student {len(student)}; map them by name instead (KD.TEACHER.CLASS_MAP [])"
            )
        k = tuple(range(len(student)))
        return ClassMap(tuple(student), tuple(teacher), k, k)
    aliases = _aliases(spec, student, teacher)
    exact = {name: i for i, name in reversed(list(enumerate(teacher)))}
    loose = {_key(name): i for i, name in reversed(list(enumerate(teacher)))}
    s_index, t_index, used = [], [], {}
    for i, name in enumerate(student):
        if name in aliases:
            target = aliases[name]
            j = None if target is None else exact[target]
        else:
            j = exact.get(name, loose.get(_key(name)))
        if j is None or teacher[j] == "N/A":
            continue
        if j in used:
            raise ClassMapError(
                f"KD.TEACHER.CLASS_MAP: the student classes {used[j]!r} and {name!r} both map to "
                f"the teacher's {teacher[j]!r}; alias one of them to another class, or leave it "
                f"out with '{name}='"
            )
        used[j] = name
        s_index.append(i)
        t_index.append(j)
    if not s_index:
        raise ClassMapError(
            f"the teacher's classes {[c for c in teacher if c != 'N/A'][:20]} and the student's "
            f"{student} have no name in common: add 'student_class=teacher_class' aliases to "
            f"KD.TEACHER.CLASS_MAP, or ['{INDEX}'] to compare them index by index"
        )
    return ClassMap(tuple(student), tuple(teacher), tuple(s_index), tuple(t_index))
