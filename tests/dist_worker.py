"""Run train_net.main in 2 CPU processes through kd.compat.launch; each rank saves its student."""

import os
import sys

import torch


def _train_and_dump(args, out_dir):
    import torch.distributed as dist
    from detectron2.utils import comm

    import train_net

    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    # Parameters, not buffers: with per-process BatchNorm (not SyncBN) each rank keeps its own
    # running statistics, as in any DDP run; detectron2 checkpoints rank 0's.
    student = {k: v.detach().cpu() for k, v in model.student.named_parameters()}
    torch.save(student, os.path.join(out_dir, f"rank{comm.get_rank()}.pth"))
    if comm.is_main_process():
        with open(os.path.join(out_dir, "world.txt"), "w") as f:
            f.write(f"world size: {dist.get_world_size()}\n")


def main(out_dir, argv):
    sys.path.insert(0, os.getcwd())
    from detectron2.engine import default_argument_parser

    from kd.compat import launch

    os.makedirs(out_dir, exist_ok=True)
    args = default_argument_parser().parse_args(argv)
    launch(_train_and_dump, 2, args=(args, out_dir))
