#!/usr/bin/env python
"""Train a Hugging Face RT-DETR on a registered dataset with transformers' own loss, as a teacher.

    python tools/train_hf_teacher.py --dataset kd_shapes --output output/kd_shapes/hf_rtdetr_teacher
        [--iters 3000] [--batch-size 8] [--lr 5e-4] [--backbone-lr-mult 1.0] [--lr-step 0.85]
        [--image-size 128] [--size small|tiny] [--seed 1] [--device cpu|cuda]
        [--checkpoint-period 500] [--eval]

The model (``RTDetrForObjectDetection``, its own ResNet backbone from random initialisation: no
download) is trained on ``<dataset>_train`` (any dataset ``import kd`` registers, e.g. the
kd_shapes folder under ``$DETECTRON2_DATASETS``), its ``id2label`` the dataset's class names, with
``model(pixel_values, labels=...).loss`` (matching, focal/VFL, L1, GIoU, denoising and auxiliary
losses as transformers computes them), AdamW at the project's DETR recipe
(``configs/kd_shapes/Base-DETR.yaml``: learning rate 5e-4, the backbone at the same rate since it
starts from random weights, gradients clipped at 0.1, x0.1 after 85% of the iterations). The first
recipe (1e-4, the backbone at 0.1x as when fine-tuning a pretrained one, no step) left the kd_shapes
teacher at 5.7 AP after 1000 iterations, where the project's own DETR teacher reaches 36; with this
recipe it stayed at 5.0, because transformers froze the from-scratch backbone's batch norms
(``freeze_backbone_batch_norms``, now off). Input
as its processor prepares it: RGB / 255, a fixed ``--image-size`` square, no normalisation;
random horizontal flips. The folder it writes
(``save_pretrained``: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``) is a
teacher for ``KD.TEACHER.CONFIG_FILE "hf://<folder>"`` (``configs/kd_shapes/detr_kd_detr_hf.yaml``).
``--eval`` then measures its COCO box AP on ``<dataset>_val`` through the project's teacher
adapter, as the distillers see it.

Interrupted, it resumes: every ``--checkpoint-period`` iterations the model, the optimizer, the
iteration and both RNG states are written (atomically) to ``<output>/training_state.pth``, and the
same command continues from there, to the weights the uninterrupted run would have reached (one
process, same device). It is read with ``torch.load(weights_only=True)`` and refused, in one line,
when it was written with other training arguments. A finished folder is not trained again.
"""

import argparse
import json
import logging
import os
import time
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode

import kd  # noqa: F401  (registers the datasets under $DETECTRON2_DATASETS)
from kd.compat import build_coco_evaluator
from kd.families.hf_detr import HFDETRTeacher
from kd.weights import atomic_write

STATE_FILE = "training_state.pth"
# The arguments that decide what is trained: a resumed run must have the same.
TRAINING_ARGS = (
    "dataset",
    "iters",
    "batch_size",
    "lr",
    "backbone_lr_mult",
    "lr_step",
    "image_size",
    "size",
    "seed",
)

logger = logging.getLogger("train_hf_teacher")

# (backbone hidden sizes, depths, embedding, encoder/decoder width, decoder layers, queries)
SIZES = {
    "small": dict(
        hidden=[64, 128, 256, 512], depths=[2, 2, 2, 2], embed=64, d=128, layers=3, q=100
    ),
    "tiny": dict(hidden=[8, 16, 16, 16], depths=[1, 1, 1, 1], embed=8, d=16, layers=2, q=10),
}


