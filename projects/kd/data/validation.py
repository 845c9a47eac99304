"""Check detectron2 dataset dicts before a run: every image file and every box.

detectron2 reads an image only when the data loader reaches it, and its transforms quietly turn a
box with a negative size into another box (``apply_box`` takes the min and max of the corners). A
missing image late in the list then stops training mid-run, and a wrong box is trained on. This
module checks the whole list before the first step, without decoding images:

* every image file exists and is not empty (one ``os.stat`` per file);
* every box is ``bbox_mode`` + ``bbox`` of finite numbers that detectron2 converts to
  ``XYXY_ABS`` (:meth:`BoxMode.convert`) with positive width and height;
* every box lies in its image (``width`` / ``height`` of the dict), allowing ``BOX_TOLERANCE``
  pixels beyond the border (detectron2 clips those boxes to the image);
* every ``category_id`` is one of the dataset's classes (``thing_classes`` of its metadata).

It works on the dicts of any registered dataset (``DatasetCatalog.get(name)``): COCO files, folder
datasets, VOC. The box checks are vectorised over all annotations with numpy: a COCO-sized list
(200k annotations) takes about a second, most of it gathering the boxes from the dicts.

``DATALOADER.ON_BAD_ANNOTATIONS`` chooses what happens to what is wrong: "stop" raises a
``ValueError`` naming the first items (file, annotation id, what is wrong, the box); "skip" drops
the bad boxes and the images whose file is missing or empty, and logs how many with examples.
"""

import itertools
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.structures import BoxMode

__all__ = [
    "ON_BAD_CHOICES",
    "DatasetReport",
    "check_dataset_dicts",
    "apply_report",
    "validate_train_dicts",
    "validate_test_dicts",
    "validate_test_datasets",
]

logger = logging.getLogger(__name__)

ON_BAD_CHOICES = ("stop", "skip")
# How many bad items a message or a log names.
NUM_EXAMPLES = 5

# What can be wrong with one annotation, as bits (an annotation can have several).
MALFORMED, NOT_POSITIVE, OUTSIDE, CATEGORY = 1, 2, 4, 8
_BOX_SIZE = {BoxMode.XYXY_ABS: 4, BoxMode.XYWH_ABS: 4, BoxMode.XYWHA_ABS: 5}


