"""How a ``train_net.py`` run starts, logs and ends, in each of its processes.

* **Processes.** A run is started either by ``train_net.py`` itself (detectron2's ``--num-gpus``,
  ``--num-machines``, ``--machine-rank``, ``--dist-url``: it spawns one process per GPU, or per
  CPU slot without CUDA) or by a cluster launcher that starts every process and describes it in
  the environment: ``torchrun`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``), a Kubernetes-style job (``MASTER_ADDR``, ``MASTER_PORT``,
  ``WORLD_SIZE``, ``RANK``) or SLURM's ``srun`` (``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS``, the tasks per node and the node list, plus ``MASTER_PORT``).
  :func:`kd.distributed_env.detect_environment` reads that description (one place) and
  :func:`launch` joins the process group from it instead of spawning.
* **Logs.** :func:`setup_logging` gives the ``kd`` loggers what detectron2's ``default_setup``
  gives detectron2's: the console on rank 0, ``log.txt`` (``log.txt.rank<R>`` on other ranks).
* **Errors.** Every process runs inside one error boundary: whatever stops it is printed as one
  line on stderr (prefixed with the rank in a multi-process run); a traceback, where there is one
  worth keeping, goes to the log file the line names, never to the console. The exit status is
  non-zero: 2 for a config or launch mistake, 130 for Ctrl-C, 1 otherwise.
"""

import contextlib
import logging
import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from kd import compat
from kd.config import ConfigError
from kd.device import gpu_identity, shared_gpus
from kd.distributed_env import (
    DistributedEnvironment,
    LaunchError,
    check_arguments,
    detect_environment,
    first_host,
    parse_first_host,
)
from kd.engine import TrainingDivergedError
from kd.preemption import Preempted, forward_signals_to_children

__all__ = [
    "LaunchError",
    "DistributedEnvironment",
    "detect_environment",
    "first_host",
    "parse_first_host",
    "launch",
    "report_failure",
    "run_guarded",
    "setup_logging",
]

logger = logging.getLogger(__name__)

# Set on a log record that belongs in the log files only (the console got its line already).
_FILE_ONLY = "kd_file_only"


# ----------------------------------------------------------------------------- logging


