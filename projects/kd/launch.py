"""How a ``train_net.py`` run starts, logs and ends, in each of its processes.

* **Processes.** A run is started either by ``train_net.py`` itself (detectron2's ``--num-gpus``,
  ``--num-machines``, ``--machine-rank``, ``--dist-url``: it spawns one process per GPU, or per
  CPU slot without CUDA) or by a cluster launcher that starts every process and describes it in
  the environment: ``torchrun`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``), a Kubernetes-style job (``MASTER_ADDR``, ``MASTER_PORT``,
  ``WORLD_SIZE``, ``RANK``) or SLURM's ``srun`` (``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS``, the tasks per node and the node list, plus ``MASTER_PORT``).
  :func:`detect_environment` reads that description (one place) and :func:`launch` joins the
  process group from it instead of spawning.
* **Logs.** :func:`setup_logging` gives the ``kd`` loggers what detectron2's ``default_setup``
  gives detectron2's: the console on rank 0, ``log.txt`` (``log.txt.rank<R>`` on other ranks).
* **Errors.** Every process runs inside one error boundary: whatever stops it is printed as one
  line on stderr (prefixed with the rank in a multi-process run); a traceback, where there is one
  worth keeping, goes to the log file the line names, never to the console. The exit status is
  non-zero: 2 for a config or launch mistake, 130 for Ctrl-C, 1 otherwise.
"""

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import traceback
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from kd import compat
from kd.config import ConfigError
from kd.device import gpu_identity, shared_gpus
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


class LaunchError(ValueError):
    """The processes of a run are described inconsistently; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DistributedEnvironment:
    """One process of a run started by a cluster launcher.

    Attributes:
        launcher: who started it, for messages ("torchrun", "the RANK/WORLD_SIZE environment",
            "SLURM (srun)").
        rank, world_size: the process's global rank and the number of processes.
        local_rank, local_world_size: its rank on its machine and the processes per machine.
        master_addr, master_port: where rank 0 listens for the others.
        init_method: the ``torch.distributed`` rendezvous URL ("env://" under torchrun, which may
            serve the rendezvous store itself; "tcp://host:port" otherwise).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    init_method: str

    @property
    def machine_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_machines(self) -> int:
        return self.world_size // self.local_world_size


def parse_first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, without ``scontrol``.

    ``"node[01-03,07]"`` -> ``"node01"``, ``"gpu-a[2,4],gpu-b1"`` -> ``"gpu-a2"``,
    ``"rack[1-2]-n[08-09]"`` -> ``"rack1-n08"`` (zero padding kept, as SLURM writes it).

    Args:
        nodelist: ``SLURM_NODELIST`` / ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``.
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)
    if not host or "[" in host or "]" in host:
        raise LaunchError(f"cannot read the SLURM node list '{nodelist}': set MASTER_ADDR")
    return host


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``scontrol show hostnames`` where it is installed
    (it knows every syntax SLURM writes), :func:`parse_first_host` otherwise."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return parse_first_host(nodelist)


def _int(environ: Mapping[str, str], key: str, launcher: str) -> int:
    value = environ.get(key, "")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{launcher}: {key}='{value}' is not an integer") from None


def _tasks_per_node(value: str, key: str) -> int:
    """SLURM's tasks-per-node: "4", "4(x2)", "4(x2),4"; different counts per node are refused."""
    counts = set()
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x\d+\))?\s*", part)
        if not m:
            raise LaunchError(f"SLURM (srun): cannot read {key}='{value}'")
        counts.add(int(m.group(1)))
    if len(counts) != 1:
        raise LaunchError(
            f"SLURM (srun): {key}='{value}' puts different numbers of tasks on the nodes; "
            "every node must run as many processes (e.g. srun --ntasks-per-node=N)"
        )
    return counts.pop()


def _present(environ: Mapping[str, str], key: str) -> bool:
    return environ.get(key, "") != ""


