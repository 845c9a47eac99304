"""The fast COCO evaluator kd.compat installs gives pycocotools' AP on the same detections."""

import copy
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_DATASET, load_script

from kd import compat


@pytest.fixture(scope="module")
def bench():
    return load_script("tools/benchmark_coco_eval.py")


def test_same_stats_as_pycocotools_on_a_realistic_set(bench):
    """Many images, boxes and classes, crowd boxes and every area range: detectron2's own
    evaluation with the fast class gives pycocotools' 12 stats and precision table."""
    pytest.importorskip("faster_coco_eval")
    from detectron2.evaluation import coco_evaluation

    ground_truth, detections = bench.synthetic_coco(
        num_images=150, detections_per_image=40, num_classes=12, seed=1, crowd_fraction=0.05
    )
    annotations = ground_truth["annotations"]
    assert sum(a["iscrowd"] for a in annotations) >= 20
    areas = np.array([a["area"] for a in annotations])
    assert (areas < 32**2).sum() > 100 and (areas > 96**2).sum() > 100
    assert ((areas >= 32**2) & (areas <= 96**2)).sum() > 100

    assert compat.install_fast_coco_eval()
    reference, *_ = bench.evaluate(ground_truth, detections, fast=False)
    fast, *_ = bench.evaluate(ground_truth, detections, fast=True)
    if not compat.has_compiled_ops():
        from faster_coco_eval import COCOeval_faster

        assert isinstance(fast, COCOeval_faster)
        assert coco_evaluation.COCOeval_opt is type(fast)
    stats = np.asarray(reference.stats)
    assert stats.shape == (12,) and (stats > 0.05).all() and (stats < 0.95).all()
    np.testing.assert_allclose(np.asarray(fast.stats[:12]), stats, rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(fast.eval["precision"]), reference.eval["precision"], rtol=0, atol=1e-6
    )


def _jittered_predictions(dataset_dicts, seed: int):
    """One ``{"instances"}`` output per image: each ground-truth box jittered, sometimes with
    another class, plus random boxes, with random scores (COCOEvaluator's input)."""
    from detectron2.structures import Boxes, BoxMode, Instances

    rng = np.random.default_rng(seed)
    outputs = []
    for d in dataset_dicts:
        h, w = d["height"], d["width"]
        boxes, classes = [], []
        for a in d["annotations"]:
            x0, y0, x1, y1 = BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            dx, dy = rng.normal(0, 0.1, 2) * [x1 - x0, y1 - y0]
            boxes.append([x0 + dx, y0 + dy, x1 + dx, y1 + dy])
            classes.append(a["category_id"] if rng.random() < 0.8 else int(rng.integers(7)))
        for _ in range(10):
            x0, y0 = rng.uniform(0, w - 8), rng.uniform(0, h - 8)
            boxes.append([x0, y0, x0 + rng.uniform(4, w - x0), y0 + rng.uniform(4, h - y0)])
            classes.append(int(rng.integers(7)))
        instances = Instances((h, w))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.tensor(rng.random(len(boxes)), dtype=torch.float32)
        instances.pred_classes = torch.tensor(classes)
        outputs.append({"instances": instances})
    return outputs


def test_build_coco_evaluator_uses_it_and_reports_pycocotools_ap(datasets_root, tmp_path):
    """Through COCOEvaluator on a registered dataset, every reported metric (per-category AP
    included) equals pycocotools'."""
    pytest.importorskip("faster_coco_eval")
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator

    name = f"{TINY_DATASET}_val"
    dicts = DatasetCatalog.get(name)
    outputs = _jittered_predictions(dicts, seed=0)

    def results(evaluator):
        evaluator.reset()
        for d, out in zip(dicts, outputs):
            evaluator.process([{"image_id": d["image_id"]}], [copy.deepcopy(out)])
        return evaluator.evaluate()["bbox"]

    fast = compat.build_coco_evaluator(name, output_dir=str(tmp_path / "fast"))
    assert fast._use_fast_impl
    reference = results(COCOEvaluator(name, output_dir=str(tmp_path / "ref"), use_fast_impl=False))
    got = results(fast)
    assert got.keys() == reference.keys() and len(got) > 6
    assert 1.0 < reference["AP"] < 99.0
    for k, v in reference.items():
        # COCOEvaluator reports percent: 1e-4 of a stat is 1e-2 here.
        assert got[k] == pytest.approx(v, abs=1e-2, nan_ok=True), k


def test_pycocotools_without_faster_coco_eval(datasets_root, monkeypatch):
    if compat.has_compiled_ops():
        pytest.skip("detectron2's compiled evaluator is the fast one here")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import raises ImportError
    assert not compat.install_fast_coco_eval()
    assert not compat.build_coco_evaluator(f"{TINY_DATASET}_val")._use_fast_impl
