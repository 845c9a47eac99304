"""The frozen teacher: built from its own config and weights, verified, locked in eval mode.

Silent teacher loading is the failure KD toolkits are known for (a teacher whose weights did not
load still "trains"). Everything here refuses to start, with a message that says what to fix,
rather than distil from a random network.

A teacher's config (``KD.TEACHER.CONFIG_FILE``) is any of:

* a yacs YAML file, as detectron2's ``train_net.py`` reads (``get_cfg()`` + this project's keys);
* a detectron2 LazyConfig: a ``.py`` file, or the ``.yaml`` that ``LazyConfig.save`` writes
  (recognised by its lower-case top-level nodes, ``model``, ``dataloader``, ...). The teacher is
  ``instantiate(cfg.model)``; ``KD.TEACHER.OPTS`` are then ``key=value`` overrides
  (``LazyConfig.apply_overrides``);
* ``hf://<folder or hub id>``, a Hugging Face ``transformers`` DETR teacher, built by the source
  registered for that prefix in :data:`TEACHER_SOURCES` (:mod:`kd.families.hf_detr`);
* ``zoo://<name>``, a name in detectron2's model zoo (``COCO-Detection/faster_rcnn_R_101_FPN_3x
  .yaml``), resolved with ``detectron2.model_zoo.get_config_file`` where detectron2 ships its
  model-zoo configs (the official install does; the pure-Python package does not, and
  ``configs/coco/zoo/`` holds this project's configs of the zoo architectures the recipes use).

Whatever built it, the teacher is described to the distillers by a :class:`TeacherInfo`, so that
no distiller reads a config system's keys.
"""

import dataclasses
import logging
import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from torch import nn

from kd.checkpoint import WeightsError, load_weights
from kd.class_map import INDEX, ClassMap, ClassMapError, build_class_map
from kd.config import load_config, python_tag_message
from kd.device import fork_rng, parse_dtype, set_precision
from kd.weights import fetch