class _ConsoleFilter(logging.Filter):
    """Keeps tracebacks of fatal errors, and records meant for the log files only, off the
    console: the error boundary prints one line there instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _FILE_ONLY, False):
            return False
        return not (record.exc_info and record.levelno >= logging.ERROR)


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def setup_logging(output_dir: Optional[str]) -> None:
    """Log the ``kd`` package as ``default_setup`` logs detectron2 and fvcore (call after it).

    Rank 0 prints to the console; every rank writes its own file (``log.txt``,
    ``log.txt.rank<R>``), detectron2's. The console handlers of the three loggers then leave
    tracebacks of fatal errors to the files: the error boundary prints their one line.

    Args:
        output_dir: the run's ``OUTPUT_DIR`` (empty or None: console only).
    """

    setup_logger(output_dir or None, distributed_rank=comm.get_rank(), name="kd", abbrev_name="kd")
    for name in ("detectron2", "fvcore", "kd"):
        for handler in logging.getLogger(name).handlers:
            if _is_console(handler) and not any(
                isinstance(f, _ConsoleFilter) for f in handler.filters
            ):
                handler.addFilter(_ConsoleFilter())


def _log_file() -> Optional[str]:
    """The file the ``kd`` logger writes (None before :func:`setup_logging`)."""
    for handler in logging.getLogger("kd").handlers:
        name = getattr(getattr(handler, "stream", None), "name", None)
        if isinstance(name, str) and not _is_console(handler):
            return name
    return None


# ----------------------------------------------------------------------------- errors


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _is_user_error(e: BaseException) -> bool:
    """Errors whose message is written for the user (bad config, data, weights, launch)."""
    if isinstance(e, (ValueError, FileNotFoundError)):
        return True
    return isinstance(e, KeyError) and "is not registered" in str(e)


def _is_lost_peer(e: BaseException) -> bool:

    text = str(e)
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError)
        and any(s in text for s in ("Connection closed by peer", "Connection reset", "[gloo/"))
    )


def _current_rank(default: Optional[int]) -> Optional[int]:
    try:

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank()
    except Exception:  # noqa: BLE001 (a broken process group must not hide the real error)
        pass
    return default


def report_failure(e: BaseException, rank: Optional[int] = None) -> int:
    """Print what stopped this process as one line on stderr; returns the exit status.

    The line says what happened and, for errors of the training loop and errors that are not a
    plain bad input, where the full traceback is: in this rank's log file (written there once, by
    the training loop's logger or here), or on stderr when there is no log file yet (a failure
    before logging is set up that is not a bad input is a bug to report).

    Args:
        e: the exception.
        rank: the process's rank where the process group is not (yet) up.
    """

    # A diverged run's FloatingPointError was logged by the training loop; Ctrl-C and exits
    # have no traceback worth keeping.
    logged = (TrainingDivergedError, KeyboardInterrupt, SystemExit)
    if isinstance(e, KeyboardInterrupt):
        text, code, wants_traceback = "interrupted", 130, False
    elif isinstance(e, SystemExit):
        text, code, wants_traceback = _one_line(e.code), 1, False
    elif isinstance(e, TrainingDivergedError):
        text, code, wants_traceback = str(e), 1, False
    elif _is_user_error(e):
        text = _one_line(e.args[0] if isinstance(e, KeyError) and e.args else e)
        code = 2 if isinstance(e, (ConfigError, LaunchError)) else 1
        wants_traceback = False
    elif _is_lost_peer(e):
        text = (
            "lost contact with another process of this run, which most likely stopped with an "
            f"error of its own (see its line) ({type(e).__name__}: {_one_line(e)[:200]})"
        )
        code, wants_traceback = 1, True
    else:
        text, code, wants_traceback = f"{type(e).__name__}: {_one_line(e)}", 1, True
    iteration = getattr(e, "kd_iteration", None)
    if iteration is not None and not isinstance(e, TrainingDivergedError):
        text = f"training stopped at iteration {iteration}: {text}"
        wants_traceback = True  # whatever it is, the developer wants to see where it came from
    log_file = _log_file()
    if log_file:
        # Every traceback goes to the file once: the training loop's logger has written those of
        # its exceptions already.
        logging.getLogger("kd").error(
            "%s",
            text,
            exc_info=e if iteration is None and not isinstance(e, logged) else None,
            extra={_FILE_ONLY: True},
        )
        for handler in logging.getLogger("kd").handlers:
            handler.flush()
        if wants_traceback:
            text += f"; full traceback in {log_file}"
    elif wants_traceback:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    rank = _current_rank(rank)
    prefix = f"[rank {rank}] " if rank is not None else ""
    print(f"{prefix}error: {text}", file=sys.stderr, flush=True)
    return code


def run_guarded(main_func: Callable[..., Any], main_args: Sequence[Any] = ()) -> None:
    """The error boundary of one process: ``main_func(*main_args)``, and on failure its one
    line (:func:`report_failure`) and a non-zero ``SystemExit`` (the exit status of a spawned
    process). The ``tools/`` scripts run their ``main`` through it too.

    Args:
        main_func: the process's work.
        main_args: its positional arguments.
    """

    try:
        main_func(*main_args)
    except SystemExit as e:
        if e.code in (None, 0) or isinstance(e.code, int):
            raise
        raise SystemExit(report_failure(e)) from None
    except Preempted as e:  # saved a checkpoint and printed its line (kd.preemption)
        raise SystemExit(e.code) from None
    except BaseException as e:  # noqa: BLE001 (the boundary: everything ends as one line)
        raise SystemExit(report_failure(e)) from None


# ----------------------------------------------------------------------------- launch


def uses_cuda(cfg: Any) -> bool:
    """Whether a run of ``cfg`` puts its models on GPUs: CUDA is there and ``MODEL.DEVICE`` is a
    CUDA device (a config without one: whether CUDA is there). The process group's backend
    follows: NCCL for GPU models, gloo for CPU models, also on a machine with GPUs."""

    device = getattr(getattr(cfg, "MODEL", None), "DEVICE", None)
    return torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))


def _refuse_shared_gpus(env: DistributedEnvironment) -> None:
    """Stop (LaunchError, in every rank) when two ranks of the run use the same GPU: NCCL would
    fail later with a cryptic error. Compares the GPUs' UUIDs over a gloo group, which needs no
    NCCL communicator."""

    group = dist.new_group(backend="gloo")
    identities: list = [None] * env.world_size
    dist.all_gather_object(identities, gpu_identity(), group=group)
    dist.destroy_process_group(group)
    shared = shared_gpus(identities)
    if shared:
        gpu, ranks = next(iter(shared.items()))
        raise LaunchError(
            f"{env.launcher}: ranks {', '.join(map(str, ranks))} share one GPU ({gpu}), and NCCL "
            "takes one GPU per process: start at most as many processes per machine as it has "
            "GPUs (torchrun --nproc-per-node, srun --gpus-per-task=1), or set MODEL.DEVICE cpu "
            "to run them on the CPU (gloo)"
        )


def _run_in_environment(
    env: DistributedEnvironment,
    main_func: Callable[..., Any],
    main_args: Sequence[Any],
    cuda: bool,
) -> None:
    """Join the process group the launcher describes (NCCL with ``cuda``, else gloo), then run
    the boundary."""

    if env.world_size == 1:
        run_guarded(main_func, main_args)
        return
    try:
        if cuda:
            count = torch.cuda.device_count()
            if env.local_rank < count:
                torch.cuda.set_device(env.local_rank)
            elif count == 1:  # the launcher gave each process its own GPU
                torch.cuda.set_device(0)
            else:
                raise LaunchError(
                    f"{env.launcher}: local rank {env.local_rank} but {count} GPUs visible: "
                    "start at most one process per GPU"
                )
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=env.init_method,
            rank=env.rank,
            world_size=env.world_size,
        )
        if cuda:
            _refuse_shared_gpus(env)
    except BaseException as e:  # noqa: BLE001
        if not isinstance(e, LaunchError):
            e = LaunchError(
                f"{env.launcher}: rank {env.rank} of {env.world_size} cannot join the others at "
                f"{env.master_addr}:{env.master_port} ({type(e).__name__}: {_one_line(e)[:300]}); "
                "check that MASTER_ADDR is rank 0's machine and MASTER_PORT a free port there"
            )
        raise SystemExit(report_failure(e, rank=env.rank)) from None
    try:
        compat.create_local_process_group(env.local_world_size)
        comm.synchronize()
        run_guarded(main_func, main_args)
    finally:
        dist.destroy_process_group()


def _refuse_more_processes_than_gpus(args: Any, cuda: bool) -> None:
    """``--num-gpus N`` of GPU processes on a machine with fewer GPUs stops with one line, not
    detectron2's assertion or NCCL's error."""

    count = torch.cuda.device_count() if cuda else 0
    if cuda and args.num_gpus > count:
        error = LaunchError(
            f"--num-gpus {args.num_gpus} but this machine shows {count} GPU"
            f"{'s' if count != 1 else ''}, and NCCL takes one GPU per process: use --num-gpus "
            f"{count} or fewer, or MODEL.DEVICE cpu to run {args.num_gpus} processes on the CPU "
            "(gloo)"
        )
        raise SystemExit(report_failure(error))


def _run_spawned(
    args: Any, main_func: Callable[..., Any], main_args: Sequence[Any], cuda: bool
) -> None:
    """detectron2's ``--num-gpus/--num-machines`` launch (GPU processes with ``cuda``, else CPU
    processes); each child reports its own failure."""

    try:
        # A scheduler's SIGTERM/SIGUSR1 reaches this process: the workers save and stop.
        with forward_signals_to_children() if args.num_gpus > 1 else contextlib.nullcontext():
            compat.launch(
                run_guarded,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(main_func, tuple(main_args)),
                cuda=cuda,
            )
    except mp.ProcessExitedException as e:
        rank = args.machine_rank * args.num_gpus + e.error_index
        if e.exit_code is not None and e.exit_code > 0:  # it printed its line
            raise SystemExit(e.exit_code) from None
        raise SystemExit(
            report_failure(RuntimeError(f"process was killed by {e.signal_name}"), rank=rank)
        ) from None
    except mp.ProcessRaisedException as e:  # a failure before the child's boundary (its start)
        rank = args.machine_rank * args.num_gpus + e.error_index
        last = [line for line in e.msg.splitlines() if line.strip()][-1:] or ["unknown error"]
        print(f"[rank {rank}] error: process could not start: {last[0].strip()}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:  # noqa: BLE001 (joining the others failed in this very process)
        error = LaunchError(_one_line(e))
        raise SystemExit(report_failure(error, rank=args.machine_rank * args.num_gpus)) from None


def launch(
    main_func: Callable[..., Any],
    args: Any,
    main_args: Optional[Sequence[Any]] = None,
    check: Optional[Callable[[Any], Any]] = None,
) -> int:
    """Run ``main_func(*main_args)`` in every process of the run; returns the exit status.

    Under a cluster launcher (:func:`detect_environment`) this process is one of the run's and
    joins the others: gloo on CPU, NCCL on CUDA with the GPU of its local rank, and detectron2's
    per-machine group so that ``comm.get_local_rank()/get_local_size()`` are right. Otherwise it
    starts them as detectron2 does (``args.num_gpus`` per machine, ``args.num_machines``,
    ``args.machine_rank``, ``args.dist_url``). Each process runs inside the error boundary
    (module docstring).

    Args:
        main_func: the run's work, called in every process.
        args: ``default_argument_parser`` arguments.
        main_args: arguments of ``main_func`` (default: ``(args,)``).
        check: called with ``args`` before any process is started (e.g. building the config),
            so that a bad input stops the run once, not once per process.
    """
    main_args = (args,) if main_args is None else tuple(main_args)
    env = None
    try:
        try:
            env = detect_environment(os.environ)
            if env is not None:
                check_arguments(args, env)
            cfg = check(args) if check is not None else None
        except BaseException as e:  # noqa: BLE001
            rank = env.rank if env is not None and env.world_size > 1 else None
            raise SystemExit(report_failure(e, rank=rank)) from None
        cuda = uses_cuda(cfg)
        if env is not None:
            _run_in_environment(env, main_func, main_args, cuda)
        else:
            _refuse_more_processes_than_gpus(args, cuda)
            _run_spawned(args, main_func, main_args, cuda)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        return 130
    return 0
