"""A teacher's config file, read whatever its kind (a yacs YAML file, a detectron2 LazyConfig, a
``zoo://`` name), and what the distillers are told about a teacher (:class:`TeacherInfo`), so that
no distiller reads a config system's keys. :mod:`kd.teacher` builds the teacher from them."""

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from torch import nn

from kd.class_map import ClassMap
from kd.config import load_config, python_tag_message

__all__ = [
    "TeacherError",
    "TeacherInfo",
    "ZOO_PREFIX",
    "load_teacher_config",
    "is_lazy_config",
    "resolve_config_file",
    "num_classes_of",
    "read_teacher_config",
    "yacs_info",
    "lazy_info",
]

logger = logging.getLogger(__name__)

ZOO_PREFIX = "zoo://"
# This project's configs of the model-zoo architectures the COCO recipes use.
PROJECT_ZOO_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "coco",
    "zoo",
)
# The top-level nodes of a detectron2 LazyConfig; a yacs file's keys are upper case.
_LAZY_NODES = ("model", "dataloader", "train", "optimizer", "lr_multiplier")


class TeacherError(ValueError):
    """The teacher cannot be used as configured; the message says how to fix it."""


@dataclass(frozen=True)
class TeacherInfo:
    """What the distillers and checks need to know about a teacher, from either config system.

    Attributes:
        config: the teacher's own config: a frozen yacs ``CfgNode`` or a LazyConfig
            (omegaconf ``DictConfig``), with ``KD.TEACHER.OPTS`` applied.
        input_format: the channel order the teacher was trained on, "BGR" or "RGB".
        num_classes: the number of object classes it predicts.
        train_datasets: the datasets it was trained on, as its config names them (may be empty).
        config_file: ``KD.TEACHER.CONFIG_FILE`` as resolved (a ``zoo://`` name made a path).
        class_names: the names of its class columns where the teacher itself says them (a
            Hugging Face ``id2label``); None: its training dataset's ``thing_classes``.
        class_map: its classes mapped to the student's (``KD.TEACHER.CLASS_MAP``), set by
            :func:`build_teacher` when they are not the student's classes in the student's order;
            None: compared index by index.
    """

    config: Any
    input_format: str
    num_classes: int
    train_datasets: Tuple[str, ...]
    config_file: str
    class_names: Optional[Tuple[str, ...]] = None
    class_map: Optional[ClassMap] = None

    @property
    def is_lazy(self) -> bool:
        return not isinstance(self.config, CfgNode)


# ----------------------------------------------------------------------------- config files
def resolve_config_file(path: str) -> str:
    """The file ``KD.TEACHER.CONFIG_FILE`` names: a ``zoo://`` name resolved, the file checked.

    Args:
        path: the value of ``KD.TEACHER.CONFIG_FILE``.

    Raises:
        TeacherError: empty, missing, or a ``zoo://`` name this detectron2 cannot resolve.
    """
    if not path:
        raise TeacherError(
            "KD.TEACHER.CONFIG_FILE is empty: set it to the teacher's detectron2 config (yacs YAML "
            "or LazyConfig), e.g. KD.TEACHER.CONFIG_FILE configs/kd_shapes/faster_rcnn_teacher.yaml"
        )
    if path.startswith(ZOO_PREFIX):
        return _zoo_config_file(path)
    if not os.path.isfile(path):
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}' does not exist (relative paths are taken from the "
            f"current directory, {os.getcwd()}): point it at the teacher's config file"
        )
    return path


def _zoo_config_file(path: str) -> str:
    name = path[len(ZOO_PREFIX) :]
    try:
        from detectron2 import model_zoo

        return model_zoo.get_config_file(name)
    except (ImportError, RuntimeError):
        pass
    copy = os.path.join(PROJECT_ZOO_CONFIGS, os.path.basename(name))
    if os.path.isfile(copy):
        hint = (
            f"this project's config of that architecture is {os.path.relpath(copy)}: set "
            f"KD.TEACHER.CONFIG_FILE {os.path.relpath(copy)}"
        )
    else:
        hint = (
            f"this project has no config of it in {os.path.relpath(PROJECT_ZOO_CONFIGS)}: install "
            "the official detectron2 (its model-zoo configs come with it) or write the teacher's "
            "config and point KD.TEACHER.CONFIG_FILE at it"
        )
    raise TeacherError(
        f"KD.TEACHER.CONFIG_FILE '{path}': the installed detectron2 has no model-zoo config "
        f"'{name}' (the pure-Python detectron2 package ships none); {hint}"
    )


def is_lazy_config(path: str) -> bool:
    """Whether ``path`` is a detectron2 LazyConfig (``.py``, or YAML that ``LazyConfig.save``
    wrote) rather than a yacs YAML file.

    Args:
        path: an existing config file.
    """
    ext = os.path.splitext(path)[1]
    if ext == ".py":
        return True
    if ext not in (".yaml", ".yml"):
        return False
    import yaml

    class _AnyTagLoader(yaml.SafeLoader):
        """Reads the structure only: yacs files may carry python tags (``!!python/...``)."""

    _AnyTagLoader.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_AnyTagLoader)
    except (OSError, yaml.YAMLError):
        return False  # the yacs reader reports what is wrong with the file
    return isinstance(data, dict) and any(node in data for node in _LAZY_NODES)


