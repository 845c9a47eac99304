"""Reading configs: a config file and overrides merged into a KD config with one-line errors
(:func:`merge_config`), the whole config of a run (:func:`load_config`, which every entry point
uses), the device, and the student's own config (:func:`student_config`)."""

import difflib
import logging
import os
import re
from typing import List, Optional, Sequence

from detectron2.config import CfgNode as CN

from kd.config.keys import add_kd_config

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config cannot be built as given; the message names the key, where it came from and a
    fix."""


def merge_config(
    cfg: CN,
    config_file: str,
    opts: Sequence[str] = (),
    *,
    file_option: str = "--config-file",
    opts_origin: str = "the command line",
) -> None:
    """``cfg.merge_from_file(config_file)`` then ``cfg.merge_from_list(opts)``, with yacs' errors
    (an unknown key, a value of the wrong type, an odd number of overrides, a file that is missing
    or not YAML) turned into one :class:`ConfigError` line that says where the mistake is and, for
    an unknown key, which existing keys are closest.

    Args:
        cfg: a config holding every key the file may set (``get_cfg()`` + ``add_kd_config``).
        config_file: the YAML file (its ``_BASE_`` files are read too).
        opts: ``KEY VALUE`` overrides.
        file_option, opts_origin: how the user gave the file and the overrides, for messages.
    """
    import yaml

    if not os.path.isfile(config_file):
        raise ConfigError(f"{file_option} '{config_file}' does not exist")
    try:
        # allow_unsafe=False: fvcore would otherwise fall back to yaml.unsafe_load, which runs
        # what a !!python tag names. A config file is data.
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(python_tag_message(e, config_file, file_option)) from None
    except KeyError as e:  # yacs: "Non-existent config key: A.B.C"
        key = _unknown_key(e)
        if key is None:
            raise ConfigError(f"{config_file}: {_message(e)}") from None
        where = _file_setting(config_file, key) or config_file
        raise ConfigError(_unknown_key_message(cfg, key, f"in {where}")) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_file} is not valid YAML: {_message(e)}") from None
    except (ValueError, AssertionError, OSError) as e:
        raise ConfigError(f"{config_file}: {_type_message(e)}") from None
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(
            f"the overrides on {opts_origin} must be KEY VALUE pairs, got {len(opts)} words "
            f"(the last, '{opts[-1]}', has no value)"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, AssertionError) as e:  # yacs: "Non-existent key: A.B.C"
            if _unknown_key(e) is None:
                raise ConfigError(f"{key} on {opts_origin}: {_message(e)}") from None
            raise ConfigError(_unknown_key_message(cfg, key, f"on {opts_origin}")) from None
        except ValueError as e:
            raise ConfigError(f"{key} {value} on {opts_origin}: {_type_message(e)}") from None


def python_tag_message(error: Exception, config_file: str, file_option: str) -> str:
    """The line refusing a YAML config with a tag PyYAML's safe loader does not know (a
    ``!!python/...`` tag runs code when read unsafely).

    Args:
        error: the ``yaml.constructor.ConstructorError``.
        config_file: the file given (the tag may be in one of its ``_BASE_`` files).
        file_option: how the user gave the file, for the message.
    """
    mark = getattr(error, "problem_mark", None)
    where = getattr(mark, "name", None) or config_file
    if mark is not None and not str(where).startswith("<"):
        where = f"{where}, line {mark.line + 1}"
    else:
        where = config_file
    tag = re.search(r"tag '([^']*)'", str(error))
    tag = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else "(unknown)"
    return (
        f"refusing to read {file_option} '{config_file}': {where} has the YAML tag "
        f"{tag}, which would build Python objects or run code. "
        "Config files are read without running anything: write plain values instead"
    )


def load_config(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    file_option: str = "--config-file",
    opts_origin: str = "the command line",
    device: bool = True,
) -> CN:
    """A run's config as every entry point reads it: detectron2's defaults, the ``kd`` keys
    (:func:`add_kd_config`), the file, then ``opts``, and ``MODEL.DEVICE`` resolved
    (:func:`resolve_device`); not frozen.

    Args:
        config_file: the YAML file (its ``_BASE_`` files are read too).
        opts: ``KEY VALUE`` overrides.
        file_option, opts_origin: how the user gave the file and the overrides, for messages.
        device: resolve ``MODEL.DEVICE`` (False for a teacher's config: the teacher runs on
            its student's device).

    Raises:
        ConfigError: a missing file, an unknown key, a value of the wrong type, CUDA asked for
            where there is none (one line).
    """
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_kd_config(cfg)
    merge_config(cfg, config_file, opts, file_option=file_option, opts_origin=opts_origin)
    if device:
        resolve_device(cfg, config_file, opts, opts_origin=opts_origin)
    return cfg


_FELL_BACK_TO_CPU = []  # logged once per process


def resolve_device(
    cfg: CN,
    config_file: Optional[str] = None,
    opts: Sequence[str] = (),
    *,
    opts_origin: str = "the command line",
) -> None:
    """Make ``cfg.MODEL.DEVICE`` a device this process has, in place.

    Where neither the config file (nor a ``_BASE_`` of it) nor ``opts`` sets ``MODEL.DEVICE``,
    detectron2's default, "cuda", applies: the GPU when torch sees one, else the CPU (said once
    in the log). A CUDA device that was asked for and is not there stops the run with one line,
    never a silent move to the CPU; "cpu" always stays "cpu".

    Args:
        cfg: the merged config (not frozen).
        config_file: the config file it was read from (None: only ``opts`` count as explicit).
        opts: the ``KEY VALUE`` overrides merged into it.
        opts_origin: how the user gave the overrides, for messages.

    Raises:
        ConfigError: ``MODEL.DEVICE`` names a CUDA device this process does not have.
    """
    import torch

    device = str(cfg.MODEL.DEVICE)
    if not device.startswith("cuda"):
        return
    opts = list(opts)
    if "MODEL.DEVICE" in opts[0::2]:
        where = f"on {opts_origin}"
    else:
        where = _file_setting(config_file, "MODEL.DEVICE") if config_file else None
        where = f"in {where}" if where else None
    if torch.cuda.is_available():
        index = device.partition(":")[2]
        count = torch.cuda.device_count()
        if index and (not index.isdigit() or int(index) >= count):
            raise ConfigError(
                f"MODEL.DEVICE {device} ({where or 'given'}) but this process sees {count} "
                f"GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}): name one of "
                "them, or use MODEL.DEVICE cuda and let the launcher pick (--num-gpus)"
            )
        return
    why = (
        "this torch is a CPU-only build"
        if torch.version.cuda is None
        else "torch sees no GPU, CUDA_VISIBLE_DEVICES="
        f"'{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}'"
    )
    if where is None:  # detectron2's default, not the user's choice
        cfg.MODEL.DEVICE = "cpu"
        if not _FELL_BACK_TO_CPU:
            _FELL_BACK_TO_CPU.append(True)
            logger.warning(
                "No CUDA device (%s): running on the CPU. MODEL.DEVICE is not set (detectron2's "
                "default is cuda); set it to cpu to silence this",
                why,
            )
        return
    raise ConfigError(
        f"MODEL.DEVICE {device} ({where}) but there is no CUDA device: {why}. Set "
        "MODEL.DEVICE cpu to train on the CPU, or run where torch sees a GPU"
    )


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _type_message(e: BaseException) -> str:
    # yacs: "Type mismatch (<class 'float'> vs. <class 'str'>) with values (0.01 vs. abc) for
    # config key: SOLVER.BASE_LR"
    m = re.match(
        r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
        r"for config key: (\S+)",
        _message(e),
    )
    if not m:
        return _message(e)
    want, got, default, value, key = m.groups()
    return f"{key} takes a {want} (now {default}), not the {got} {value}"


def _unknown_key(e: BaseException) -> Optional[str]:
    m = re.match(r"Non-existent (?:config )?key: (\S+)", _message(e))
    return m.group(1) if m else None


def _all_keys(cfg: CN, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, CN):
            keys.extend(_all_keys(v, f"{prefix}{k}."))
    return keys


def _unknown_key_message(cfg: CN, key: str, where: str) -> str:
    depth = key.count(".")
    same_depth = [k for k in _all_keys(cfg) if k.count(".") == depth]
    close = difflib.get_close_matches(key, same_depth, n=3, cutoff=0.8)
    hint = (
        f"did you mean {' or '.join(close)}?"
        if close
        else "no existing key is close: the keys are detectron2's (detectron2/config/defaults.py) "
        "and this project's (projects/kd/config/keys.py)"
    )
    return f"unknown config key {key} {where}: {hint}"


def _file_setting(config_file: str, key: str) -> Optional[str]:
    """The file of ``config_file``'s ``_BASE_`` chain (itself first) that sets ``key``."""
    import yaml

    try:
        with open(config_file) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        return config_file
    base = data.get("_BASE_") if isinstance(data, dict) else None
    if isinstance(base, str):
        base = os.path.expanduser(base)
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(config_file), base)
        return _file_setting(base, key)
    return None


def student_config(cfg: CN) -> CN:
    """The plain detectron2 config of the student inside a KD config.

    Args:
        cfg: the KD config.

    Returns:
        A copy of ``cfg`` whose ``MODEL.META_ARCHITECTURE`` is the student's.
    """
    scfg = cfg.clone()
    scfg.defrost()
    scfg.MODEL.META_ARCHITECTURE = cfg.KD.STUDENT.META_ARCHITECTURE
    scfg.freeze()
    return scfg
