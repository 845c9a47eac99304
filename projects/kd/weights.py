"""Reading weight files without running code, and writing checkpoints that a kill cannot destroy.

Weight files come from users, model zoos and other people's runs: they are untrusted input.
Python's pickle (which detectron2 uses for ``.pkl``, and ``torch.load`` for ``.pth`` unless it is
restricted to weights) calls whatever callable a file names, so a file can run code when it is read.
Here ``.pth`` / ``.pyth`` files are read with ``torch.load(weights_only=True)`` and ``.pkl`` files
with an unpickler that admits numpy arrays and plain containers only; a file that needs more is
refused with :class:`UnsafeWeightsError`. :func:`load_checkpoint_file` is the one reader, used by
:class:`KDCheckpointer` (teacher, ``MODEL.WEIGHTS``, ``--eval-only``, ``--resume``) and by every
tool.

Checkpoints are written to a temporary file that is fsync'ed and renamed over the target, and
``last_checkpoint`` is replaced the same way after it: a process killed while saving leaves the
previous checkpoint and the pointer to it intact.
"""

import codecs
import errno
import hashlib
import logging
import os
import pickle
import re
import tempfile
from typing import IO, Any, Callable, Dict, List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "WeightsError",
    "UnsafeWeightsError",
    "load_checkpoint_file",
    "safe_unpickle",
    "atomic_write",
    "file_sha256",
    "fetch",
    "KDCheckpointer",
]

logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights file cannot be used; the message names the file and how to fix it."""


class UnsafeWeightsError(WeightsError):
    """A weights file asks to run code (or build objects other than arrays) when read."""


def _numpy_globals() -> Dict[tuple, Callable]:
    """The globals a pickled numpy array (or scalar) refers to, under numpy 1.x and 2.x names."""
    import collections

    try:  # numpy 2 moved numpy.core to numpy._core; files name either
        from numpy._core import multiarray, numeric
    except ImportError:
        from numpy.core import multiarray, numeric

    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        # Protocol 2 pickles of bytes (Python 3 writing for Python 2 readers): a pure decoder.
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    # numpy's dtype classes (numpy.dtypes.Float32DType ...) appear in numpy 2 pickles of dtypes.
    for name in dir(getattr(np, "dtypes", ())):
        if name.endswith("DType"):
            allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return allowed


class _ArraysOnlyUnpickler(pickle.Unpickler):
    _allowed: Optional[Dict[tuple, Callable]] = None

    def find_class(self, module: str, name: str) -> Any:
        if _ArraysOnlyUnpickler._allowed is None:
            _ArraysOnlyUnpickler._allowed = _numpy_globals()
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeWeightsError(f"it refers to {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeWeightsError("it uses persistent ids (torch tensors pickled into a .pkl)")


def safe_unpickle(f: IO[bytes]) -> Any:
    """Unpickle numpy arrays, numbers, strings and plain containers, and nothing else.

    Args:
        f: a binary file.

    Raises:
        UnsafeWeightsError: the pickle names any other class or function.
    """
    return _ArraysOnlyUnpickler(f, encoding="latin1").load()


def _refuse(path: str, why: str) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"refusing to read '{path}': {why}. Weight files are read without running code: a .pkl "
        "may hold only numpy arrays and plain dicts/lists (detectron2 model-zoo and Detectron "
        "files do), a .pth only tensors and plain data (torch.load(weights_only=True)). If you "
        "trust the file, convert it in a separate step to a state dict saved with torch.save"
    )


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Read a weights file the way detectron2's ``DetectionCheckpointer._load_file`` does, safely.

    ``.pkl``: detectron2 model-zoo files (``{"model": ..., "__author__": ...}``) are returned as
    they are; Caffe2/Detectron files (``blobs``) and plain ImageNet ``{name: array}`` files are
    wrapped as ``{"model": ..., "__author__": "Caffe2", "matching_heuristics": True}``. Anything
    else (``.pth``, ``.pyth``) is read with ``torch.load(weights_only=True)`` on the CPU and
    wrapped as ``{"model": ...}`` when it is a bare state dict.

    Args:
        path: a local file.

    Raises:
        UnsafeWeightsError: the file would need code to be run to be read.
        WeightsError: the file is not a readable weights file (truncated, not a checkpoint).
    """
    if path.endswith(".pkl"):
        try:
            with open(path, "rb") as f:
                data = safe_unpickle(f)
        except UnsafeWeightsError as e:
            raise _refuse(path, str(e)) from None
        except Exception as e:  # truncated or not a pickle at all
            raise WeightsError(
                f"'{path}' is not a readable .pkl weights file ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(data, dict):
            raise WeightsError(f"'{path}' holds a {type(data).__name__}, not a dict of weights")
        if "model" in data and "__author__" in data:  # detectron2 model-zoo format
            return data
        if "blobs" in data:  # Detectron / Caffe2 detection models
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(path, str(e).splitlines()[0]) from None
    except Exception as e:
        raise WeightsError(
            f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e}); a file cut short "
            "by a killed process or an interrupted copy reads like this"
        ) from None
    if not isinstance(loaded, dict):
        raise WeightsError(f"'{path}' holds a {type(loaded).__name__}, not a dict of weights")
    if path.endswith(".pyth") and "model_state" in loaded:  # pycls ImageNet checkpoints
        state = {
            k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")
        }
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    if "model" not in loaded:
        loaded = {"model": loaded}
    return loaded


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by
    setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _WriteErrorRecorder:
    """A binary file that remembers the OS error of a failed write: ``torch.save`` turns it into
    "[enforce fail at inline_container.cc] . unexpected pos", which names no cause."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` so that it is either the old file or the complete new one, never a part.

    The file gets the permissions ``open()`` would give it (0666 less the umask; the temporary
    file is created 0600). A failed write raises an ``OSError`` that names the file and the OS's
    reason (e.g. "No space left on device").

    Args:
        path: the destination.
        write: writes the content into the binary file it is given.

    Raises:
        OSError: the file cannot be written; the previous file is kept.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    recorder = None
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "wb") as f:
            recorder = _WriteErrorRecorder(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = e if isinstance(e, OSError) else getattr(recorder, "error", None)
        if isinstance(cause, OSError) and isinstance(e, Exception):
            reason = cause.strerror or str(cause)
            code = errno.errorcode.get(cause.errno or 0, "")
            raise OSError(
                cause.errno,
                f"cannot write {path}: {reason}{f' ({code})' if code else ''}; the previous "
                "file, if any, is kept",
            ) from None
        raise
    # The rename itself must reach the disk before anything (the pointer) refers to it.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# Seconds a download may wait for the server's next bytes (env KD_DOWNLOAD_TIMEOUT overrides).
DOWNLOAD_TIMEOUT_S = 60.0


def fetch(path: str, key: str) -> str:
    """The local file of ``path``: itself, or for a URL (``https://``, ``detectron2://``) the copy
    detectron2's ``PathManager`` downloads and caches, given up on when the server sends nothing
    for ``KD_DOWNLOAD_TIMEOUT`` seconds (default 60; a URL that never answers would otherwise
    hang the run for ever).

    Args:
        path: a local path or a URL.
        key: the config key that named it, for messages.

    Raises:
        WeightsError: the server did not answer in time.
    """
    if "://" not in path:
        return path
    import socket

    from detectron2.utils.file_io import PathManager

    try:
        timeout = float(os.environ.get("KD_DOWNLOAD_TIMEOUT", DOWNLOAD_TIMEOUT_S))
    except ValueError:
        timeout = DOWNLOAD_TIMEOUT_S
    previous = socket.getdefaulttimeout()
    # urllib (which iopath's download uses) takes the default timeout of new sockets.
    socket.setdefaulttimeout(timeout)
    try:
        return PathManager.get_local_path(path)
    except (socket.timeout, TimeoutError) as e:
        raise WeightsError(
            f"{key} '{path}': the server sent nothing for {timeout:g} s ({e or 'timed out'}); "
            "download the file yourself and give its local path, or set KD_DOWNLOAD_TIMEOUT "
            "to wait longer"
        ) from None
    except OSError as e:
        if isinstance(getattr(e, "reason", None), (socket.timeout, TimeoutError)):
            raise WeightsError(
                f"{key} '{path}': no answer from the server within {timeout:g} s; download the "
                "file yourself and give its local path, or set KD_DOWNLOAD_TIMEOUT to wait longer"
            ) from None
        raise
    finally:
        socket.setdefaulttimeout(previous)


_SHA256_MEMO: Dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """The sha256 of a file's content (hex), computed once per process for an unchanged file.

    The memo is keyed by device, inode, size, mtime and ctime: ``cp -p``, ``rsync -a`` and tar
    keep a file's size and mtime, but every write or restore changes its ctime.

    Args:
        path: a local file.
    """
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256_MEMO[key] = digest.hexdigest()
    return _SHA256_MEMO[key]


# Names detectron2's PeriodicCheckpointer gives checkpoints (model_0000999.pth, model_final.pth).
_CHECKPOINT_NAME = re.compile(r"^model_(\d+|final)\.pth$")


class KDCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads safely, writes atomically and resumes from what loads.

    * every file is read by :func:`load_checkpoint_file` (no code runs);
    * :meth:`save` and :meth:`tag_last_checkpoint` write through :func:`atomic_write`;
    * on resume, when the file ``last_checkpoint`` names is missing or does not load, the newest
      checkpoint in ``save_dir`` that loads is used instead, with a warning.
    """

    def _load_file(self, filename: str) -> Dict[str, Any]:
        return load_checkpoint_file(filename)

    def _local_save_dir(self) -> bool:
        return bool(self.save_dir) and "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._local_save_dir():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local_save_dir():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )

    def has_checkpoint(self) -> bool:
        return super().has_checkpoint() or bool(self._candidates())

    def _candidates(self) -> List[str]:
        """Checkpoints in ``save_dir``, newest first."""
        if not self._local_save_dir() or not os.path.isdir(self.save_dir):
            return []
        paths = [
            os.path.join(self.save_dir, n)
            for n in os.listdir(self.save_dir)
            if _CHECKPOINT_NAME.match(n)
        ]
        return sorted(paths, key=lambda p: (os.path.getmtime(p), p), reverse=True)

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        named = self.get_checkpoint_file() if super().has_checkpoint() else ""
        tried = []
        for candidate in [named] + [p for p in self._candidates() if p != named]:
            if not candidate:
                continue
            try:
                checkpoint = self._load_file(candidate)
            except (FileNotFoundError, WeightsError) as e:
                tried.append(candidate)
                self.logger.warning("Cannot resume from %s: %s", candidate, e)
                continue
            if tried:
                self.logger.warning(
                    "Resuming from %s instead of %s, the newest checkpoint that loads",
                    candidate,
                    tried[0],
                )
            return self._load_checkpoint(candidate, checkpoint)
        raise WeightsError(
            f"--resume: no checkpoint in {self.save_dir} can be read (tried "
            f"{', '.join(tried) or 'none found'}). Start without --resume, or set OUTPUT_DIR to "
            "the run you want to continue"
        )

    def _load_checkpoint(self, path: str, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        # fvcore's load() without reading the file a second time.
        self.logger.info("Loading checkpoint from %s", path)
        incompatible = self._load_model(checkpoint)
        if incompatible is not None:
            # Resuming into another model would train with some weights reset to random (or
            # stop later at the optimizer's state): say so now.
            wrong = [
                f"{k}: file {tuple(a)} vs model {tuple(b)}"
                for k, a, b in incompatible.incorrect_shapes
            ]
            missing = list(incompatible.missing_keys)
            if wrong or missing:
                raise WeightsError(
                    f"--resume: {path} does not fit the model built from the config "
                    f"({len(wrong)} weights of another shape, {len(missing)} missing; e.g. "
                    f"{'; '.join((wrong + missing)[:2])}): resume with the config the run was "
                    f"trained with ({os.path.join(self.save_dir, 'config.yaml')}), or train "
                    "the changed model in another OUTPUT_DIR"
                )
            self._log_incompatible_keys(incompatible)
        for key in self.checkpointables:
            if key in checkpoint:
                self.logger.info("Loading %s from %s", key, path)
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
        return checkpoint