def build_model(classes, size: str):
    """An RT-DETR (random initialisation) over ``classes``, of a preset ``size``."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    s = SIZES[size]
    channels = s["hidden"][1:]
    backbone = RTDetrResNetConfig(
        embedding_size=s["embed"],
        hidden_sizes=s["hidden"],
        depths=s["depths"],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
        downsample_in_bottleneck=False,
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        encoder_in_channels=channels,
        feat_strides=[8, 16, 32],
        encoder_hidden_dim=s["d"],
        encoder_layers=1,
        encoder_ffn_dim=2 * s["d"],
        encoder_attention_heads=max(2, s["d"] // 32),
        d_model=s["d"],
        decoder_in_channels=[s["d"]] * 3,
        decoder_ffn_dim=4 * s["d"],
        decoder_layers=s["layers"],
        decoder_attention_heads=max(2, s["d"] // 32),
        decoder_n_points=4 if size == "small" else 2,
        num_queries=s["q"],
        num_denoising=min(50, s["q"]),
        anchor_image_size=None,  # anchors from the feature maps: any input size
        # transformers freezes the backbone's batch norms by default (right for a pretrained
        # backbone); from random weights frozen batch norms are fixed affine maps that never
        # normalise: with them this teacher stayed below 6 AP on kd_shapes after 1000 iterations.
        freeze_backbone_batch_norms=False,
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
    )
    return RTDetrForObjectDetection(config)


def load_sample(record: dict, image_size: int, flip: bool):
    """(3, S, S) RGB in [0, 1] and the target dict transformers' loss takes."""
    image = torch.from_numpy(np.ascontiguousarray(read_image(record["file_name"], "RGB")))
    image = image.permute(2, 0, 1).float()
    h, w = image.shape[-2:]
    boxes = [
        BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
        for a in record.get("annotations", [])
        if not a.get("iscrowd", 0)
    ]
    labels = [a["category_id"] for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    xyxy = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if flip:
        image = image.flip(-1)
        xyxy = torch.stack([w - xyxy[:, 2], xyxy[:, 1], w - xyxy[:, 0], xyxy[:, 3]], 1)
    image = F.interpolate(
        image[None], size=(image_size, image_size), mode="bilinear", antialias=True
    )[0]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    x0, y0, x1, y1 = (xyxy / scale).clamp(0, 1).unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    target = {"class_labels": torch.tensor(labels, dtype=torch.long), "boxes": cxcywh}
    return image / 255.0, target


def _save_state(path: str, model, optimizer, iteration: int, rng, args) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "torch_rng": torch.get_rng_state(),
        # JSON: the generator's 128-bit state as plain text, read back without pickle.
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "args": json.dumps({k: getattr(args, k) for k in TRAINING_ARGS}),
    }
    atomic_write(path, lambda f: torch.save(state, f))


