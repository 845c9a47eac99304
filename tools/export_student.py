#!/usr/bin/env python
"""Write a distilled student (or any detector of the project) as ONNX and TorchScript.

    python tools/export_student.py --config-file CFG [--weights W] --output DIR \\
        [--format onnx torchscript] [--sample-image IMAGE] [--check IMAGE_OR_FOLDER ...] \\
        [--atol 1e-3] [KEY VALUE ...]

CFG and W are what ``tools/predict.py`` takes: a student written by ``tools/extract_student.py``
(``student.yaml``, whose ``MODEL.WEIGHTS`` names ``student.pth``), or a KD config with its
distillation checkpoint (the student alone is exported), or a plain detector config with its
weights. Every family of the project exports: Faster R-CNN (``GeneralizedRCNN``), RetinaNet, FCOS
and the DETR family, on ResNet or MobileNetV2 backbones.

The model is traced with detectron2's own ``TracingAdapter`` (``detectron2/export/flatten.py``,
reached through :func:`kd.compat.tracing_adapter`) and exported with PyTorch's TorchScript-based
ONNX exporter (``dynamo=False``, opset 17) and ``torch.jit.trace``. Both files take one image and
return three tensors:

* input ``image``: float32 (3, H, W), pixels 0-255 in the config's ``INPUT.FORMAT`` (RGB for the
  configs/bccd models), already resized as ``DefaultPredictor`` does (``ResizeShortestEdge`` to
  ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``); normalisation and padding are inside the model;
* outputs ``boxes`` (N, 4) x0 y0 x1 y1 in that resized image's pixels, ``scores`` (N,),
  ``classes`` (N,) int64, after the model's own score threshold and NMS / top-k, as detectron2
  returns them (scale the boxes by original / resized size to draw them on the original image).

The traced graph keeps the input size it was traced at (H, W of ``--sample-image`` after the
resize; default: the first ``--check`` image, else a random image of ``INPUT.MIN_SIZE_TEST`` x
``INPUT.MAX_SIZE_TEST``): tracing turns Python-side sizes into constants (anchors, padding masks,
the DETR's level shapes). Run it on images resized to that size; every configs/bccd image (640x480)
resizes to the same 320x240. ``DIR/export.json`` records it, with the output names.

``--check`` runs the PyTorch model, the ONNX file in ONNX Runtime (CPU) and the TorchScript file on
each image and compares their detections: the same number, each paired with one of the same class
whose box and score are equal within ``--atol`` (absolute, in pixels and score units; default
1e-3); pairs, not positions, since detections whose scores tie to float rounding may come out in
either order, or either be kept at the ``DETECTIONS_PER_IMAGE`` cut (:func:`compare`). It prints
the largest differences and ends with exit status 1 when an image differs, or when nothing was
compared (no detections). The result is written into ``DIR/export.json``.

A student built on what ``kd`` registers (FCOS, the DETR family, the MobileNetV2 backbones) is
plain ONNX / TorchScript like any other: the ONNX file runs in ONNX Runtime alone, the TorchScript
file in torch after ``import torchvision`` (its NMS and ROIAlign ops); neither needs detectron2 or
``kd``.
"""

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(TOOLS, "..", "projects"))
sys.path.insert(0, TOOLS)

from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import GeneralizedRCNN  # noqa: E402
from predict import InputError, Predictor, list_images, setup_cfg  # noqa: E402

from kd.checkpoint import WeightsError  # noqa: E402
from kd.compat import tracing_adapter  # noqa: E402

__all__ = [
    "OUTPUT_NAMES",
    "load_model",
    "traceable",
    "export_onnx",
    "export_torchscript",
    "run_onnx",
    "compare",
    "main",
]

OUTPUT_NAMES = ("boxes", "scores", "classes")
OPSET = 17
# Scores this close are a tie (float rounding differs between runtimes): see :func:`compare`.
TIE = 1e-6
FORMATS = ("onnx", "torchscript")


def load_model(config_file: str, weights: Optional[str], opts: Sequence[str]):
    """(plain config, the model in eval mode on the CPU, its ``ResizeShortestEdge``) as
    ``tools/predict.py`` builds them: a KD config gives its student."""
    cfg, _ = setup_cfg(config_file, [*opts, "MODEL.DEVICE", "cpu"])
    weights = weights if weights is not None else cfg.MODEL.WEIGHTS
    if not weights:
        raise InputError("no weights: pass --weights FILE (MODEL.WEIGHTS is empty)")
    predictor = Predictor(cfg, weights)
    return cfg, predictor.model, predictor.aug


