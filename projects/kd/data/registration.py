"""Register folder datasets and check registered datasets' annotation files before a run starts.

Folder convention: every ``ROOT/NAME/annotations/instances_{train,val}.json`` (COCO format) is
registered as ``NAME_train`` / ``NAME_val`` with images under ``ROOT/NAME/{train,val}/``.
``ROOT`` is ``$DETECTRON2_DATASETS`` (default ``./datasets``), the same folder where detectron2
itself looks for its builtin datasets (``coco_2017_train`` under ``ROOT/coco/`` etc.).
"""

import difflib
import functools
import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["datasets_root", "register_folder_datasets", "validate_dataset", "validate_datasets"]

SPLITS = ("train", "val")
_ENV = "DETECTRON2_DATASETS"
_CREATE_KD_SHAPES = (
    "python datasets/prepare_synthetic.py --root datasets --name kd_shapes --seed 0 "
    "--num-train 2000 --num-val 500"
)
# (json_file, mtime, size) of files that passed, so that a dataset used for both training and
# evaluation is not parsed twice.
_VALIDATED: Dict[Tuple[str, str], Tuple[float, int]] = {}


def datasets_root(root: Optional[str] = None) -> str:
    """The datasets folder: ``root`` if given, else ``$DETECTRON2_DATASETS``, else ``datasets``."""
    if root is not None:
        return root
    return os.environ.get(_ENV, "datasets")


def _folder_json(root: str, folder: str, split: str) -> str:
    return os.path.join(root, folder, "annotations", f"instances_{split}.json")


def register_folder_datasets(root: Optional[str] = None) -> List[str]:
    """Register every split found under ``root`` in the folder convention (see module doc).

    Names that are already registered are skipped, so calling this again (or after another root
    provided the same name) is harmless. Paths are made absolute, so a later ``chdir`` does not
    break the datasets.

    Args:
        root: the datasets folder; default ``$DETECTRON2_DATASETS``, else ``./datasets``.

    Returns:
        The names registered by this call.
    """
    root = datasets_root(root)
    if not os.path.isdir(root):
        return []
    known = set(DatasetCatalog.list())
    registered = []
    for folder in sorted(os.listdir(root)):
        if folder.startswith("."):
            continue
        for split in SPLITS:
            json_file = _folder_json(root, folder, split)
            name = f"{folder}_{split}"
            if name in known or not os.path.isfile(json_file):
                continue
            image_root = os.path.join(root, folder, split)
            _register_coco(name, os.path.abspath(json_file), os.path.abspath(image_root))
            known.add(name)
            registered.append(name)
    return registered


def _register_coco(name: str, json_file: str, image_root: str) -> None:
    """detectron2's ``register_coco_instances``, keeping each annotation's COCO ``id`` in the
    dicts so that a bad box is named by it (:mod:`kd.data.validation`)."""
    DatasetCatalog.register(
        name,
        functools.partial(
            load_coco_json, json_file, image_root, name, extra_annotation_keys=["id"]
        ),
    )
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def _root_description() -> str:
    value = os.environ.get(_ENV)
    root = datasets_root()
    where = f"${_ENV}={value!r}" if value is not None else f"${_ENV} is unset, so './datasets'"
    return f"{where} (resolves to {os.path.abspath(root)!r} from the current directory)"


def _unregistered_message(name: str) -> str:
    registered = sorted(DatasetCatalog.list())
    close = difflib.get_close_matches(name, registered, n=5, cutoff=0.6)
    lines = [f"Dataset {name!r} is not registered in detectron2's DatasetCatalog."]
    if close:
        lines.append(f"Registered names that look close: {', '.join(close)}.")
    root = datasets_root()
    base, _, split = name.rpartition("_")
    if base and split in SPLITS:
        json_file = _folder_json(root, base, split)
        if os.path.isfile(json_file):
            lines.append(
                f"{json_file} exists but was created after `kd` was imported (which registers "
                "folder datasets): call kd.data.register_folder_datasets() or restart."
            )
        else:
            lines.append(f"Folder datasets expect {os.path.abspath(json_file)}, which is missing.")
    elif base and os.path.isdir(os.path.join(root, base, "annotations")):
        lines.append(
            f"Folder dataset {base!r} exists, but folder datasets have only the splits "
            f"{', '.join(f'{base}_{s}' for s in SPLITS)}."
        )
    lines += [
        "Folder datasets: importing `kd` registers every ROOT/NAME/annotations/"
        "instances_{train,val}.json as NAME_train / NAME_val (images in ROOT/NAME/{train,val}/), "
        f"where ROOT is ${_ENV}; now {_root_description()}.",
        f"To create the default benchmark run, from the repository root: {_CREATE_KD_SHAPES} "
        f"(with another --root, export {_ENV}=<that root> before starting Python).",
    ]
    return "\n".join(lines)


