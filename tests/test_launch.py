"""Cluster launchers: the environment a process is started in (torchrun, SLURM, RANK/WORLD_SIZE),
read into its place in the run, and two-machine runs on loopback by --num-machines and torchrun."""

import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, TINY_RCNN_OPTS
from dist_worker import assert_ranks_identical

from kd.launch import DistributedEnvironment, LaunchError, detect_environment, parse_first_host

STUDENT_CONFIG = "configs/kd_shapes/faster_rcnn_student.yaml"


def detect(environ):
    return detect_environment(environ, resolve_host=parse_first_host)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node[01-03]", "node01"),
        ("node[010-012,020]", "node010"),
        ("gpu-a[2,4-5],gpu-b1", "gpu-a2"),
        ("rack[1-2]-n[08-09]", "rack1-n08"),
        ("n7", "n7"),
        ("alpha,beta", "alpha"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert parse_first_host(nodelist) == first


def test_torchrun_single_node():
    env = detect(
        {
            "TORCHELASTIC_RUN_ID": "none",
            "RANK": "1",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
        }
    )
    assert env == DistributedEnvironment("torchrun", 1, 2, 1, 2, "127.0.0.1", 29500, "env://")
    assert (env.machine_rank, env.num_machines) == (0, 1)


def test_torchrun_second_of_two_nodes_of_four():
    env = detect(
        {
            "TORCHELASTIC_RUN_ID": "job7",
            "RANK": "5",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "8",
            "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29400",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.machine_rank, env.num_machines) == (1, 2)


def test_kubernetes_style_one_process_per_pod():
    env = detect(
        {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"}
    )
    assert env.launcher == "the RANK/WORLD_SIZE environment"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 3, 0, 1)
    assert (env.master_addr, env.master_port, env.machine_rank) == ("job-master-0", 23456, 2)


def test_srun_two_nodes_of_four_tasks_master_from_the_node_list():
    env = detect(
        {
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "8",
            "SLURM_TASKS_PER_NODE": "4(x2)",
            "SLURM_NODELIST": "gpu[07-08]",
            "MASTER_PORT": "25000",
        }
    )
    assert env == DistributedEnvironment(
        "SLURM (srun)", 5, 8, 1, 4, "gpu07", 25000, "tcp://gpu07:25000"
    )
    assert (env.machine_rank, env.num_machines) == (1, 2)


def test_srun_with_master_addr_and_ntasks_per_node():
    env = detect(
        {
            "SLURM_STEP_ID": "3",
            "SLURM_PROCID": "2",
            "SLURM_LOCALID": "0",
            "SLURM_NTASKS": "4",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NODELIST": "a[1-2]",
            "MASTER_ADDR": "10.1.2.3",
            "MASTER_PORT": "29500",
        }
    )
    assert (env.rank, env.local_rank, env.local_world_size, env.machine_rank) == (2, 0, 2, 1)
    assert env.init_method == "tcp://10.1.2.3:29500"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"MASTER_ADDR": "x", "MASTER_PORT": "1"},  # a rendezvous address alone starts nothing
        # one SLURM task: train_net.py starts its own processes (--num-gpus)
        {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"},
    ],
)
def test_no_launcher(environ):
    assert detect(environ) is None


SRUN = {
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_TASKS_PER_NODE": "2",
    "SLURM_NODELIST": "n1",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK missing"),
        ({"RANK": "0"}, "WORLD_SIZE missing"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "not in"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR not set"),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"},
            "LOCAL_WORLD_SIZE is not",
        ),
        (
            {
                "RANK": "1",
                "WORLD_SIZE": "3",
                "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "1",
            },
            "cannot be split",
        ),
        ({k: v for k, v in SRUN.items() if k != "MASTER_PORT"}, "set MASTER_PORT"),
        ({k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}, "not in an srun step"),
        (dict(SRUN, SLURM_NTASKS="3", SLURM_TASKS_PER_NODE="2,1"), "different numbers"),
        (dict(SRUN, SLURM_LOCALID="0"), "must be consecutive"),
    ],
)
def test_inconsistent_environments_are_refused(environ, message):
    with pytest.raises(LaunchError, match=message):
        detect(environ)


def test_num_gpus_with_torchrun_is_one_line(monkeypatch, capsys):
    from detectron2.engine import default_argument_parser

    from kd.launch import launch

    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    args = default_argument_parser().parse_args(["--num-gpus", "2"])
    ran = []
    assert launch(ran.append, args) == 2
    assert not ran
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[rank 0] error: --num-gpus 2 given to a process")
    assert "torchrun --nproc-per-node" in err[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_machines(commands, env, logs) -> None:
    """Run the commands at once (files, not pipes: a full pipe would stall one machine and,
    through the collectives, the other)."""
    logs.mkdir(parents=True, exist_ok=True)
    files = [open(logs / f"machine{i}.txt", "w") for i in range(len(commands))]
    procs = [
        subprocess.Popen(c, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        for c, f in zip(commands, files)
    ]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p, f in zip(procs, files):
            if p.poll() is None:
                p.kill()
            f.close()
    for i, code in enumerate(codes):
        assert code == 0, (logs / f"machine{i}.txt").read_text()[-4000:]


def _worker_argv(out, datasets_root):
    return [
        "tests/dist_worker.py",
        str(out),
        "--config-file",
        STUDENT_CONFIG,
        *TINY_RCNN_OPTS,
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.MAX_ITER",
        "2",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(out),
    ]


def _env(datasets_root):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID"):
        env.pop(k, None)
    return env


def test_two_machines_by_num_machines(datasets_root, tmp_path):
    """detectron2's launch: two train processes, one per "machine", on loopback."""
    out, port = tmp_path / "machines", _free_port()
    argv = _worker_argv(out, datasets_root)
    commands = [
        [sys.executable, argv[0], argv[1], "--num-machines", "2", "--machine-rank", str(r)]
        + ["--dist-url", f"tcp://127.0.0.1:{port}", *argv[2:]]
        for r in range(2)
    ]
    _two_machines(commands, _env(datasets_root), tmp_path / "logs")
    assert_ranks_identical(out, world_size=2, local_size=1)


def test_two_nodes_by_torchrun(datasets_root, tmp_path):
    """torchrun --nnodes 2, one process per node, static rendezvous on loopback."""
    out, port = tmp_path / "torchrun", _free_port()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    commands = [
        [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(r)]
        + ["--master-addr", "127.0.0.1", "--master-port", str(port)]
        + _worker_argv(out, datasets_root)
        for r in range(2)
    ]
    _two_machines(commands, _env(datasets_root), tmp_path / "logs")
    assert_ranks_identical(out, world_size=2, local_size=1)