__all__ = [
    "TeacherError",
    "TeacherInfo",
    "TEACHER_SOURCES",
    "build_teacher",
    "build_teacher_model",
    "load_teacher_config",
    "is_lazy_config",
    "resolve_config_file",
    "num_classes_of",
    "freeze",
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


# Teachers that are not detectron2 configs, by their KD.TEACHER.CONFIG_FILE prefix ("hf://"):
# (KD config) -> (the teacher built and loaded, not frozen; its TeacherInfo). The families that
# provide them register here (kd.families.hf_detr), so this module imports none of them.
TEACHER_SOURCES: Dict[str, Callable[[CfgNode], "tuple[nn.Module, TeacherInfo]"]] = {}


def _teacher_source(config_file: str):
    for prefix, build in TEACHER_SOURCES.items():
        if config_file.startswith(prefix):
            return build
    return None


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


def _load_config(cfg: CfgNode) -> "tuple[str, Any]":
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
    return _load_config(cfg)[1]


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


def _lazy_info(lcfg, model: nn.Module, path: str) -> TeacherInfo:
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


def _yacs_info(tcfg: CfgNode, path: str) -> TeacherInfo:
    return TeacherInfo(
        config=tcfg,
        input_format=tcfg.INPUT.FORMAT,
        num_classes=num_classes_of(tcfg),
        train_datasets=tuple(tcfg.DATASETS.TRAIN),
        config_file=path,
    )


# ----------------------------------------------------------------------------- checks
def _thing_classes(datasets: Sequence[str], load: bool = False) -> Optional[list]:
    if not datasets:
        return None
    metadata = MetadataCatalog.get(datasets[0])
    if load and not hasattr(metadata, "thing_classes"):
        # A COCO-json dataset says its classes when it is read (the trainer reads it anyway).
        from detectron2.data import DatasetCatalog

        try:
            DatasetCatalog.get(datasets[0])
        except Exception:  # noqa: BLE001 (not registered, unreadable: the names stay unknown)
            return None
    try:
        return list(metadata.thing_classes)
    except AttributeError:  # dataset registered without class names yet
        return None


def _accepts_class_map(cfg: CfgNode) -> bool:
    # The distiller says whether it compares mapped classes (its ``accepts_class_map``).
    from detectron2.modeling import META_ARCH_REGISTRY

    try:
        distiller = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        return bool(getattr(distiller, "accepts_class_map", False))
    except (KeyError, AttributeError):
        return False


def check_class_agreement(
    cfg: CfgNode, teacher: TeacherInfo, student_arch: str
) -> Optional[ClassMap]:
    """The teacher's classes mapped to the student's (``KD.TEACHER.CLASS_MAP``, by name), or a
    refusal where the distiller cannot compare them.

    Args:
        cfg: the KD config (describes the student).
        teacher: the teacher's description.
        student_arch: the student's meta-architecture.

    Returns:
        None where the classes are compared index by index (the same names in the same order,
        names unknown, or ``KD.TEACHER.CLASS_MAP ["index"]``); otherwise the :class:`ClassMap`.
    """
    spec = [str(x) for x in cfg.KD.TEACHER.CLASS_MAP]
    n_s = num_classes_of(cfg, student_arch)
    n_t = teacher.num_classes
    # Names are read (the datasets loaded) where they decide something: a teacher that names its
    # own classes, other class counts, or aliases. Otherwise names already known are compared.
    load = teacher.class_names is not None or n_s != n_t or bool(spec and spec != [INDEX])
    c_s = _thing_classes(list(cfg.DATASETS.TRAIN), load)
    c_t = (
        list(teacher.class_names)
        if teacher.class_names is not None
        else _thing_classes(teacher.train_datasets, load)
    )
    by_name = spec != [INDEX] and c_s is not None and c_t is not None
    if by_name and (len(c_s) != n_s or len(c_t) != n_t):
        by_name = False  # names that do not describe the class columns: index by index
    if by_name:
        try:
            class_map = build_class_map(c_s, c_t, spec)
        except ClassMapError as e:
            raise TeacherError(str(e)) from None
        if class_map.is_identity:
            return None
        if _accepts_class_map(cfg):
            logger.info("Teacher classes mapped to the student's: %s", class_map.describe())
            return class_map
    elif spec and spec != [INDEX]:
        raise TeacherError(
            f"KD.TEACHER.CLASS_MAP {spec}: the class names of the teacher or the student are "
            "unknown (their DATASETS.TRAIN[0] has no thing_classes), so classes cannot be "
            "mapped by name"
        )
    hint = (
        f" KD.TEACHER.CLASS_MAP maps a teacher's classes to the student's by name for the "
        f"distillers that compare mapped classes (KDDETRDistiller, DETRToRCNNDistiller), not "
        f"for {cfg.MODEL.META_ARCHITECTURE}."
        if by_name
        else ""
    )
    if n_s != n_t:
        raise TeacherError(
            f"class-count mismatch: the teacher ({cfg.KD.TEACHER.CONFIG_FILE}) predicts {n_t} "
            f"classes, the student {n_s}. Distillation compares class scores one to one: train "
            "the teacher on the student's classes, or set the student's NUM_CLASSES to match."
            + hint
        )
    if by_name:
        where = (
            f"dataset {teacher.train_datasets[0]}"
            if teacher.class_names is None
            else cfg.KD.TEACHER.CONFIG_FILE
        )
        raise TeacherError(
            f"class mismatch: the teacher was configured with {where} (classes {c_t}) and the "
            f"student with {cfg.DATASETS.TRAIN[0]} (classes {c_s}). Class scores are compared "
            "index by index, so both must use the same classes in the same order." + hint
        )
    return None


def _load_verified(model: nn.Module, path: str, what: str) -> None:
    if not path:
        raise TeacherError(
            f"KD.TEACHER.WEIGHTS is empty: a {what} without trained weights would distil noise. "
            "Train the teacher first (python train_net.py --config-file <teacher config>) and set "
            "KD.TEACHER.WEIGHTS to its model_final.pth"
        )
    local = path
    if "://" in path:
        try:
            local = fetch(path, "KD.TEACHER.WEIGHTS")
        except WeightsError as e:  # the server did not answer in time
            raise TeacherError(str(e)) from None
        except Exception as e:  # noqa: BLE001 (iopath's handlers raise many types offline)
            raise TeacherError(
                f"KD.TEACHER.WEIGHTS '{path}' cannot be fetched ({type(e).__name__}: {e}). "
                "Download it where the internet is reachable (detectron2:// names are "
                "https://dl.fbaipublicfiles.com/detectron2/...) and set KD.TEACHER.WEIGHTS to the "
                "local file"
            ) from None
    if not os.path.isfile(local):
        raise TeacherError(
            f"KD.TEACHER.WEIGHTS '{path}' does not exist: train the teacher first "
            "(python train_net.py --config-file <teacher config>) or fix the path"
        )
    try:
        load_weights(
            model,
            path,
            complete=True,
            key="KD.TEACHER.WEIGHTS",
            what="teacher built from KD.TEACHER.CONFIG_FILE",
            distiller_checkpoint="refuse",
        )
    except WeightsError as e:
        raise TeacherError(str(e)) from None


def _locked_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # A frozen teacher stays in eval mode: BatchNorm statistics, dropout and training-only code
    # paths (proposal sampling, losses) must not switch on when the trainer calls model.train().
    return nn.Module.train(self, False)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze ``model`` in place: no gradients, eval mode, and ``train()`` locked to eval.

    Args:
        model: the teacher.
    """
    model.requires_grad_(False)
    nn.Module.train(model, False)
    model.train = types.MethodType(_locked_train, model)
    return model


# ----------------------------------------------------------------------------- building
def _instantiate(lcfg, path: str, device: str) -> nn.Module:
    from detectron2.config import instantiate

    try:
        model = instantiate(lcfg.model)
    except Exception as e:  # noqa: BLE001 (the config's constructors raise anything)
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}': instantiate(cfg.model) failed: "
            f"{type(e).__name__}: {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise TeacherError(
            f"KD.TEACHER.CONFIG_FILE '{path}': instantiate(cfg.model) gave a "
            f"{type(model).__name__}, not a model: cfg.model must be L(<detector class>)(...)"
        )
    return model.to(torch.device(device))


def _build(cfg: CfgNode, tcfg, path: str) -> nn.Module:
    dtype = parse_dtype(cfg.KD.TEACHER.DTYPE, "KD.TEACHER.DTYPE", cfg.MODEL.DEVICE)
    with fork_rng():
        # Building the teacher must not shift the RNG stream the student is initialised from:
        # the same seed gives the same student with or without distillation.
        if isinstance(tcfg, CfgNode):
            model = build_model(tcfg)
        else:
            model = _instantiate(tcfg, path, cfg.MODEL.DEVICE)
    _set_precision(cfg, model, dtype)
    return model


def _set_precision(cfg: CfgNode, model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    if dtype is None:
        dtype = parse_dtype(cfg.KD.TEACHER.DTYPE, "KD.TEACHER.DTYPE", cfg.MODEL.DEVICE)
    # Also in float32, so that the student's autocast (SOLVER.AMP) does not reach the teacher.
    if dtype != torch.float32 or cfg.SOLVER.AMP.ENABLED:
        set_precision(model, dtype, cfg.MODEL.DEVICE)


def build_teacher_model(cfg: CfgNode) -> "tuple[nn.Module, TeacherInfo]":
    """The teacher's architecture, built on ``cfg.MODEL.DEVICE`` but not loaded or frozen (for
    tools that need a teacher of the right shape, e.g. a random one to time).

    Args:
        cfg: the KD config.
    """
    source = _teacher_source(cfg.KD.TEACHER.CONFIG_FILE)
    if source is not None:
        model, info = source(cfg)
        _set_precision(cfg, model)
        return model, info
    path, tcfg = _load_config(cfg)
    model = _build(cfg, tcfg, path)
    info = _yacs_info(tcfg, path) if isinstance(tcfg, CfgNode) else _lazy_info(tcfg, model, path)
    return model, info


def build_teacher(cfg: CfgNode, student_arch: str) -> "tuple[nn.Module, TeacherInfo]":
    """Build, load and verify the frozen teacher named by ``cfg.KD.TEACHER``.

    Args:
        cfg: the KD config.
        student_arch: the student's meta-architecture (to compare class counts).

    Returns:
        (teacher, info): the frozen teacher on ``cfg.MODEL.DEVICE`` and its description.
    """
    source = _teacher_source(cfg.KD.TEACHER.CONFIG_FILE)
    if source is not None:
        # Built and loaded (and verified) by its family's source, from its own folder.
        with fork_rng():
            teacher, info = source(cfg)
        _set_precision(cfg, teacher)
        class_map = check_class_agreement(cfg, info, student_arch)
        path = info.config_file
    else:
        path, tcfg = _load_config(cfg)
        if isinstance(tcfg, CfgNode):
            # A yacs config says its classes before anything is built: refuse early.
            info = _yacs_info(tcfg, path)
            class_map = check_class_agreement(cfg, info, student_arch)
            teacher = _build(cfg, tcfg, path)
        else:
            teacher = _build(cfg, tcfg, path)
            info = _lazy_info(tcfg, teacher, path)
            class_map = check_class_agreement(cfg, info, student_arch)
        _load_verified(teacher, cfg.KD.TEACHER.WEIGHTS, "teacher")
    if class_map is not None:
        info = dataclasses.replace(info, class_map=class_map)
    logger.info(
        "Teacher %s loaded from %s (config %s, %s input)",
        type(teacher).__name__,
        cfg.KD.TEACHER.WEIGHTS or path,
        path,
        info.input_format,
    )
    return freeze(teacher), info
