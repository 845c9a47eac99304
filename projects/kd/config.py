"""Every ``KD.*`` config key, with the reason for its default."""
from detectron2.config import CfgNode as CN


def add_kd_config(cfg: CN) -> None:
    """Add the knowledge-distillation keys (and the DETR family's ``MODEL.DETR.*``) to ``cfg``.

    Args:
        cfg: a detectron2 config, modified in place. Calling it twice is harmless.
    """
    from kd.modeling.detr.config import add_detr_config

    add_detr_config(cfg)
    if "KD" in cfg:
        return
    cfg.KD = CN()
