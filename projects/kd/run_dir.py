"""A run's ``OUTPUT_DIR``: one live run at a time, writable, no stale temporaries.

* :func:`run_lock` holds a lock file in the folder for as long as a run uses it: a second run
  started on the same folder stops with one line naming the process that holds it, instead of
  both writing ``model_final.pth``, ``config.yaml`` and ``metrics.json``. The lock names its
  process by host, pid and start time, so a lock left by a killed process (or a pid reused after
  a reboot) is taken over. ``tools/benchmark_table.py`` locks its runs with the same code.
* :func:`check_writable` says in one line that the folder cannot be written, before anything is
  built.
* :func:`remove_stale_temporaries` deletes the hidden ``.model_*.pth.*.tmp`` files a process killed
  while saving leaves (:func:`kd.weights.atomic_write`); it runs under the lock, so they are not
  another live run's.
* :func:`model_changes` names the ``MODEL`` keys a resumed run's config changes against the
  ``config.yaml`` the run wrote, so that a ``--resume`` with another model says so.
"""

import contextlib
import logging
import os
import re
import socket
import tempfile
from typing import Iterator, List, Optional, Tuple

from detectron2.utils import comm

__all__ = [
    "RUN_LOCK_FILE",
    "RunLocked",
    "OutputDirError",
    "run_lock",
    "lock_holder",
    "process_alive",
    "process_start_time",
    "check_writable",
    "remove_stale_temporaries",
    "model_changes",
    "claim_output_dir",
]

logger = logging.getLogger(__name__)

RUN_LOCK_FILE = ".kd_run.lock"

# What kd.weights.atomic_write leaves behind when its process is killed mid-write.
_STALE_TEMPORARY = re.compile(r"^\.(model_\w+\.pth|last_checkpoint|teacher_eval\.json)\..+\.tmp$")


class OutputDirError(ValueError):
    """``OUTPUT_DIR`` cannot be used; the message says why and what to do."""


