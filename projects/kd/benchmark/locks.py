"""One benchmark process per run: ``OUTPUT/<run>/.benchmark.lock`` holds the training process's
id, start time and host; another process skips the run, and a lock whose process is gone (or
whose pid now names another process) is taken over. It is train_net.py's own ``OUTPUT_DIR``
lock (:func:`kd.run_dir.run_lock`) under another file name."""

from contextlib import AbstractContextManager

from kd.run_dir import RunLocked
from kd.run_dir import process_start_time as _start_time
from kd.run_dir import run_lock as _run_lock

__all__ = ["LOCK_FILE", "RunLocked", "run_lock", "_start_time"]

LOCK_FILE = ".benchmark.lock"


def run_lock(out: str) -> AbstractContextManager:
    """Hold ``out``'s benchmark lock while training it (created if missing, removed after).

    Raises:
        RunLocked: a live process holds it (``holder``: "pid P").
    """
    return _run_lock(out, LOCK_FILE, what="benchmark process")
