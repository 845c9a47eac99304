"""Tiny random-initialised Hugging Face DETR-family detectors, saved as ``save_pretrained`` folders
(a few layers, d_model 16-32, a two- or four-stage toy backbone; built in well under a second)."""

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

# The families the adapter takes, and the ones it refuses.
FAMILIES = ("rt_detr", "rt_detr_v2", "d_fine", "dab_detr", "deformable_two_stage")
REFUSED = ("detr", "conditional_detr", "deformable_single_stage")
# RT-DETR / D-FINE: no normalisation, fixed size; the others: ImageNet mean/std, shortest edge.
NORMALISED = ("dab_detr", "deformable_two_stage")


def _resnet():
    from transformers import ResNetConfig

    return ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )


def _rt_common(classes) -> dict:
    from transformers import RTDetrResNetConfig

    return dict(
        backbone_config=RTDetrResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16, 16, 16],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            out_features=["stage2", "stage3", "stage4"],
            downsample_in_bottleneck=False,
        ),
        encoder_hidden_dim=16,
        encoder_in_channels=[16, 16, 16],
        feat_strides=[8, 16, 32],
        encoder_layers=1,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        d_model=16,
        num_queries=10,
        decoder_in_channels=[16, 16, 16],
        decoder_ffn_dim=32,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_n_points=2,
        num_denoising=5,
        anchor_image_size=None,
        **_labels(classes),
    )


def _labels(classes: Sequence[str]) -> dict:
    id2label = {i: c for i, c in enumerate(classes)}
    return dict(id2label=id2label, label2id={c: i for i, c in id2label.items()})


def tiny_config(family: str, classes: Sequence[str]):
    """The ``transformers`` config of a tiny detector of ``family`` over ``classes``."""
    import transformers as tf

    detr_common = dict(
        use_timm_backbone=False,
        backbone_config=_resnet(),
        use_pretrained_backbone=False,
        backbone=None,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        **_labels(classes),
    )
    if family == "rt_detr":
        return tf.RTDetrConfig(**_rt_common(classes))
    if family == "rt_detr_v2":
        return tf.RTDetrV2Config(**_rt_common(classes))
    if family == "d_fine":
        common = _rt_common(classes)
        common.update(decoder_layers=3, decoder_n_points=[2, 2, 2])
        common["backbone_config"] = tf.HGNetV2Config(
            stem_channels=[3, 8, 8],
            stage_in_channels=[8, 16, 16, 16],
            stage_mid_channels=[8, 8, 8, 8],
            stage_out_channels=[16, 16, 16, 16],
            stage_num_blocks=[1, 1, 1, 1],
            stage_downsample=[False, True, True, True],
            stage_light_block=[False, False, True, True],
            stage_kernel_size=[3, 3, 5, 5],
            stage_numb_of_layers=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
            hidden_sizes=[16, 16, 16, 16],
            embedding_size=8,
        )
        return tf.DFineConfig(hidden_expansion=0.5, depth_mult=0.34, **common)
    if family == "dab_detr":
        return tf.DabDetrConfig(hidden_size=16, **detr_common)
    if family in ("deformable_two_stage", "deformable_single_stage"):
        two = family == "deformable_two_stage"
        return tf.DeformableDetrConfig(
            d_model=32,  # its input projections use GroupNorm(32, d_model)
            two_stage=two,
            with_box_refine=two,
            two_stage_num_proposals=10,
            encoder_n_points=2,
            decoder_n_points=2,
            num_feature_levels=3,
            **detr_common,
        )
    if family == "detr":
        return tf.DetrConfig(d_model=16, **detr_common)
    if family == "conditional_detr":
        return tf.ConditionalDetrConfig(d_model=16, **detr_common)
    raise ValueError(family)


def processor_config(family: str, size: int) -> Dict:
    """A ``preprocessor_config.json`` as the family's own processor writes it, at ``size`` px."""
    if family in NORMALISED:
        return {
            "do_resize": True,
            "size": {"shortest_edge": size, "longest_edge": size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
            "do_pad": True,
        }
    return {
        "do_resize": True,
        "size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "do_pad": False,
    }


def save_tiny(
    family: str,
    folder: Path,
    classes: Sequence[str],
    *,
    size: Optional[int] = 64,
    seed: int = 0,
):
    """Build a tiny random ``family`` detector, ``save_pretrained`` it into ``folder`` (with a
    processor config at ``size`` px unless None) and return the model, in eval mode."""
    from transformers import AutoModelForObjectDetection

    torch.manual_seed(seed)
    model = AutoModelForObjectDetection.from_config(tiny_config(family, classes)).eval()
    folder = Path(folder)
    model.save_pretrained(str(folder))
    if size is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor_config(family, size)))
    return model