def _load_lazy_config(path: str, overrides: Sequence[str]):
    from detectron2.config import LazyConfig

    if os.path.splitext(path)[1] in (".yaml", ".yml"):
        # LazyConfig.load reads YAML with yaml.unsafe_load: refuse what only that would read.
        import yaml

        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.constructor.ConstructorError as e:
            raise TeacherError(python_tag_message(e, path, "KD.TEACHER.CONFIG_FILE")) from None
        except (OSError, yaml.YAMLError):
            pass  # LazyConfig.load says what is wrong with it
    try:
        lcfg = LazyConfig.load(path)
    except Exception as e:  # noqa: BLE001 (a config file is code: any error is the user's)
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}' (a LazyConfig) cannot be loaded: "
            f"{type(e).__name__}: {e}"
        ) from None
    if "model" not in lcfg:
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}' is a LazyConfig without a 'model' node (it has "
            f"{', '.join(sorted(lcfg.keys())) or 'none'}): the teacher is instantiate(cfg.model), "
            "so the file must define model = L(<detector class>)(...)"
        )
    not_key_value = [o for o in overrides if "=" not in str(o)]
    if not_key_value:
        raise TeacherError(
            f"KD.TEACHER.OPTS of a LazyConfig teacher are key=value overrides "
            f"(LazyConfig.apply_overrides), e.g. model.roi_heads.num_classes=7; got "
            f"{list(overrides)}"
        )
    try:
        return LazyConfig.apply_overrides(lcfg, list(overrides))
    except Exception as e:  # noqa: BLE001 (hydra's parser and omegaconf raise several types)
        raise TeacherError(
            f"KD.TEACHER.OPTS {list(overrides)} cannot be applied to the LazyConfig '{path}': "
            f"{type(e).__name__}: {e}"
        ) from None


def read_teacher_config(cfg: CfgNode) -> "tuple[str, Any]":
    """(the resolved config file, the teacher's config with ``KD.TEACHER.OPTS`` applied)."""
    path = resolve_config_file(cfg.KD.TEACHER.CONFIG_FILE)
    if is_lazy_config(path):
        return path, _load_lazy_config(path, cfg.KD.TEACHER.OPTS)
    tcfg = load_config(
        path,
        list(cfg.KD.TEACHER.OPTS),
        file_option="KD.TEACHER.CONFIG_FILE",
        opts_origin="KD.TEACHER.OPTS",
        device=False,
    )
    # The teacher lives on the student's device whatever its own config says.
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.KD.TEACHER.WEIGHTS
    tcfg.freeze()
    return path, tcfg


def load_teacher_config(cfg: CfgNode):
    """Read the teacher's own config named by ``KD.TEACHER.CONFIG_FILE``.

    Args:
        cfg: the KD config.

    Returns:
        The teacher's config with ``KD.TEACHER.OPTS`` applied: a frozen yacs ``CfgNode`` on the
        student's device, or a LazyConfig ``DictConfig``.
    """
    return read_teacher_config(cfg)[1]


def num_classes_of(cfg: CfgNode, meta_arch: Optional[str] = None) -> int:
    """The number of object classes a detector built from ``cfg`` predicts.

    Args:
        cfg: a detectron2 config.
        meta_arch: the meta-architecture to read it for (default: ``cfg.MODEL.META_ARCHITECTURE``).
    """
    arch = meta_arch or cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return cfg.MODEL.RETINANET.NUM_CLASSES
    if arch == "FCOS":
        return cfg.MODEL.FCOS.NUM_CLASSES
    if arch == "DETR":
        return cfg.MODEL.DETR.NUM_CLASSES
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def _module_num_classes(model: nn.Module) -> Optional[int]:
    """The class count a built detector predicts (R-CNNs in their ROI heads, dense detectors and
    DETRs on the model)."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and isinstance(getattr(roi_heads, "num_classes", None), int):
        return roi_heads.num_classes
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) else None


def _lazy_select(lcfg, key: str):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(lcfg, key, default=None)
    except Exception:  # noqa: BLE001 (an interpolation that does not resolve: treat as unset)
        return None


def lazy_info(lcfg, model: nn.Module, path: str) -> TeacherInfo:
    """What a LazyConfig teacher tells the distillers (its model built)."""
    # The data loader's image_format is what the weights were trained on: detectron2's own
    # LazyConfigs switch to RGB there (ViTDet, MViTv2, torchvision-initialised models) and often
    # leave model.input_format at its "BGR" default, which only visualisation reads.
    input_format = (
        _lazy_select(lcfg, "dataloader.train.mapper.image_format")
        or _lazy_select(lcfg, "dataloader.test.mapper.image_format")
        or getattr(model, "input_format", None)
    )
    if input_format not in ("BGR", "RGB"):
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}': cannot tell the channel order the teacher was "
            f"trained on (got {input_format!r}): set dataloader.train.mapper.image_format (or "
            'model.input_format) to "BGR" or "RGB", e.g. with KD.TEACHER.OPTS '
            "['dataloader.train.mapper.image_format=RGB']"
        )
    num_classes = _module_num_classes(model)
    if num_classes is None:
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}' builds a {type(model).__name__}, whose number of "
            "classes cannot be read (roi_heads.num_classes or num_classes): the distillers take "
            "detectron2's GeneralizedRCNN, RetinaNet, FCOS and this project's DETR"
        )
    names = _lazy_select(lcfg, "dataloader.train.dataset.names")
    if isinstance(names, str):
        names = [names]
    return TeacherInfo(
        config=lcfg,
        input_format=str(input_format),
        num_classes=num_classes,
        train_datasets=tuple(str(n) for n in names or ()),
        config_file=path,
    )


def yacs_info(tcfg: CfgNode, path: str) -> TeacherInfo:
    """What a yacs teacher tells the distillers."""
    return TeacherInfo(
        config=tcfg,
        input_format=tcfg.INPUT.FORMAT,
        num_classes=num_classes_of(tcfg),
        train_datasets=tuple(tcfg.DATASETS.TRAIN),
        config_file=path,
    )
