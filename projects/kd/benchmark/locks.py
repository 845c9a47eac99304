"""One benchmark process per run: ``OUTPUT/<run>/.benchmark.lock`` holds the training process's
id and start time; another process skips the run, and a lock whose process is gone (or whose pid
now names another process) is taken over. The process checks are those of train_net.py's own
``OUTPUT_DIR`` lock (:mod:`kd.run_dir`)."""

import contextlib
import os
from typing import Iterator, Optional

from kd.run_dir import process_alive as _alive
from kd.run_dir import process_start_time as _start_time

LOCK_FILE = ".benchmark.lock"


class RunLocked(Exception):
    """Another live process is training the run (``args[0]``: its process id)."""


def _lock_holder(path: str) -> Optional[int]:
    """The live process holding the lock file ``path``, or None (gone, reused pid, unreadable)."""
    try:
        with open(path) as f:
            pid, _, start = f.read().strip().partition(" ")
        pid = int(pid or 0)
    except (OSError, ValueError):
        return None
    if not pid or pid == os.getpid() or not _alive(pid):
        return None
    if start and _start_time(pid) not in ("", start):
        return None
    return pid


@contextlib.contextmanager
def run_lock(out: str) -> Iterator[None]:
    """Hold ``out``'s lock while training it: created atomically with this process's id and
    start time, removed afterwards. A lock whose process no longer exists is taken over.

    Raises:
        RunLocked: a live process holds it.
    """
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_FILE)
    holder = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None:
                raise RunLocked(holder) from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale (or half-written): its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid())}".strip())
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return
    # Lost the race for the lock twice: another process has just taken it.
    raise RunLocked(_lock_holder(path) or 0)