@dataclass
class DatasetReport:
    """What :func:`check_dataset_dicts` found wrong, as indices into the dicts it checked.

    Attributes:
        num_images, num_annotations: how many were checked.
        bad_images: record indices whose image file is missing, empty or unreadable (sorted).
        image_reasons: what is wrong with each of ``bad_images``.
        bad_records, bad_indices: for each bad annotation, its record index and its index in that
            record's ``annotations`` (sorted by record, then index).
        bad_flags: for each bad annotation, the bits of what is wrong (``MALFORMED`` ...).
        bad_xyxy: for each bad annotation, its box converted to ``XYXY_ABS`` (NaN if malformed).
        box_tolerance, num_classes: the limits the boxes and categories were checked against.
    """

    num_images: int
    num_annotations: int
    bad_images: np.ndarray
    image_reasons: List[str]
    bad_records: np.ndarray
    bad_indices: np.ndarray
    bad_flags: np.ndarray
    bad_xyxy: np.ndarray
    box_tolerance: float
    num_classes: Optional[int]

    @property
    def ok(self) -> bool:
        return len(self.bad_images) == 0 and len(self.bad_records) == 0

    def counts(self) -> Dict[str, int]:
        """Number of bad annotations for each kind of defect (an annotation may count twice)."""
        names = {
            MALFORMED: "malformed",
            NOT_POSITIVE: "not positive in size",
            OUTSIDE: "outside the image",
            CATEGORY: "invalid category",
        }
        return {
            name: int(np.count_nonzero(self.bad_flags & bit))
            for bit, name in names.items()
            if np.any(self.bad_flags & bit)
        }

    def summary(self) -> str:
        """One phrase: how many images and annotations are bad, of how many."""
        parts = []
        if len(self.bad_images):
            parts.append(
                f"{len(self.bad_images)} of {self.num_images} images have a missing or empty file"
            )
        if len(self.bad_records):
            kinds = ", ".join(f"{n} {name}" for name, n in self.counts().items())
            parts.append(
                f"{len(self.bad_records)} of {self.num_annotations} annotations are bad ({kinds})"
            )
        return "; ".join(parts) if parts else "no problems"

    def examples(self, dataset_dicts: Sequence[dict], limit: int = NUM_EXAMPLES) -> List[str]:
        """One line for each of the first ``limit`` bad items, in dataset order."""
        items: List[Tuple[int, int, str]] = [
            (int(r), -1, f"{_file(dataset_dicts[r])}: {reason}")
            for r, reason in zip(self.bad_images[:limit], self.image_reasons[:limit])
        ]
        for k in range(min(limit, len(self.bad_records))):
            r, i = int(self.bad_records[k]), int(self.bad_indices[k])
            items.append((r, i, self._describe_annotation(dataset_dicts[r], i, k)))
        return [line for _, _, line in sorted(items)[:limit]]

    def _describe_annotation(self, record: dict, index: int, k: int) -> str:
        ann = record["annotations"][index]
        flags = int(self.bad_flags[k])
        x1, y1, x2, y2 = (float(v) for v in self.bad_xyxy[k])
        what = []
        if flags & MALFORMED:
            what.append(
                "bbox / bbox_mode is not a box detectron2 can train on (bbox_mode XYXY_ABS or "
                "XYWH_ABS with 4 finite numbers, or XYWHA_ABS with 5)"
            )
        if flags & NOT_POSITIVE:
            what.append(
                f"width {x2 - x1:g} and height {y2 - y1:g} after conversion to XYXY_ABS must be "
                "positive"
            )
        if flags & OUTSIDE:
            what.append(
                f"box reaches beyond the {record.get('width')}x{record.get('height')} image by "
                f"more than DATALOADER.BOX_TOLERANCE = {self.box_tolerance:g} px (or has no "
                "area inside it)"
            )
        if flags & CATEGORY:
            valid = f"0..{self.num_classes - 1}" if self.num_classes else "an integer >= 0"
            what.append(f"category_id {ann.get('category_id')!r} is not a class ({valid})")
        box = f"bbox {_plain(ann.get('bbox'))} ({_mode_name(ann.get('bbox_mode'))})"
        if not flags & MALFORMED:
            box += f" = XYXY_ABS [{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
        return f"{_file(record)}: {_annotation_label(ann, index)}: {'; '.join(what)}: {box}"


def _file(record: dict) -> str:
    return str(record.get("file_name", f"<no file_name, image_id {record.get('image_id')}>"))


def _annotation_label(ann: dict, index: int) -> str:
    for key in ("id", "ann_id"):
        if key in ann:
            return f"annotation id {ann[key]}"
    return f"annotation #{index} of the image"


def _mode_name(mode: Any) -> str:
    try:
        return BoxMode(mode).name
    except ValueError:
        return f"bbox_mode {mode!r}"


def _plain(box: Any) -> str:
    if isinstance(box, (list, tuple, np.ndarray)):
        return (
            "[" + ", ".join(f"{v:g}" if isinstance(v, (int, float)) else repr(v) for v in box) + "]"
        )
    return repr(box)


def _image_problem(path: Any, cache: Dict[Any, Optional[str]]) -> Optional[str]:
    """What is wrong with an image file, or None. Only ``os.stat``: nothing is decoded."""
    if path in cache:
        return cache[path]
    if not isinstance(path, str) or not path:
        reason: Optional[str] = "the record has no file_name"
    else:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            reason = "image file is missing"
        except OSError as e:
            reason = f"image file cannot be read ({e.strerror})"
        else:
            if not stat.S_ISREG(st.st_mode):
                reason = "image path is not a file"
            elif st.st_size == 0:
                reason = "image file is empty (0 bytes)"
            else:
                reason = None
    cache[path] = reason
    return reason


def _as_int(value: Any) -> int:
    # bbox_mode is an IntEnum, category_id an int; anything else is malformed (-1).
    return (
        int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else -1
    )


def _int_field(anns: List[dict], key: str) -> np.ndarray:
    """``ann[key]`` of every annotation as int64, -1 where it is missing or not an integer."""
    values = [a.get(key) for a in anns]
    if set(map(type, values)) <= {int, BoxMode}:  # the usual case, 10x faster than _as_int
        return np.array(values, dtype=np.int64)
    return np.fromiter(map(_as_int, values), dtype=np.int64, count=len(values))


