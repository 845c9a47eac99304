"""``MODEL.DETR.*``: every key of the DETR family, with the reason for its default.

The defaults describe DAB-DETR (single-scale, standard attention, learned anchor queries). The
switches turn it into Deformable DETR (``ATTENTION: "deformable"`` over several levels), add
encoder query selection (``TWO_STAGE``) and DINO's contrastive denoising (``DENOISING.ENABLED``).
"""

from detectron2.config import CfgNode as CN


def add_detr_config(cfg: CN) -> None:
    """Add ``MODEL.DETR.*`` to ``cfg`` in place; harmless when called twice.

    Args:
        cfg: a detectron2 config.
    """
    if "DETR" in cfg.MODEL:
        return
    cfg.MODEL.DETR = _C = CN()

    # Number of foreground classes; there is no "no object" logit (sigmoid focal classification).
    _C.NUM_CLASSES = 80
    # Backbone outputs fed to the transformer, finest first (DAB-DETR: ["res5"]; Deformable DETR
    # and DINO-4scale: ["res3", "res4", "res5"]).
    _C.IN_FEATURES = ["res5"]
    # Feature levels the transformer sees. Levels beyond len(IN_FEATURES) are made by stride-2
    # 3x3 convolutions on the last backbone output (Deformable DETR / DINO-4scale: 4).
    _C.NUM_FEATURE_LEVELS = 1
    # Transformer width D.
    _C.HIDDEN_DIM = 256
    # Attention heads in every attention block.
    _C.NHEADS = 8
    # Hidden width of the feed-forward blocks (DAB-DETR / DINO: 2048, Deformable DETR: 1024).
    _C.DIM_FEEDFORWARD = 2048
    # Dropout in the transformer (DAB-DETR / Deformable DETR: 0.1, DINO: 0.0).
    _C.DROPOUT = 0.1
    # Encoder layers; 0 feeds the projected backbone features straight to the decoder.
    _C.ENC_LAYERS = 6
    # Decoder layers; each one refines the boxes and gets its own (auxiliary) loss.
    _C.DEC_LAYERS = 6
    # Detection queries (DAB-DETR: 300, Deformable DETR: 300, DINO: 900). With TWO_STAGE this is
    # also the number of encoder proposals selected per image.
    _C.NUM_QUERIES = 300
    # "standard": multi-head attention over all tokens (DAB-DETR; meant for one level).
    # "deformable": multi-scale deformable attention (Deformable DETR, DINO).
    _C.ATTENTION = "standard"
    # Sampling points per head and level of deformable attention, in the encoder and decoder.
    _C.ENC_N_POINTS = 4
    _C.DEC_N_POINTS = 4
    # Temperature of the sine position embedding of the feature maps (DETR / Deformable DETR:
    # 10000; DINO: 20, which spreads the frequencies over the small range of normalised positions).
    _C.PE_TEMPERATURE = 10000
    # Encoder query selection (Deformable DETR two-stage, DINO's "mixed" query selection): the
    # top-NUM_QUERIES encoder proposals become the decoder's anchors; content queries stay learned.
    _C.TWO_STAGE = False

    # Contrastive denoising queries (DINO). Only in training; hidden from the matching queries.
    _C.DENOISING = CN()
    _C.DENOISING.ENABLED = False
    # Upper bound on the denoising queries (positive + negative) per image. The number of groups is
    # max(1, MAX_QUERIES // (2 * most GT boxes in an image)); DINO's dn_number=100 equals 200 here.
    _C.DENOISING.MAX_QUERIES = 200
    # Probability of a GT label being replaced is LABEL_NOISE_RATIO / 2, as in DINO's code.
    _C.DENOISING.LABEL_NOISE_RATIO = 0.5
    # Corner noise relative to half the box size: positives move by less than BOX_NOISE_SCALE,
    # negatives by between 1 and 2 times BOX_NOISE_SCALE (DINO: 1.0 in its 4-scale configs).
    _C.DENOISING.BOX_NOISE_SCALE = 1.0

    # Loss weights (Deformable DETR / DINO: focal class 2, L1 5, GIoU 2); the same for every
    # decoder layer, the encoder proposals and the denoising queries.
    _C.CLASS_WEIGHT = 2.0
    _C.BBOX_WEIGHT = 5.0
    _C.GIOU_WEIGHT = 2.0
    # Hungarian matching costs (the same values as the loss weights in all three papers).
    _C.COST_CLASS = 2.0
    _C.COST_BBOX = 5.0
    _C.COST_GIOU = 2.0
    # Sigmoid focal loss parameters (Lin et al.; used unchanged by the DETR family).
    _C.FOCAL_ALPHA = 0.25
    _C.FOCAL_GAMMA = 2.0
    # Images are padded to a multiple of this; 0 uses the largest stride of the feature levels, so
    # every level's valid region is a whole number of cells (padding cannot shift features).
    _C.SIZE_DIVISIBILITY = 0
