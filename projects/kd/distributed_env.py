"""The description of a distributed run that a cluster launcher puts in the environment
(``torchrun``, a Kubernetes-style job, SLURM's ``srun``), read in one place and checked, so that
:func:`kd.launch.launch` joins the process group from it instead of spawning."""

import dataclasses
import re
import shutil
import subprocess
from typing import Any, Callable, Mapping, Optional

__all__ = [
    "LaunchError",
    "DistributedEnvironment",
    "detect_environment",
    "first_host",
    "parse_first_host",
    "check_arguments",
]


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


def check_arguments(args: Any, env: DistributedEnvironment) -> None:
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