def _stack_boxes(boxes: List[Any], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(N, size) float64 array of the boxes and a mask of those that are ``size`` numbers."""
    if set(map(type, boxes)) <= {list, tuple} and set(map(len, boxes)) == {size}:
        numbers = list(itertools.chain.from_iterable(boxes))
        if set(map(type, numbers)) <= {int, float}:  # the usual case: no box is malformed
            arr = np.array(numbers, dtype=np.float64).reshape(len(boxes), size)
            return arr, np.ones(len(boxes), dtype=bool)
    # Some box is not `size` numbers: find which, one at a time (rare, so speed does not matter).
    arr = np.full((len(boxes), size), np.nan)
    ok = np.zeros(len(boxes), dtype=bool)
    for j, box in enumerate(boxes):
        try:
            row = np.asarray(box, dtype=np.float64)
        except (ValueError, TypeError):
            continue
        if row.shape == (size,):
            arr[j], ok[j] = row, True
    return arr, ok


def check_dataset_dicts(
    dataset_dicts: Sequence[dict], box_tolerance: float = 2.0, num_classes: Optional[int] = None
) -> DatasetReport:
    """Find missing or empty image files and bad boxes in detectron2 dataset dicts.

    Args:
        dataset_dicts: detectron2's standard dataset dicts (``file_name``, optionally ``width``
            and ``height``, ``annotations`` with ``bbox``, ``bbox_mode`` and ``category_id``).
            Records without ``width`` / ``height`` are not checked against the image border.
        box_tolerance: how far (pixels) a box may reach beyond the image border.
        num_classes: category ids must lie in ``[0, num_classes)``; None: only ``>= 0``.

    Returns:
        A :class:`DatasetReport`; the dicts are not changed.
    """
    num_images = len(dataset_dicts)
    cache: Dict[Any, Optional[str]] = {}
    reasons = [_image_problem(record.get("file_name"), cache) for record in dataset_dicts]
    image_problems = [(i, reason) for i, reason in enumerate(reasons) if reason is not None]

    per_image = [record.get("annotations") or () for record in dataset_dicts]
    counts = np.fromiter(map(len, per_image), dtype=np.int64, count=num_images)
    anns = list(itertools.chain.from_iterable(per_image))
    n = len(anns)
    records = np.repeat(np.arange(num_images), counts)
    indices = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    modes = _int_field(anns, "bbox_mode")
    categories = _int_field(anns, "category_id")

    flags = np.zeros(n, dtype=np.int64)
    xyxy = np.full((n, 4), np.nan)
    for mode in np.unique(modes):
        members = np.flatnonzero(modes == mode)
        if int(mode) not in {int(m) for m in _BOX_SIZE}:
            # Relative modes are not supported by detectron2's transforms either.
            flags[members] |= MALFORMED
            continue
        box_mode = BoxMode(int(mode))
        boxes, ok = _stack_boxes([anns[j].get("bbox") for j in members], _BOX_SIZE[box_mode])
        ok &= np.isfinite(boxes).all(axis=1)
        flags[members[~ok]] |= MALFORMED
        xyxy[members[ok]] = BoxMode.convert(boxes[ok], box_mode, BoxMode.XYXY_ABS)
        if box_mode == BoxMode.XYWHA_ABS:
            # Its XYXY hull can look fine even when the rotated box's own w or h is negative.
            flat = ok & ~((boxes[:, 2] > 0) & (boxes[:, 3] > 0))
            flags[members[flat]] |= NOT_POSITIVE

    valid = (flags & MALFORMED) == 0
    x1, y1, x2, y2 = xyxy.T
    with np.errstate(invalid="ignore"):
        flags[valid & ~((x2 > x1) & (y2 > y1))] |= NOT_POSITIVE
        width = _sizes(dataset_dicts, "width")[records]
        height = _sizes(dataset_dicts, "height")[records]
        tol = float(box_tolerance)
        beyond = (x1 < -tol) | (y1 < -tol) | (x2 > width + tol) | (y2 > height + tol)
        # A box within the tolerance is clipped by detectron2; it must keep some area.
        no_area = (np.minimum(x2, width) <= np.maximum(x1, 0)) | (
            np.minimum(y2, height) <= np.maximum(y1, 0)
        )
        known = np.isfinite(width) & np.isfinite(height)
        flags[valid & known & (beyond | no_area) & ((flags & NOT_POSITIVE) == 0)] |= OUTSIDE
    bad_category = categories < 0
    if num_classes is not None:
        bad_category |= categories >= num_classes
    flags[bad_category] |= CATEGORY

    bad = np.flatnonzero(flags)
    return DatasetReport(
        num_images=num_images,
        num_annotations=n,
        bad_images=np.array([i for i, _ in image_problems], dtype=np.int64),
        image_reasons=[reason for _, reason in image_problems],
        bad_records=records[bad],
        bad_indices=indices[bad],
        bad_flags=flags[bad],
        bad_xyxy=xyxy[bad],
        box_tolerance=tol,
        num_classes=num_classes,
    )


def _sizes(dataset_dicts: Sequence[dict], key: str) -> np.ndarray:
    """``record[key]`` (width or height) of every record, NaN where unknown."""
    values = [record.get(key) for record in dataset_dicts]
    if not set(map(type, values)) <= {int, float}:
        values = [
            v if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan for v in values
        ]
    sizes = np.array(values, dtype=np.float64)
    sizes[~(sizes > 0)] = np.nan
    return sizes


def apply_report(
    dataset_dicts: List[dict], report: DatasetReport, filter_empty: bool
) -> Tuple[List[dict], int]:
    """The dicts without the bad images and bad annotations that ``report`` names.

    The given dicts are not modified: records that lose annotations are shallow copies.

    Args:
        dataset_dicts: the dicts ``report`` was computed on.
        report: from :func:`check_dataset_dicts`.
        filter_empty: also drop images left without a non-crowd annotation
            (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``, as detectron2 applies it).

    Returns:
        The kept dicts, and how many images were dropped because they were left empty.
    """
    drop_images = set(report.bad_images.tolist())
    drop_anns: Dict[int, set] = {}
    for r, i in zip(report.bad_records.tolist(), report.bad_indices.tolist()):
        drop_anns.setdefault(r, set()).add(i)
    kept, changed = [], []
    for r, record in enumerate(dataset_dicts):
        if r in drop_images:
            continue
        if r in drop_anns:
            anns = [a for i, a in enumerate(record["annotations"]) if i not in drop_anns[r]]
            record = dict(record, annotations=anns)
            changed.append(record)
        kept.append(record)
    if not filter_empty or not changed:
        return kept, 0
    emptied = {id(r) for r in changed} - {
        id(r) for r in filter_images_with_only_crowd_annotations(changed)
    }
    return [r for r in kept if id(r) not in emptied], len(emptied)


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _num_classes(names: Sequence[str]) -> Optional[int]:
    classes = MetadataCatalog.get(names[0]).get("thing_classes") if names else None
    return len(classes) if classes else None


def _options(cfg: CfgNode) -> Tuple[str, float]:
    on_bad = cfg.DATALOADER.ON_BAD_ANNOTATIONS
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(
            f"DATALOADER.ON_BAD_ANNOTATIONS must be one of {', '.join(ON_BAD_CHOICES)}, "
            f"got {on_bad!r}"
        )
    return on_bad, float(cfg.DATALOADER.BOX_TOLERANCE)


def _stop_message(
    names: Sequence[str], dicts: Sequence[dict], report: DatasetReport, fix: str
) -> str:
    lines = [f"Dataset {_names(names)}: {report.summary()}. First ones:"]
    lines += [f"  {line}" for line in report.examples(dicts)]
    lines.append(fix)
    return "\n".join(lines)


def validate_train_dicts(cfg: CfgNode, dataset_dicts: List[dict]) -> List[dict]:
    """Check the training dicts of ``cfg.DATASETS.TRAIN`` before the sampler is built.

    Args:
        cfg: reads ``DATASETS.TRAIN``, ``DATALOADER.{ON_BAD_ANNOTATIONS, BOX_TOLERANCE,
            FILTER_EMPTY_ANNOTATIONS}``.
        dataset_dicts: from ``get_detection_dataset_dicts(cfg.DATASETS.TRAIN, ...)``. Anything
            else than a list (a torch ``Dataset`` registered instead of dicts) is returned as it
            is: it cannot be checked without reading it.

    Returns:
        The dicts to train on: the same under "stop", without the bad items under "skip".

    Raises:
        ValueError: something is bad and ``ON_BAD_ANNOTATIONS`` is "stop".
    """
    if not isinstance(dataset_dicts, list):
        return dataset_dicts
    on_bad, tolerance = _options(cfg)
    names = list(cfg.DATASETS.TRAIN)
    report = check_dataset_dicts(dataset_dicts, tolerance, _num_classes(names))
    if report.ok:
        return dataset_dicts
    if on_bad == "stop":
        raise ValueError(
            _stop_message(
                names,
                dataset_dicts,
                report,
                "Fix the annotation file or the images; or train without these boxes and images "
                "with DATALOADER.ON_BAD_ANNOTATIONS skip (they are counted and logged); boxes that "
                "only slightly cross the border pass with a larger DATALOADER.BOX_TOLERANCE.",
            )
        )
    kept, emptied = apply_report(dataset_dicts, report, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    if not kept:
        raise ValueError(
            _stop_message(
                names,
                dataset_dicts,
                report,
                "DATALOADER.ON_BAD_ANNOTATIONS skip leaves no image to train on: fix the data.",
            )
        )
    lost = f", and {emptied} images left without annotations" if emptied else ""
    logger.warning(
        "Dataset %s: %s. DATALOADER.ON_BAD_ANNOTATIONS skip: training without the %d bad "
        "annotations and %d images%s (%d images left). First ones:\n%s",
        _names(names),
        report.summary(),
        len(report.bad_records),
        len(report.bad_images),
        lost,
        len(kept),
        "\n".join(f"  {line}" for line in report.examples(dataset_dicts)),
    )
    return kept


_REPORTED: set = set()


def validate_test_dicts(cfg: CfgNode, dataset_dicts: List[dict], dataset_name: str) -> List[dict]:
    """Check the dicts of an evaluation dataset before inference starts.

    A missing or empty image always stops: the evaluator's ground truth (the annotation file)
    still holds it, so skipping it would score a different set of images. Bad boxes stop under
    ``ON_BAD_ANNOTATIONS`` "stop"; under "skip" they are logged (once per process), since inference
    does not read them and the evaluator reads its own copy of the ground truth.

    Args:
        cfg: reads ``DATALOADER.{ON_BAD_ANNOTATIONS, BOX_TOLERANCE}``.
        dataset_dicts: the dicts of ``dataset_name``.
        dataset_name: the evaluated dataset.

    Returns:
        ``dataset_dicts``, unchanged.

    Raises:
        ValueError: an image file is missing or empty, or a box is bad under "stop".
    """
    if not isinstance(dataset_dicts, list):
        return dataset_dicts
    on_bad, tolerance = _options(cfg)
    report = check_dataset_dicts(dataset_dicts, tolerance, _num_classes([dataset_name]))
    if report.ok:
        return dataset_dicts
    if len(report.bad_images) or on_bad == "stop":
        raise ValueError(
            _stop_message(
                [dataset_name],
                dataset_dicts,
                report,
                "Evaluation needs every image its annotation file lists: restore the files (or "
                "remove them from the file) and fix the boxes; bad boxes alone are accepted in "
                "evaluation with DATALOADER.ON_BAD_ANNOTATIONS skip.",
            )
        )
    key = (dataset_name, report.summary())
    if key not in _REPORTED:
        _REPORTED.add(key)
        logger.warning(
            "Evaluation dataset %r: %s. DATALOADER.ON_BAD_ANNOTATIONS skip: inference does not use "
            "them, but they stay in the evaluator's ground truth. First ones:\n%s",
            dataset_name,
            report.summary(),
            "\n".join(f"  {line}" for line in report.examples(dataset_dicts)),
        )
    return dataset_dicts


def validate_test_datasets(cfg: CfgNode) -> None:
    """:func:`validate_test_dicts` for every ``cfg.DATASETS.TEST``, so that a training run stops
    before its first step, not at its first evaluation.

    Args:
        cfg: the run's config.
    """
    for name in cfg.DATASETS.TEST:
        validate_test_dicts(cfg, get_detection_dataset_dicts([name], filter_empty=False), name)