def _resume(path: str, model, optimizer, rng, args) -> int:
    """Restore a saved training state; returns the iteration to continue from (0: none)."""
    if not os.path.isfile(path):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["args"])
    wanted = {k: getattr(args, k) for k in TRAINING_ARGS}
    if saved != wanted:
        differ = ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in wanted.items()
                           if saved.get(k) != v)  # fmt: skip
        raise SystemExit(
            f"error: {path} was written by a run with other arguments ({differ}): run with "
            "those, or use another --output"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    logger.info("resumed from %s at iteration %d", path, state["iteration"])
    return int(state["iteration"])


def learning_rates(it: int, args) -> Tuple[float, float]:
    """(backbone, rest) learning rates at iteration ``it`` (from 0): linear warm-up over the first
    tenth of the iterations (at most 100), x0.1 from ``args.lr_step * args.iters`` on."""
    warmup = min(100, max(1, args.iters // 10))
    factor = min(1.0, (it + 1) / warmup) * (0.1 if it >= args.lr_step * args.iters else 1.0)
    return args.lr * args.backbone_lr_mult * factor, args.lr * factor


def train(args) -> str:
    from transformers import RTDetrImageProcessor

    if os.path.isfile(os.path.join(args.output, "model.safetensors")) and not os.path.isfile(
        os.path.join(args.output, STATE_FILE)
    ):
        logger.info("%s holds a trained teacher: not trained again", args.output)
        return args.output
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    name = f"{args.dataset}_train"
    records = DatasetCatalog.get(name)
    classes = list(MetadataCatalog.get(name).thing_classes)
    device = torch.device(args.device)
    model = build_model(classes, args.size).to(device).train()
    backbone = [p for n, p in model.named_parameters() if ".backbone." in n]
    rest = [p for n, p in model.named_parameters() if ".backbone." not in n]
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "lr": args.lr * args.backbone_lr_mult}, {"params": rest}],
        lr=args.lr,
        weight_decay=1e-4,
    )
    os.makedirs(args.output, exist_ok=True)
    state_path = os.path.join(args.output, STATE_FILE)
    first = _resume(state_path, model, optimizer, rng, args)
    start = time.perf_counter()
    for it in range(first, args.iters):
        for group, lr in zip(optimizer.param_groups, learning_rates(it, args)):
            group["lr"] = lr
        batch = rng.choice(
            len(records), size=args.batch_size, replace=len(records) < args.batch_size
        )
        samples = [
            load_sample(records[i], args.image_size, bool(rng.random() < 0.5)) for i in batch
        ]
        pixels = torch.stack([s[0] for s in samples]).to(device)
        labels = [{k: v.to(device) for k, v in s[1].items()} for s in samples]
        out = model(pixel_values=pixels, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"iteration {it}: the loss is {out.loss.item()}")
        if it % args.log_period == 0 or it == args.iters - 1:
            logger.info(
                "iter %d/%d  loss %.4f  %.2f s/iter",
                it + 1,
                args.iters,
                out.loss.item(),
                (time.perf_counter() - start) / (it + 1 - first),
            )
        done = it + 1
        if args.checkpoint_period > 0 and done % args.checkpoint_period == 0 and done < args.iters:
            _save_state(state_path, model, optimizer, done, rng, args)
    model.eval()
    model.save_pretrained(args.output, safe_serialization=True)
    RTDetrImageProcessor(
        size={"height": args.image_size, "width": args.image_size}, do_normalize=False
    ).save_pretrained(args.output)
    with open(os.path.join(args.output, "train_args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    if os.path.isfile(state_path):
        os.remove(state_path)  # finished: the folder is the teacher
    logger.info("written: %s (hf://%s as KD.TEACHER.CONFIG_FILE)", args.output, args.output)
    return args.output


@torch.no_grad()
def evaluate(folder: str, dataset: str, device: str) -> dict:
    """COCO box AP of the saved teacher on ``<dataset>_val``, through the project's adapter."""
    name = f"{dataset}_val"
    teacher = HFDETRTeacher.from_source(folder).to(torch.device(device)).eval()
    evaluator = build_coco_evaluator(name)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        image = read_image(record["file_name"], "RGB")
        inputs = [
            {
                "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                "image_id": record["image_id"],
                "height": record["height"],
                "width": record["width"],
            }
        ]
        evaluator.process(inputs, teacher(inputs))
    results = evaluator.evaluate()
    logger.info("teacher AP on %s: %s", name, results.get("bbox", {}).get("AP"))
    with open(os.path.join(folder, "eval_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="kd_shapes")
    parser.add_argument(
        "--output", default=os.path.join("output", "kd_shapes", "hf_rtdetr_teacher")
    )
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=1.0,
        help="the backbone's learning rate relative to --lr (1: it starts from random weights)",
    )
    parser.add_argument(
        "--lr-step",
        type=float,
        default=0.85,
        help="fraction of --iters after which the learning rate is x0.1 (1: no step)",
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-period", type=int, default=20)
    parser.add_argument(
        "--checkpoint-period",
        type=int,
        default=500,
        help="iterations between saved states (0: none)",
    )
    parser.add_argument("--eval", action="store_true", help="COCO AP on <dataset>_val after")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    folder = train(args)
    if args.eval:
        evaluate(folder, args.dataset, args.device)


if __name__ == "__main__":
    main()