class RunLocked(OutputDirError):
    """A live process holds the lock (``holder``: its description)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def process_start_time(pid: int) -> str:
    """When the process started (clock ticks since boot, Linux's /proc), '' where unknown. With
    the pid it names one process: a lock whose pid now belongs to another process (reused, or
    after a reboot) is stale."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # after "pid (command)": state is field 3, starttime field 22
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _read_lock(path: str) -> Tuple[int, str, str]:
    """(pid, start time, host) written in a lock file; host '' for locks without one."""
    with open(path) as f:
        fields = f.read().split()
    pid = int(fields[0]) if fields else 0
    start = fields[1] if len(fields) > 1 else ""
    host = fields[2] if len(fields) > 2 else ""
    return pid, start, host


def lock_holder(path: str) -> Optional[str]:
    """The live process holding the lock file ``path`` ("pid P", "pid P on host H"), or None
    (no file, its process gone, its pid reused, unreadable).

    A lock written on another host cannot be checked from here and counts as held.
    """
    try:
        pid, start, host = _read_lock(path)
    except (OSError, ValueError):
        return None
    if host and host != socket.gethostname():
        return f"pid {pid} on host {host}"
    if not pid or pid == os.getpid() or not process_alive(pid):
        return None
    if start and process_start_time(pid) not in ("", start):
        return None
    return f"pid {pid}"


@contextlib.contextmanager
def run_lock(folder: str, name: str = RUN_LOCK_FILE, what: str = "run") -> Iterator[None]:
    """Hold ``folder``'s lock: created atomically with this process's id, start time and host,
    removed afterwards. A lock whose process no longer exists is taken over.

    Args:
        folder: the folder (created if missing).
        name: the lock file's name in it.
        what: what uses the folder, for the message.

    Raises:
        RunLocked: a live process holds the lock.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock_holder(path)
            if holder is not None:
                raise _locked(folder, path, holder, what) from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale (or half-written): its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            pid = os.getpid()
            f.write(f"{pid} {process_start_time(pid) or '-'} {socket.gethostname()}")
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return
    # Lost the race for the lock twice: another process has just taken it.
    raise _locked(folder, path, lock_holder(path) or "another process", what)


def _locked(folder: str, path: str, holder: str, what: str) -> RunLocked:
    return RunLocked(
        f"another {what} ({holder}) is using {os.path.abspath(folder)}: wait for it to end, or "
        f"choose another OUTPUT_DIR (if that process is gone for good, delete {path})",
        holder,
    )


def check_writable(folder: str, key: str = "OUTPUT_DIR") -> None:
    """Create ``folder`` if needed and write (then delete) a file in it.

    Raises:
        OutputDirError: it cannot be created or written; the line names the OS error.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kd_write_test.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputDirError(
            f"{key} '{folder}' cannot be written ({e.strerror or e}): choose a folder you can "
            "write to, e.g. OUTPUT_DIR ./output/<run>"
        ) from None


def remove_stale_temporaries(folder: str) -> List[str]:
    """Delete the temporaries a process killed while saving left in ``folder``; returns their
    names. Call only while holding ``folder``'s :func:`run_lock`."""
    try:
        names = [n for n in os.listdir(folder) if _STALE_TEMPORARY.match(n)]
    except OSError:
        return []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    if names:
        logger.info(
            "Removed %d temporary file(s) left by a process killed while saving: %s",
            len(names),
            ", ".join(names),
        )
    return names


# Keys under MODEL a resumed run may change without changing what its checkpoint holds.
_RESUMABLE_MODEL_CHANGES = ("MODEL.WEIGHTS", "MODEL.DEVICE")


def model_changes(cfg, saved_config_file: str, limit: int = 5) -> List[str]:
    """The ``MODEL.*`` keys whose value in ``cfg`` differs from ``saved_config_file`` (the
    ``config.yaml`` a run wrote), as "KEY saved -> now"; empty when the file is missing or
    unreadable. ``MODEL.WEIGHTS`` and ``MODEL.DEVICE`` are left out (a resume ignores the first
    and may move the run).

    Args:
        cfg: the resumed run's config.
        saved_config_file: ``OUTPUT_DIR/config.yaml``.
        limit: at most this many keys.
    """
    import yaml

    try:
        with open(saved_config_file) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(saved, dict) or not isinstance(saved.get("MODEL"), dict):
        return []
    changes: List[str] = []

    def walk(old, new, prefix: str) -> None:
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}"
            if name in _RESUMABLE_MODEL_CHANGES:
                continue
            a, b = old.get(key), new.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                walk(a, b, name)
            elif _plain(a) != _plain(b):
                changes.append(f"{name} {_plain(a)} -> {_plain(b)}")

    walk(saved["MODEL"], _as_dict(cfg.MODEL), "MODEL")
    return changes[:limit]


def _as_dict(node) -> dict:
    return {k: _as_dict(v) if isinstance(v, dict) else v for k, v in node.items()}


def _plain(value):
    # config.yaml writes tuples as lists
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def claim_output_dir(cfg, resume: bool) -> Iterator[List[str]]:
    """Hold the run's ``OUTPUT_DIR`` for the duration of the block, on every rank.

    The main process checks that the folder can be written, takes its :func:`run_lock`, removes
    stale temporaries and, on ``--resume``, compares ``MODEL`` with the ``config.yaml`` the run
    wrote (before ``default_setup`` overwrites it); the other ranks take its answer, so that all
    stop together. Call before ``default_setup``.

    Args:
        cfg: the run's config.
        resume: whether the run was started with ``--resume``.

    Yields:
        The :func:`model_changes` to report once logging is set up (main process; else empty).

    Raises:
        OutputDirError: the folder cannot be written, or another live run holds it.
    """
    folder = cfg.OUTPUT_DIR
    with contextlib.ExitStack() as stack:
        error, changes = None, []
        if comm.is_main_process() and folder:
            try:
                check_writable(folder)
                stack.enter_context(run_lock(folder))
                remove_stale_temporaries(folder)
                if resume:
                    changes = model_changes(cfg, os.path.join(folder, "config.yaml"))
            except OutputDirError as e:
                error = str(e)
        if comm.get_world_size() > 1:
            error = comm.all_gather(error)[0]
        if error is not None:
            raise OutputDirError(error)
        yield changes