def _detections(model: torch.nn.Module, inputs: List[Dict]) -> Tuple[torch.Tensor, ...]:
    """(boxes, scores, classes) of one image, in the input image's pixels.

    Faster R-CNN runs ``inference(do_postprocess=False)``, as detectron2's own
    ``tools/deploy/export_model.py`` traces it; the other families run ``forward``, whose
    postprocessing to the input's own size (no "height"/"width" given) is the identity.
    """
    if isinstance(model, GeneralizedRCNN):
        instances = model.inference(inputs, do_postprocess=False)[0]
    else:
        instances = model(inputs)[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def traceable(model: torch.nn.Module, image: torch.Tensor) -> torch.nn.Module:
    """detectron2's ``TracingAdapter`` around ``model``: takes the (3, H, W) image, returns the
    ``OUTPUT_NAMES`` tensors."""
    adapter = tracing_adapter()(model, [{"image": image}], inference_func=_detections)
    adapter.eval()
    return adapter


def export_onnx(adapter: torch.nn.Module, image: torch.Tensor, path: str) -> None:
    """The ONNX file of ``traceable(...)`` traced on ``image`` (opset ``OPSET``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: sizes become constants (see __doc__)
        torch.onnx.export(
            adapter,
            (image,),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "detections"} for name in OUTPUT_NAMES},
        )
    import onnx

    onnx.checker.check_model(onnx.load(path))


def export_torchscript(adapter: torch.nn.Module, image: torch.Tensor, path: str) -> None:
    """The TorchScript file of ``traceable(...)`` traced on ``image`` (loads with
    ``torch.jit.load`` alone)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    traced.save(path)


def onnx_session(path: str, threads: int = 0):
    """An ONNX Runtime CPU session of ``path`` (``threads`` 0: ONNX Runtime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(session, image: torch.Tensor) -> Tuple[np.ndarray, ...]:
    """The ``OUTPUT_NAMES`` arrays of an ONNX Runtime session on one (3, H, W) image."""
    return tuple(session.run(list(OUTPUT_NAMES), {"image": image.numpy()}))


def compare(reference: Sequence, other: Sequence, atol: float) -> Dict[str, float]:
    """How far ``other``'s (boxes, scores, classes) are from ``reference``'s.

    Detections are paired one to one, not by position, since detections whose scores tie (to
    float rounding) may come out of a sort in either order: each reference detection, in order,
    with the nearest unpaired detection of ``other`` (largest coordinate difference) of its class
    whose box and score are within ``atol``. A reference detection left unpaired whose score ties
    (within ``TIE``) with the lowest kept score is excused: at the ``DETECTIONS_PER_IMAGE`` / top-k
    cut a tie may keep either detection.

    Returns:
        ``count`` (reference's N), ``same_count`` (0/1), ``unpaired`` (reference detections with
        no pair, excused ones not counted), ``box_diff`` and ``score_diff`` (largest absolute
        differences over the pairs), ``ok`` (0/1: same count and no unpaired detection).
    """
    ref = [np.asarray(t.detach().numpy() if torch.is_tensor(t) else t) for t in reference]
    out = [np.asarray(t.detach().numpy() if torch.is_tensor(t) else t) for t in other]
    free = np.ones(len(out[0]), dtype=bool)
    box_diff, score_diff, unpaired = 0.0, 0.0, 0
    lowest = float(min(ref[1].min(), out[1].min())) if len(ref[1]) and len(out[1]) else 0.0
    for box, score, cls in zip(*ref):
        gaps = np.abs(out[0] - box).max(axis=1) if len(out[0]) else np.zeros(0)
        score_gap = np.abs(out[1] - score)
        candidates = free & (out[2] == cls) & (score_gap <= atol) & (gaps <= atol)
        if not candidates.any():
            unpaired += int(score - lowest > TIE)
            continue
        j = int(np.where(candidates, gaps, np.inf).argmin())
        free[j] = False
        box_diff = max(box_diff, float(gaps[j]))
        score_diff = max(score_diff, float(score_gap[j]))
    same_count = len(ref[0]) == len(out[0])
    return {
        "count": float(len(ref[0])),
        "same_count": float(same_count),
        "unpaired": float(unpaired),
        "box_diff": box_diff,
        "score_diff": score_diff,
        "ok": float(same_count and unpaired == 0),
    }


def resized_image(path: str, cfg, aug) -> torch.Tensor:
    """The (3, H, W) float32 input of one image file, as ``tools/predict.py`` feeds its model."""
    image = read_image(path, format=cfg.INPUT.FORMAT)
    resized = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))


_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def split_config_options(paths: List[str], opts: List[str]) -> Tuple[List[str], List[str]]:
    """``KEY VALUE`` options that a list option (``nargs="+"``) took: from the first config key
    (``MODEL.X``) on, they are config options, not paths."""
    for i, token in enumerate(paths):
        if _CONFIG_KEY.match(token) and not os.path.exists(token):
            return paths[:i], [*paths[i:], *opts]
    return paths, opts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, help="student, detector or KD config")
    parser.add_argument("--weights", default=None, help="weights file (default: MODEL.WEIGHTS)")
    parser.add_argument("--output", required=True, help="folder for model.onnx, model.ts")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--sample-image", default=None, help="image to trace with")
    parser.add_argument("--check", nargs="+", default=[], help="images or folders to compare on")
    parser.add_argument("--atol", type=float, default=1e-3, help="tolerance of --check")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    args.check, args.opts = split_config_options(args.check, args.opts)
    return args


def run(args: argparse.Namespace) -> Dict:
    """Export (and check); returns what ``DIR/export.json`` records."""
    check_images = list_images(args.check) if args.check else []
    cfg, model, aug = load_model(args.config_file, args.weights, args.opts)
    if args.sample_image:
        sample = resized_image(list_images([args.sample_image])[0], cfg, aug)
    elif check_images:
        sample = resized_image(check_images[0], cfg, aug)
    else:
        generator = torch.Generator().manual_seed(0)
        size = (3, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        sample = torch.rand(size, generator=generator) * 255
    os.makedirs(args.output, exist_ok=True)
    adapter = traceable(model, sample)
    record = {
        "config_file": os.path.abspath(args.config_file),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "input": {"name": "image", "shape": list(sample.shape), "format": cfg.INPUT.FORMAT},
        "outputs": list(OUTPUT_NAMES),
        "files": {},
    }
    paths = {"onnx": os.path.join(args.output, "model.onnx")}
    paths["torchscript"] = os.path.join(args.output, "model.ts")
    if "onnx" in args.format:
        export_onnx(adapter, sample, paths["onnx"])
        record["files"]["onnx"] = paths["onnx"]
        print(f"[export] wrote {paths['onnx']} (ONNX opset {OPSET}, input {tuple(sample.shape)})")
    if "torchscript" in args.format:
        export_torchscript(adapter, sample, paths["torchscript"])
        record["files"]["torchscript"] = paths["torchscript"]
        print(f"[export] wrote {paths['torchscript']} (TorchScript)")
    if check_images:
        record["check"] = check(record, model, cfg, aug, check_images, args.atol)
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def check(record: Dict, model, cfg, aug, images: Sequence[str], atol: float) -> Dict:
    """Compare each exported file with the PyTorch model on ``images`` (see __doc__)."""
    runners = {}
    if "onnx" in record["files"]:
        session = onnx_session(record["files"]["onnx"])
        runners["onnxruntime"] = lambda image: run_onnx(session, image)
    if "torchscript" in record["files"]:
        scripted = torch.jit.load(record["files"]["torchscript"])
        runners["torchscript"] = lambda image: scripted(image)
    expected = tuple(record["input"]["shape"])
    worst = {name: {"box_diff": 0.0, "score_diff": 0.0, "failed": []} for name in runners}
    detections = 0
    for path in images:
        image = resized_image(path, cfg, aug)
        if tuple(image.shape) != expected:
            raise InputError(
                f"--check image '{path}' resizes to {tuple(image.shape)}, not the traced "
                f"{expected}: pass images of one size (or --sample-image one of that size)"
            )
        with torch.no_grad():
            reference = _detections(model, [{"image": image}])
        detections += len(reference[0])
        for name, runner in runners.items():
            with torch.no_grad():
                result = compare(reference, runner(image), atol)
            w = worst[name]
            w["box_diff"] = max(w["box_diff"], result["box_diff"])
            w["score_diff"] = max(w["score_diff"], result["score_diff"])
            if not result["ok"]:
                w["failed"].append(os.path.basename(path))
    for name, w in worst.items():
        verdict = "equal" if not w["failed"] else f"DIFFERENT on {len(w['failed'])} images"
        print(
            f"[export] {name} vs PyTorch on {len(images)} images ({detections} detections): "
            f"{verdict} within {atol:g} (largest box diff {w['box_diff']:.2e} px, "
            f"score diff {w['score_diff']:.2e})"
        )
    return {"images": len(images), "detections": detections, "atol": atol, "runtimes": worst}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        record = run(args)
    except (InputError, WeightsError) as e:
        raise SystemExit(f"export_student.py: error: {e}") from None
    failed = [n for n, w in record.get("check", {}).get("runtimes", {}).items() if w["failed"]]
    if failed:
        raise SystemExit(f"export_student.py: error: {', '.join(failed)} differ from PyTorch")
    if record.get("check", {}).get("detections", 1) == 0:
        raise SystemExit(
            "export_student.py: error: --check compared nothing: the model detected nothing on "
            "these images (an untrained model? lower its test score threshold, e.g. "
            "MODEL.RETINANET.SCORE_THRESH_TEST 0)"
        )


if __name__ == "__main__":
    main()