def _fix_hint(name: str, json_file: str) -> str:
    """How to provide the annotation file of ``name``, depending on how it was registered."""
    ann_dir = os.path.dirname(os.path.abspath(json_file))
    folder_dir = os.path.dirname(ann_dir)
    folder = os.path.basename(folder_dir)
    base, _, split = name.rpartition("_")
    if (
        os.path.basename(ann_dir) == "annotations"
        and base == folder
        and os.path.basename(json_file) == f"instances_{split}.json"
    ):
        return (
            f"{name!r} is a folder dataset ({folder_dir}). If it is synthetic, regenerate it: "
            f"python datasets/prepare_synthetic.py --root {os.path.dirname(folder_dir)} "
            f"--name {folder} --seed 0 --num-train N --num-val M; otherwise restore its "
            f"COCO-format file at {json_file}."
        )
    if "coco" in name or f"{os.sep}coco{os.sep}" in json_file:
        return (
            f"{name!r} is registered by detectron2 under ${_ENV}/coco/ when detectron2 is "
            f"imported; now {_root_description()}. Put COCO there as "
            "coco/{train2017,val2017,annotations} (annotations/instances_{train,val}2017.json), "
            f"or set {_ENV} to the folder that holds coco/ before starting Python."
        )
    return (
        f"{name!r} was registered with json_file={json_file!r}; create that file or fix the code "
        "that registers the dataset."
    )


def _load_json(name: str, json_file: str) -> object:
    try:
        with open(json_file, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"Annotation file of dataset {name!r} is not valid JSON: {json_file}: {e}. It is "
            f"probably truncated (an interrupted download or generation).\n"
            f"Fix: {_fix_hint(name, json_file)}"
        ) from e
    except OSError as e:
        raise ValueError(
            f"Annotation file of dataset {name!r} cannot be read: {json_file}: {e}.\n"
            "Fix: check its permissions (it must be readable by this user)."
        ) from e


def _check_coco_file(name: str, json_file: str, image_root: Optional[str]) -> None:
    data = _load_json(name, json_file)
    fix = f"Fix: {_fix_hint(name, json_file)}"
    missing = [
        key
        for key in ("images", "annotations", "categories")
        if not isinstance(data, dict) or not isinstance(data.get(key), list)
    ]
    if missing:
        raise ValueError(
            f"Annotation file of dataset {name!r} is not a COCO instances file: {json_file} lacks "
            f"the list(s) {', '.join(missing)} (a detection file has images, annotations and "
            f"categories; image-info files such as image_info_test2017.json are for inference "
            f"only).\n{fix}"
        )
    for key in ("images", "annotations", "categories"):
        if not data[key]:
            raise ValueError(
                f"Annotation file of dataset {name!r} has zero {key}: {json_file}. Nothing could "
                f"be trained or evaluated on it.\n{fix}"
            )
    _check_categories(name, json_file, data)
    # Each image file is checked with the boxes, before the run (kd.data.validation).
    if image_root is not None and not os.path.isdir(image_root):
        raise FileNotFoundError(
            f"Image folder of dataset {name!r} does not exist: {image_root} (annotations: "
            f"{json_file}).\n{fix}"
        )


def _check_categories(name: str, json_file: str, data: dict) -> None:
    """Every annotation's ``category_id`` must be declared in ``categories``: detectron2's COCO
    loader stops with a bare ``KeyError`` otherwise, so this cannot be skipped either."""
    declared = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    bad = [a for a in data["annotations"] if a.get("category_id") not in declared]
    if not bad:
        return
    files = {i.get("id"): i.get("file_name") for i in data["images"] if isinstance(i, dict)}
    examples = "\n".join(
        f"  {files.get(a.get('image_id'), '<image_id ' + str(a.get('image_id')) + '>')}: "
        f"annotation id {a.get('id')}: category_id {a.get('category_id')!r}"
        for a in bad[:5]
    )
    raise ValueError(
        f"Dataset {name!r}: {len(bad)} annotations of {json_file} have a category_id that its "
        f"'categories' list ({sorted(declared, key=str)}) does not declare. First ones:\n"
        f"{examples}\nFix: correct those annotations or declare their categories in the file."
    )


def validate_dataset(name: str) -> None:
    """Check that ``name`` is registered and that its annotation file is usable.

    For COCO-format datasets (those whose metadata has a ``json_file``: folder datasets, the
    builtin ``coco_*`` names, anything registered with ``register_coco_instances``) the file must
    exist, parse as JSON, hold at least one image, annotation and category, declare the category
    of every annotation, and its image folder must exist. Other datasets are only checked for
    registration. The file is parsed once per process while it does not change. Each image file
    and box is checked later, on the dataset dicts, before the first step or the first inference
    (:mod:`kd.data.validation`).

    Args:
        name: a dataset name, e.g. ``cfg.DATASETS.TRAIN[0]``.

    Raises:
        ValueError: the name is not registered, or the file is unreadable, not JSON, not a COCO
            detection file, empty, or uses undeclared categories. The message says how to fix it.
        FileNotFoundError: the annotation file or the image folder is missing.
    """
    if name not in DatasetCatalog.list():
        raise ValueError(_unregistered_message(name))
    metadata = MetadataCatalog.get(name)
    json_file = metadata.get("json_file")
    if json_file is None:
        return
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"Annotation file of dataset {name!r} not found: {json_file}.\n"
            f"Fix: {_fix_hint(name, json_file)}"
        )
    stat = os.stat(json_file)
    stamp = (stat.st_mtime, stat.st_size)
    if _VALIDATED.get((name, json_file)) == stamp:
        return
    _check_coco_file(name, json_file, metadata.get("image_root"))
    _VALIDATED[(name, json_file)] = stamp


def validate_datasets(names: Iterable[str]) -> None:
    """:func:`validate_dataset` for each name (e.g. ``cfg.DATASETS.TRAIN + cfg.DATASETS.TEST``).

    Args:
        names: dataset names; duplicates are checked once. A single string counts as one name.
    """
    if isinstance(names, str):
        names = [names]
    for name in dict.fromkeys(names):
        validate_dataset(name)
