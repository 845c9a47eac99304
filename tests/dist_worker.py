"""Train in several processes, started as train_net.py starts them, and save each rank's model.

Every rank writes ``rank<R>.pth`` (the student's, or the plain model's, parameters *and* buffers:
what a checkpoint saves and what evaluation uses) and ``rank<R>.json`` (its rank, world size, and
detectron2's local rank and local size). Two ways in:

* ``main(out_dir, argv)`` from a test process (``--num-gpus 2`` in argv: spawned processes);
* ``python tests/dist_worker.py OUT_DIR ARGV...`` under ``torchrun`` or ``srun``, or as one of the
  machines of a ``--num-machines`` run.

``fail_at=(rank, iteration)`` makes that rank's training step raise at that iteration instead.
"""

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inject_failure(rank: int, iteration: int) -> None:
    from detectron2.utils import comm

    from kd.engine import Trainer

    original = Trainer.run_step

    def run_step(self):
        if comm.get_rank() == rank and self.iter == iteration:
            raise RuntimeError(f"injected failure on rank {rank}")
        return original(self)

    Trainer.run_step = run_step


def _train_and_dump(args, out_dir: str, fail_at: Optional[Tuple[int, int]] = None) -> None:
    from detectron2.utils import comm

    sys.path.insert(0, REPO)
    import train_net

    if fail_at is not None:
        _inject_failure(*fail_at)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    model = getattr(model, "student", model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    rank = comm.get_rank()
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pth"))
    place = {
        "rank": rank,
        "world_size": comm.get_world_size(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(place, f)


def main(out_dir: str, argv: Sequence[str], fail_at: Optional[Tuple[int, int]] = None) -> int:
    """Run the training in every process of the run ``argv`` and the environment describe;
    returns the exit status as train_net.py's."""
    sys.path.insert(0, REPO)
    from detectron2.engine import default_argument_parser

    from kd.launch import launch

    os.makedirs(out_dir, exist_ok=True)
    args = default_argument_parser().parse_args(list(argv))
    return launch(_train_and_dump, args, (args, out_dir, fail_at))


def assert_ranks_identical(out: Path, world_size: int, local_size: int) -> None:
    """Every rank of a dist_worker run saved the same parameters and buffers, and knew its place:
    its rank, the world size, and detectron2's local rank and size on its machine."""
    states = [torch.load(out / f"rank{r}.pth", weights_only=True) for r in range(world_size)]
    bn_stats = [k for k in states[0] if k.endswith(("running_mean", "running_var"))]
    assert len(bn_stats) > 10  # plain BatchNorm in the backbone: per-rank statistics to equalise
    for r, state in enumerate(states[1:], start=1):
        assert state.keys() == states[0].keys()
        different = [k for k in state if not torch.equal(state[k], states[0][k])]
        assert not different, f"rank {r} differs from rank 0 in {len(different)}: {different[:4]}"
    for r in range(world_size):
        place = json.loads((out / f"rank{r}.json").read_text())
        assert place == {
            "rank": r,
            "world_size": world_size,
            "local_rank": r % local_size,
            "local_size": local_size,
        }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
