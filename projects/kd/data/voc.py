"""Pascal VOC-format detection data (XML per image) as detectron2 datasets, and BCCD registered.

A VOC folder holds ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/<split>.txt`` (one ``<id>`` per line), the layout of Pascal VOC and of many
labelling tools' exports. :func:`register_voc_detection` makes one split a detectron2 dataset that
trains with any config and evaluates with COCOEvaluator (which converts it to a COCO file in the
run's output folder).

The loader reports the annotations as they are written: boxes are the XML's numbers, in
``XYXY_ABS`` (detectron2's own VOC loader subtracts 1 from ``xmin``/``ymin``, a pixel-index
convention that would turn a degenerate point box into a 1-pixel one; here nothing is moved),
and a bad box (no size, outside the image) is kept, with ``ann_id`` ``"<xml file>#<index>"``
naming it. What a run does with bad boxes is decided by ``DATALOADER.ON_BAD_ANNOTATIONS``
(:mod:`kd.data.validation`). What cannot be represented at all is an error naming the file: an
XML that does not parse, a box that is not four numbers, a class name not in ``class_names``, an
XML size that differs from the image's. Images are sized as detectron2 reads them, with their EXIF
orientation applied; an XML written in a rotated JPEG's stored coordinates has its boxes rotated
with the pixels (:func:`_image_size`).

BCCD (``bccd_train``, ``bccd_val``) is registered on ``import kd`` from ``$KD_BCCD_ROOT``, or else
from ``../shared/data/bccd`` next to the repository, when that folder exists.
"""

import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

__all__ = [
    "BCCD_CLASSES",
    "bccd_root",
    "load_voc_instances",
    "register_bccd",
    "register_voc_detection",
]

BCCD_CLASSES = ("RBC", "WBC", "Platelets")
_BCCD_ENV = "KD_BCCD_ROOT"
_REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)
_BCCD_DEFAULT = os.path.join(os.path.dirname(_REPO), "shared", "data", "bccd")
_COORDS = ("xmin", "ymin", "xmax", "ymax")


class VOCFormatError(ValueError):
    """An annotation file cannot be read as VOC; the message names the file and what is wrong."""


def _split_ids(root: str, split: str) -> List[str]:
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VOC split file {path} not found: a VOC folder lists the images of split {split!r} "
            "there, one id per line (Annotations/<id>.xml, JPEGImages/<id>.jpg)"
        )
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _int_text(root: ET.Element, path: str) -> Optional[int]:
    text = root.findtext(path)
    try:
        return int(float(text)) if text is not None and text.strip() else None
    except ValueError:
        return None


# EXIF orientations (tag 0x0112) that detectron2's read_image applies by swapping the axes.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 (a broken EXIF block: detectron2 ignores it too)
        return 1


def _image_size(
    xml_path: str, tree: ET.Element, image_path: str, check: bool
) -> Tuple[Tuple[int, int], int]:
    """((width, height), orientation): the size detectron2 trains on, and the EXIF orientation
    to apply to the XML's boxes (1: none).

    detectron2 reads images with their EXIF orientation applied, so the size it checks is the
    *displayed* one. An XML whose ``<size>`` is the displayed size has its boxes in displayed
    coordinates and is taken as it is; one whose ``<size>`` is the *stored* size of a rotated
    image (EXIF orientation 5-8: a labelling tool that ignores EXIF) has its boxes in stored
    coordinates, which are rotated as detectron2 rotates the pixels. Orientations 2-4 keep the
    size and cannot be told apart: their boxes are taken as displayed coordinates.

    Raises:
        VOCFormatError: ``<size>`` is neither the displayed nor the stored size.
    """
    width, height = _int_text(tree, "size/width"), _int_text(tree, "size/height")
    if not check and width and height:
        return (width, height), 1
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"{xml_path}: its image {image_path} does not exist")
    with Image.open(image_path) as img:  # reads the header only (EXIF included)
        stored, orientation = img.size, _orientation(img)
    transposed = orientation in _TRANSPOSING_ORIENTATIONS
    displayed = (stored[1], stored[0]) if transposed else stored
    if not (width and height) or (width, height) == displayed:
        return displayed, 1
    if transposed and (width, height) == stored:
        return displayed, orientation
    raise VOCFormatError(
        f"{xml_path}: <size> says {width}x{height} but {image_path} is "
        f"{displayed[0]}x{displayed[1]}"
        + (
            f" (stored {stored[0]}x{stored[1]}, EXIF orientation {orientation})"
            if transposed
            else ""
        )
        + "; the boxes may be in other coordinates than the image: fix the XML or the image"
    )


def _orient_box(box: List[float], orientation: int, stored: Tuple[int, int]) -> List[float]:
    """A box (XYXY) in the stored pixels' coordinates, in those of the image as detectron2 reads
    it (``detection_utils._apply_exif_orientation``: PIL's transposes for the orientation)."""
    w, h = stored
    x1, y1, x2, y2 = box
    corners = {
        5: lambda x, y: (y, x),  # TRANSPOSE
        6: lambda x, y: (h - y, x),  # ROTATE_270
        7: lambda x, y: (h - y, w - x),  # TRANSVERSE
        8: lambda x, y: (y, w - x),  # ROTATE_90
    }[orientation]
    (a, b), (c, d) = corners(x1, y1), corners(x2, y2)
    return [min(a, c), min(b, d), max(a, c), max(b, d)]


