"""Every shipped config loads, and every KD config names a teacher config that exists."""

import os
from pathlib import Path

import pytest
from conftest import REPO, build_cfg

CONFIGS = sorted(
    str(p.relative_to(REPO))
    for p in (REPO / "configs").rglob("*.yaml")
    if not p.name.startswith("Base-")
)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_loads(config):
    cfg = build_cfg(config, [])
    if cfg.KD.TEACHER.CONFIG_FILE.startswith("hf://"):
        # A Hugging Face teacher: config and weights from one save_pretrained folder.
        assert not cfg.KD.TEACHER.WEIGHTS, "an hf:// teacher's weights come from its folder"
        return
    if cfg.KD.TEACHER.CONFIG_FILE:
        assert os.path.isfile(REPO / cfg.KD.TEACHER.CONFIG_FILE), cfg.KD.TEACHER.CONFIG_FILE
        assert cfg.KD.TEACHER.WEIGHTS, "a KD config names its teacher's weights"
        from kd.teacher import is_lazy_config

        if is_lazy_config(str(REPO / cfg.KD.TEACHER.CONFIG_FILE)):
            from detectron2.config import LazyConfig

            assert "model" in LazyConfig.load(str(REPO / cfg.KD.TEACHER.CONFIG_FILE))
            return
        teacher = build_cfg(cfg.KD.TEACHER.CONFIG_FILE, [])
        assert not teacher.KD.TEACHER.CONFIG_FILE, "a teacher is a plain detector"


def test_there_are_configs():
    assert len(CONFIGS) >= 5 and Path(REPO / "configs/kd_shapes/faster_rcnn_kd_chen2017.yaml")
