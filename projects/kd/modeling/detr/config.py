"""``MODEL.DETR.*`` keys (placeholder; the DETR family fills this in)."""
from detectron2.config import CfgNode as CN


def add_detr_config(cfg: CN) -> None:
    """Add ``MODEL.DETR.*`` to ``cfg`` in place; harmless when called twice.

    Args:
        cfg: a detectron2 config.
    """
    if "DETR" in cfg.MODEL:
        return
    cfg.MODEL.DETR = CN()