def _parse_object(xml_path: str, index: int, obj: ET.Element, classes: Dict[str, int]) -> dict:
    name = (obj.findtext("name") or "").strip()
    if name not in classes:
        raise VOCFormatError(
            f"{xml_path}: object #{index} has class {name!r}, which is not one of the dataset's "
            f"classes {list(classes)}; fix the name, or pass the class in class_names"
        )
    box = obj.find("bndbox")
    values = [None if box is None else box.findtext(c) for c in _COORDS]
    try:
        bbox = [float(v) for v in values]
    except (TypeError, ValueError):
        raise VOCFormatError(
            f"{xml_path}: object #{index} ({name}) has no box of four numbers: "
            f"<bndbox> {dict(zip(_COORDS, values))}"
        ) from None
    return {
        "bbox": bbox,
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": classes[name],
        "ann_id": f"{os.path.basename(xml_path)}#{index}",
    }


def load_voc_instances(
    root: str, split: str, class_names: Sequence[str], check_image_size: bool = True
) -> List[dict]:
    """Read one split of a VOC-format folder as detectron2 dataset dicts.

    Args:
        root: the folder with ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``.
        split: the split file's name, e.g. "train" for ``ImageSets/Main/train.txt``.
        class_names: the classes; category ids are their indices (0..K-1).
        check_image_size: read each image's header (not its pixels) and require the XML's
            ``<size>`` to match it; without ``<size>`` the header gives the size either way.

    Returns:
        One dict per image: ``file_name``, ``image_id`` (its position in the split file: COCO
        evaluation needs numbers), ``width``, ``height``, ``annotations`` (``bbox`` as written,
        in XYXY_ABS, ``bbox_mode``, ``category_id``, ``ann_id`` = ``"<xml file>#<index>"``).

    Raises:
        VOCFormatError: an XML does not parse, a box is not four numbers, a class is unknown, or
            a size differs from the image's.
        FileNotFoundError: the split file, an XML or an image is missing.
    """
    classes = {name: i for i, name in enumerate(class_names)}
    dicts = []
    for index, voc_id in enumerate(_split_ids(root, split)):
        xml_path = os.path.join(root, "Annotations", f"{voc_id}.xml")
        image_path = os.path.join(root, "JPEGImages", f"{voc_id}.jpg")
        if not os.path.isfile(xml_path):
            raise FileNotFoundError(f"{xml_path} (listed in split {split!r}) does not exist")
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            raise VOCFormatError(f"{xml_path}: not well-formed XML ({e})") from None
        (width, height), orientation = _image_size(xml_path, tree, image_path, check_image_size)
        annotations = [
            _parse_object(xml_path, i, obj, classes) for i, obj in enumerate(tree.findall("object"))
        ]
        if orientation != 1:
            stored = (height, width)  # a transposing orientation: the stored size is swapped
            for a in annotations:
                a["bbox"] = _orient_box(a["bbox"], orientation, stored)
        dicts.append(
            {
                "file_name": image_path,
                "image_id": index,
                "width": width,
                "height": height,
                "annotations": annotations,
            }
        )
    return dicts


def register_voc_detection(
    name: str, root: str, split: str, class_names: Sequence[str], check_image_size: bool = True
) -> None:
    """Register one split of a VOC-format folder as the detectron2 dataset ``name``.

    The dicts are read when the dataset is first used (:func:`load_voc_instances`). The metadata
    (``thing_classes``, ``evaluator_type`` "coco", ``dirname``, ``split``) lets COCOEvaluator
    evaluate it: it converts the dicts to a COCO file in its output folder.

    Args:
        name: the dataset name, e.g. "mydata_train".
        root, split, class_names, check_image_size: as :func:`load_voc_instances`.
    """
    root = os.path.abspath(root)
    class_names = list(class_names)
    DatasetCatalog.register(
        name, lambda: load_voc_instances(root, split, class_names, check_image_size)
    )
    MetadataCatalog.get(name).set(
        thing_classes=class_names, evaluator_type="coco", dirname=root, split=split
    )


def bccd_root() -> Optional[str]:
    """Where BCCD is: ``$KD_BCCD_ROOT``, else ``../shared/data/bccd`` next to the repository;
    None when that folder does not exist."""
    root = os.environ.get(_BCCD_ENV) or _BCCD_DEFAULT
    return root if os.path.isdir(root) else None


def register_bccd(root: Optional[str] = None) -> List[str]:
    """Register BCCD's own splits as ``bccd_train`` (205 images) and ``bccd_val`` (87).

    Args:
        root: a BCCD checkout (VOC layout); default :func:`bccd_root`.

    Returns:
        The names registered (none when the folder is missing or the names are taken).
    """
    root = root or bccd_root()
    if root is None:
        return []
    known = set(DatasetCatalog.list())
    names = []
    for split in ("train", "val"):
        name = f"bccd_{split}"
        if name not in known:
            register_voc_detection(name, root, split, BCCD_CLASSES)
            names.append(name)
    return names