def _from_torch_variables(environ: Mapping[str, str]) -> DistributedEnvironment:
    torchrun = _present(environ, "TORCHELASTIC_RUN_ID")
    launcher = "torchrun" if torchrun else "the RANK/WORLD_SIZE environment"
    missing = [k for k in ("RANK", "WORLD_SIZE") if not _present(environ, k)]
    if missing:
        given = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if _present(environ, k)]
        raise LaunchError(
            f"{', '.join(given)} set but {' and '.join(missing)} missing: a launcher that starts "
            "the processes sets RANK and WORLD_SIZE (and MASTER_ADDR, MASTER_PORT); set them "
            "all, or unset them to let train_net.py start its processes (--num-gpus)"
        )
    rank, world = _int(environ, "RANK", launcher), _int(environ, "WORLD_SIZE", launcher)
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{launcher}: RANK={rank} is not in [0, WORLD_SIZE={world})")
    local = [k for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE") if _present(environ, k)]
    if len(local) == 1:
        other = ({"LOCAL_RANK", "LOCAL_WORLD_SIZE"} - set(local)).pop()
        raise LaunchError(f"{launcher}: {local[0]} is set but {other} is not: set both or neither")
    if local:
        local_rank = _int(environ, "LOCAL_RANK", launcher)
        local_world = _int(environ, "LOCAL_WORLD_SIZE", launcher)
    else:  # one process per machine (or pod)
        local_rank, local_world = 0, 1
    addr, port = environ.get("MASTER_ADDR", ""), environ.get("MASTER_PORT", "")
    if world > 1 and not (addr and port):
        raise LaunchError(
            f"{launcher}: WORLD_SIZE={world} but "
            f"{' and '.join(k for k in ('MASTER_ADDR', 'MASTER_PORT') if not environ.get(k))} "
            "not set: set them to the address and a free port of the rank-0 machine"
        )
    return _checked(
        DistributedEnvironment(
            launcher=launcher,
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            master_addr=addr or "127.0.0.1",
            master_port=_int(environ, "MASTER_PORT", launcher) if port else 0,
            # torchrun's agent already serves the rendezvous store on MASTER_PORT: env:// joins
            # it (TORCHELASTIC_USE_AGENT_STORE), a tcp:// store of rank 0 would collide with it.
            init_method="env://",
        )
    )


def _from_slurm(
    environ: Mapping[str, str], resolve_host: Callable[[str], str]
) -> Optional[DistributedEnvironment]:
    launcher = "SLURM (srun)"
    ntasks_key = next(
        (
            k
            for k in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
            if _present(environ, k)
        ),
        None,
    )
    if ntasks_key is None:
        return None
    world = _int(environ, ntasks_key, launcher)
    if world <= 1:
        return None  # one task: train_net.py starts its own processes (--num-gpus)
    if not (_present(environ, "SLURM_STEP_ID") or _present(environ, "SLURM_STEPID")):
        raise LaunchError(
            f"train_net.py runs in a SLURM job of {world} tasks but not in an srun step (this is "
            "the batch script itself): start it with `srun python train_net.py ...` to run one "
            "process per task, or ask for --ntasks=1 and use --num-gpus"
        )
    for key in ("SLURM_PROCID", "SLURM_LOCALID"):
        if not _present(environ, key):
            raise LaunchError(f"{launcher}: {key} is not set in a step of {world} tasks")
    rank, local_rank = _int(environ, "SLURM_PROCID", launcher), _int(
        environ, "SLURM_LOCALID", launcher
    )
    per_node_key = next(
        (
            k
            for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
            if _present(environ, k)
        ),
        None,
    )
    if per_node_key is None:
        raise LaunchError(f"{launcher}: none of SLURM_(STEP_)TASKS_PER_NODE is set")
    local_world = _tasks_per_node(environ[per_node_key], per_node_key)
    addr = environ.get("MASTER_ADDR", "")
    if not addr:
        nodelist_key = next(
            (
                k
                for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                if _present(environ, k)
            ),
            None,
        )
        if nodelist_key is None:
            raise LaunchError(
                f"{launcher}: set MASTER_ADDR (no SLURM node list in the environment)"
            )
        addr = resolve_host(environ[nodelist_key])
    if not _present(environ, "MASTER_PORT"):
        raise LaunchError(
            f"{launcher}: set MASTER_PORT to a free port on {addr}, the same for every task, e.g. "
            "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)) in the batch script"
        )
    port = _int(environ, "MASTER_PORT", launcher)
    host = f"[{addr}]" if ":" in addr else addr
    return _checked(
        DistributedEnvironment(
            launcher=launcher,
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            master_addr=addr,
            master_port=port,
            init_method=f"tcp://{host}:{port}",
        )
    )


def _checked(env: DistributedEnvironment) -> DistributedEnvironment:
    """Refuse layouts detectron2's per-machine process groups cannot describe."""
    n, local = env.world_size, env.local_world_size
    if local < 1 or n % local:
        raise LaunchError(
            f"{env.launcher}: {n} processes cannot be split into machines of {local}: every "
            "machine must run the same number of processes"
        )
    if not 0 <= env.local_rank < local:
        raise LaunchError(
            f"{env.launcher}: local rank {env.local_rank} is not in [0, {local}) processes per "
            "machine"
        )
    if env.rank % local != env.local_rank:
        raise LaunchError(
            f"{env.launcher}: rank {env.rank} with local rank {env.local_rank} of {local}: the "
            "ranks of a machine must be consecutive (SLURM: use the default block distribution, "
            "not --distribution=cyclic)"
        )
    return env


def detect_environment(
    environ: Mapping[str, str], resolve_host: Callable[[str], str] = first_host
) -> Optional[DistributedEnvironment]:
    """This process's place in a run started by a cluster launcher, read from its environment.

    ``RANK``/``WORLD_SIZE`` (torchrun, or a Kubernetes-style job) come first: ``srun torchrun``
    inside a SLURM job is a torchrun run. Otherwise an ``srun`` step of more than one task is a
    SLURM run. Anything else (no launcher, or one SLURM task) is None: ``train_net.py`` starts its
    own processes.

    Args:
        environ: the environment (``os.environ``).
        resolve_host: the first host of a SLURM node list (:func:`first_host`).

    Raises:
        LaunchError: the environment describes processes inconsistently.
    """
    if any(_present(environ, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _from_torch_variables(environ)
    if _present(environ, "SLURM_PROCID"):
        return _from_slurm(environ, resolve_host)
    return None


def _check_arguments(args: Any, env: DistributedEnvironment) -> None:
    spawned = []
    if getattr(args, "num_gpus", 1) > 1:
        spawned.append(f"--num-gpus {args.num_gpus}")
    if getattr(args, "num_machines", 1) > 1:
        spawned.append(f"--num-machines {args.num_machines}")
    if getattr(args, "machine_rank", 0) != 0:
        spawned.append(f"--machine-rank {args.machine_rank}")
    if spawned:
        how = (
            "srun --ntasks-per-node=<processes per machine>"
            if env.launcher.startswith("SLURM")
            else "torchrun --nproc-per-node=<processes per machine> --nnodes=<machines>"
        )
        raise LaunchError(
            f"{' '.join(spawned)} given to a process started by {env.launcher} (rank {env.rank} "
            f"of {env.world_size}): the launcher starts the processes; drop "
            f"{', '.join(s.split()[0] for s in spawned)} and set their number with {how}"
        )


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
                _check_arguments(args, env)
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
