"""Every ``KD.*`` config key (and the few ``SOLVER.*`` keys the trainer adds), with its default
and, in a comment above it, what it means and where the default comes from."""

import logging

from detectron2.config import CfgNode as CN

from kd.modeling.detr.config import add_detr_config

logger = logging.getLogger(__name__)


def add_kd_config(cfg: CN) -> None:
    """Add the knowledge-distillation keys (and the DETR family's ``MODEL.DETR.*``) to ``cfg``.

    Args:
        cfg: a detectron2 config, modified in place. Calling it twice is harmless.
    """
    add_detr_config(cfg)
    _add_fcos_keys(cfg)
    _add_mobilenet_keys(cfg)
    _add_solver_keys(cfg)
    _add_dataloader_keys(cfg)
    if "KD" in cfg:
        return
    cfg.KD = CN()

    # ---------------------------------------------------------------- teacher
    cfg.KD.TEACHER = CN()
    # The teacher's own detectron2 config: a yacs YAML file, a LazyConfig (.py, or the .yaml that
    # LazyConfig.save writes; the teacher is instantiate(cfg.model)), or "zoo://<name>", a
    # detectron2 model-zoo config where detectron2 ships them (configs/coco/zoo/ holds this
    # project's configs of the zoo architectures its recipes use). See kd/teacher_config.py.
    cfg.KD.TEACHER.CONFIG_FILE = ""
    # Trained weights of the teacher (.pth / .pkl, a local path or a detectron2:// URL). Required:
    # a teacher without weights, or whose weights do not fit its architecture, is refused.
    # "hf://" teachers load theirs from their folder (leave empty, or name that folder).
    cfg.KD.TEACHER.WEIGHTS = ""
    # Overrides applied to the teacher's config: "KEY VALUE" pairs for a yacs config, e.g.
    # ["INPUT.FORMAT", "RGB"]; "key=value" strings for a LazyConfig, e.g.
    # ["model.roi_heads.num_classes=7"].
    cfg.KD.TEACHER.OPTS = []
    # The teacher's classes mapped to the student's (kd/class_map.py). []: by name (the teacher's
    # dataset thing_classes or Hugging Face id2label against the student's DATASETS.TRAIN[0]
    # thing_classes); the same names in the same order compare index by index, as before. Student
    # classes the teacher lacks are left out of every class term; teacher classes the student
    # lacks are dropped. "student=teacher" entries are aliases ("student=" leaves a class out);
    # ["index"]: index by index, whatever the names. Mapped classes (other names or order) are
    # compared by KDDETRDistiller and DETRToRCNNDistiller; the other distillers refuse them.
    cfg.KD.TEACHER.CLASS_MAP = []
    # Before the first step, measure the teacher's AP on DATASETS.TEST[0] as it is fed in this run
    # (this run's test images, in the teacher's channel order), log it as teacher/bbox/* at
    # iteration 0 and cache it in OUTPUT_DIR/teacher_eval.json (per weights file, config and
    # dataset, so a resumed run does not measure again). Skipped when DATASETS.TEST is empty.
    cfg.KD.TEACHER.EVALUATE = True
    # Stop the run when that AP (COCO box AP, 0-100) is below this. A randomly initialised
    # detector scores about 0; below 1 AP the teacher is broken (other data or classes, BGR/RGB
    # or pixel-statistics mix-up, no training), not weak. 0: nothing is refused for its AP.
    cfg.KD.TEACHER.MIN_AP = 1.0
    # A teacher fed another input size than its own (GID feeds it the student's images) may
    # answer much worse there. When the run's test size (INPUT.MIN/MAX_SIZE_TEST) differs from
    # the teacher's own (its yacs config's), the teacher is also evaluated at its own size
    # (cached alike, logged as teacher/own_input/bbox/*), and a warning names the gap when the
    # AP at the run's input is more than this many AP points below. 0: no second evaluation.
    cfg.KD.TEACHER.INPUT_AP_GAP = 5.0
    # Checkpoints hold the sha256 of the teacher weights file; --resume with another file stops
    # (the student would continue with another teacher without a word). True: continue anyway.
    cfg.KD.TEACHER.ALLOW_CHANGE = False
    # The precision the teacher runs in: "float32", "bfloat16" or "float16". Below float32 every
    # call of the teacher (or of one of its modules) runs under autocast of that type, its weights
    # stay float32, and what the call returns is cast back to float32: the distillers and their
    # losses see float32 answers. bfloat16 runs on CPUs and on Ampere or newer GPUs, float16 on
    # GPUs. Under SOLVER.AMP the teacher still runs in this precision, not the student's.
    cfg.KD.TEACHER.DTYPE = "float32"

    # ---------------------------------------------------------------- student
    cfg.KD.STUDENT = CN()
    # The student's own meta-architecture; MODEL.* describes it. An exported student is a plain
    # model of this architecture.
    cfg.KD.STUDENT.META_ARCHITECTURE = "GeneralizedRCNN"
    # Low-resolution student (Chen et al. 2017, Table 2): the student sees its input resized by
    # this factor while the teacher keeps full size; points are mapped between the two.
    cfg.KD.STUDENT.INPUT_SCALE = 1.0

    # ---------------------------------------------------------------- schedule of the KD terms
    # A factor on every loss_kd_* term (on top of each method's weights; the student's own losses
    # untouched), a function of the iteration alone, so resume-exact (kd/schedule.py). [open: no
    # paper schedules its terms] The defaults give 1 at every iteration.
    _s = cfg.KD.LOSS_SCHEDULE = CN()
    # Iterations over which the factor rises linearly from 0 (iteration 0) to 1; 0: no warm-up.
    _s.WARMUP_ITERS = 0
    # The iteration from which the KD terms stop or decay; 0: never.
    _s.END_ITER = 0
    # From END_ITER: "stop" (factor 0), or "linear" / "cosine" decay to 0 at SOLVER.MAX_ITER.
    _s.AFTER_END = "stop"

    # ---------------------------------------------------------------- Chen et al. 2017
    # Losses named loss_kd_chen2017_<term>. Defaults are the paper's (METHODS.md section 1).
    _c = cfg.KD.CHEN2017 = CN()
    # mu: L_cls = mu * L_hard + (1 - mu) * L_soft; the student's own CE losses are scaled by mu
    # when a soft term is on. [open] in the paper; 0.5 a neutral start.
    _c.HARD_WEIGHT = 0.5
    # T of the softened softmax; T = 1 worked best for detection in the paper.
    _c.TEMPERATURE = 1.0
    # w_c for the background class in the soft cross entropy (every other class 1).
    _c.BACKGROUND_WEIGHT = 1.5
    # nu: weight of the teacher-bounded regression term.
    _c.BOUND_WEIGHT = 0.5
    # m: margin of the bound; [open] in the paper, 0 by default.
    _c.BOUND_MARGIN = 0.0
    # Soft objectness CE on the RPN's sampled anchors (needs the same anchor layout as the teacher).
    _c.RPN_SOFT_CLS = True
    # Teacher-bounded regression on the RPN's sampled positive anchors.
    _c.RPN_BOUNDED_REG = True
    # Soft CE on the ROI head's sampled proposals, the teacher's box head run on the same boxes.
    _c.RCN_SOFT_CLS = True
    # Teacher-bounded regression on the ROI head's sampled foreground proposals.
    _c.RCN_BOUNDED_REG = True
    _c.HINT = CN()
    # Hint learning with a 1x1 adaptation layer per feature.
    _c.HINT.ENABLED = True
    # gamma: weight of the hint loss.
    _c.HINT.WEIGHT = 0.5
    # Which features are hinted (names of the backbone's outputs, present in both models). The
    # paper uses the end of the backbone; for FPN models every FPN level is the natural choice.
    _c.HINT.FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # The teacher's feature each of FEATURES is compared with, in order [open: the paper hints
    # one layer]; empty = the same names. A student at KD.STUDENT.INPUT_SCALE 0.5 may pair its p_l
    # with the teacher's p_(l+1): maps of equal size, on which each object covers the same cells.
    _c.HINT.TEACHER_FEATURES = []
    # "l2" (the paper's main choice) or "l1".
    _c.HINT.NORM = "l2"

    _add_gid_keys(cfg)
    _add_kd_detr_keys(cfg)
    _add_hetero_keys(cfg)


def _add_dataloader_keys(cfg: CN) -> None:
    """``DATALOADER.*`` keys of the dataset check before a run (:mod:`kd.data.validation`)."""
    if "ON_BAD_ANNOTATIONS" not in cfg.DATALOADER:
        # What to do with a missing or empty image file, a box of zero or negative size, a box
        # beyond its image by more than BOX_TOLERANCE, or an invalid category, all found before
        # the first step: "stop" (default) ends the run naming them; "skip" trains without those
        # boxes and images, counted and logged. Evaluation always stops on a missing image.
        cfg.DATALOADER.ON_BAD_ANNOTATIONS = "stop"
    if "BOX_TOLERANCE" not in cfg.DATALOADER:
        # How far (pixels) a box may reach beyond its image's border and still count as good
        # (detectron2 clips it to the image). Default 2.0: rounding and 1-based coordinates.
        cfg.DATALOADER.BOX_TOLERANCE = 2.0


def _add_solver_keys(cfg: CN) -> None:
    if "OPTIMIZER" not in cfg.SOLVER:
        # "SGD" (detectron2's default) or "ADAMW" (DETR family).
        cfg.SOLVER.OPTIMIZER = "SGD"
    if "BACKBONE_MULTIPLIER" not in cfg.SOLVER:
        # LR multiplier for parameters under "backbone." (DETR family trains it at 0.1x).
        cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    if "DTYPE" not in cfg.SOLVER.AMP:
        # The precision of the student's autocast when SOLVER.AMP.ENABLED: "float16"
        # (detectron2's, with a gradient scaler; CUDA only) or "bfloat16" (no scaler; CUDA on
        # Ampere or newer, or the CPU).
        cfg.SOLVER.AMP.DTYPE = "float16"


def _add_mobilenet_keys(cfg: CN) -> None:
    """``MODEL.MOBILENET.*``: torchvision's MobileNetV2 as a detectron2 backbone
    (:mod:`kd.modeling.mobilenet`; ``MODEL.BACKBONE.NAME`` ``build_mobilenetv2_fpn_backbone``,
    ``build_mobilenetv2_retinanet_fpn_backbone`` or ``build_mobilenetv2_backbone``).
    ``MODEL.BACKBONE.FREEZE_AT`` counts its stages stem, m2, .., m5 as ResNet's.
    """
    if "MOBILENET" in cfg.MODEL:
        return
    _m = cfg.MODEL.MOBILENET = CN()
    # ImageNet initialisation: a torchvision MobileNet_V2_Weights entry, "IMAGENET1K_V1", whose
    # file (mobilenet_v2-b0353104.pth) must be in torchvision's cache, $TORCH_HOME/hub/checkpoints
    # (`make setup` puts it there: tools/install_imagenet_weights.py); its sha256 is checked and a
    # missing or different file stops the build. The weights expect INPUT.FORMAT "RGB" and
    # MODEL.PIXEL_MEAN [123.675, 116.28, 103.53] / PIXEL_STD [58.395, 57.12, 57.375], which the
    # builder checks. "" = random initialisation (e.g. to evaluate a trained checkpoint, whose
    # weights replace these anyway, on a machine without the file).
    _m.IMAGENET_WEIGHTS = "IMAGENET1K_V1"
    # Outputs of build_mobilenetv2_backbone (the FPN builders use MODEL.FPN.IN_FEATURES): "stem"
    # (stride 2), "m2" (4), "m3" (8), "m4" (16), "m5" (32).
    _m.OUT_FEATURES = ["m3", "m4", "m5"]
    # "FrozenBN": every BatchNorm frozen (detectron2's FrozenBatchNorm2d), as detectron2 fine-tunes
    # ImageNet backbones with small per-GPU batches; "BN": torchvision's BatchNorm, trained.
    _m.NORM = "FrozenBN"


def _add_gid_keys(cfg: CN) -> None:
    """``KD.GID.*``: General Instance Distillation (Dai et al., CVPR 2021; METHODS.md section 2).

    Tags: [paper] the paper, [code] the authors' released code, [open] our choice.
    """
    # Losses named loss_kd_gid_{feature, relation, response_cls, response_reg}. A weight of 0
    # switches its term off (no entry in the loss dict, and the teacher computes nothing for it).
    _g = cfg.KD.GID = CN()

    # ---- general instance selection (GISM), per image, every iteration, without gradients
    # K: instances kept per image after NMS [paper]; the paper finds K = 10..100 flat.
    _g.TOP_K = 10
    # IoU threshold of the NMS over the GI boxes, ranked by GI score [paper].
    _g.NMS_THRESH = 0.3
    # "max_abs_diff": max_c |P_t - P_s| [paper]; "max_score_diff": |max_c P_t - max_c P_s|, the
    # authors' reproduction [code].
    _g.SCORE_MODE = "max_abs_diff"
    # Candidates whose GI score is below this are dropped before NMS. [open]; 0 = all, as in the
    # paper.
    _g.SCORE_THRESH = 0.0
    # Keep only this many best-scoring candidates per image before NMS [open]; 0 = all, as the
    # paper states it. Not needed for speed: the selection runs only the K steps of greedy NMS
    # that decide the first K survivors (kd.points.gism.greedy_nms_first_k), O(K x R) per image.
    _g.PRE_NMS_TOPK = 0
    # FCOS only: the dense score compared by GISM. "cls": sigmoid class probabilities [paper:
    # "class scores"]; "cls_ctr": sqrt(sigmoid(cls) * sigmoid(centerness)), FCOS's own detection
    # score at inference. [open]
    _g.FCOS_SCORE = "cls"

    # ---- feature distillation: ROIAlign of each GI box on its FPN level, 1x1 adapter, L2
    # lambda_1 [code: 5e-3, or 5e-4]. The loss sums the squared error over C x h x w of each
    # instance and averages over the instances of the batch.
    _g.FEATURE_WEIGHT = 5e-3
    # FPN features the GI boxes are pooled from (present in both models). Empty = the detector's
    # own choice: the head's features (RetinaNet, FCOS) or the ROI heads' (Faster R-CNN). [open]
    _g.IN_FEATURES = []
    # Output size of the ROIAlign [code: 10].
    _g.POOLER_RESOLUTION = 10
    # detectron2 pooler type and sampling ratio (0 = adaptive). [open]
    _g.POOLER_TYPE = "ROIAlignV2"
    _g.POOLER_SAMPLING_RATIO = 0
    # FPN level assignment, detectron2's rule (FPN paper eq. 1): a box of sqrt(area) =
    # CANONICAL_BOX_SIZE goes to level CANONICAL_LEVEL, clamped to IN_FEATURES' levels. The
    # defaults are detectron2's (224, 4); scale the size with the image size (kd_shapes: 56).
    _g.CANONICAL_BOX_SIZE = 224
    _g.CANONICAL_LEVEL = 4
    # The 1x1 adapter student -> teacher channels, applied to the pooled instance features (it
    # commutes with ROIAlign's bilinear averaging, so this equals adapting the whole maps at a
    # fraction of the cost). "shared": one adapter for every level, trained by every instance;
    # "per_level": one per FPN level. [open]
    _g.ADAPTER = "shared"

    # ---- relation distillation, per image, on the pooled features (teacher, adapted student)
    # lambda_2 [code: 40].
    _g.RELATION_WEIGHT = 40.0
    # Images with fewer GIs are skipped [paper: 3].
    _g.RELATION_MIN_INSTANCES = 3

    # ---- response distillation: the detector's own label assignment applied to the GI boxes
    # lambda_3 for the classification part: BCE of the student's logits against the teacher's
    # sigmoid scores, normalised by the mask size [code: 0.1].
    _g.RESPONSE_CLS_WEIGHT = 0.1
    # lambda_3 for the regression part: L1 on the box deltas, normalised by the mask size
    # [code: 0.1, or 1.0].
    _g.RESPONSE_REG_WEIGHT = 0.1
    # FCOS only: which locations a GI box masks. "inside": the location's centre lies inside the
    # box [paper]; "fcos": FCOS's own assignment (centre sampling radius and scale ranges). [open]
    _g.FCOS_ASSIGNMENT = "inside"
    # FCOS only: also distil the centerness logit (BCE against the teacher's sigmoid), as one
    # more column of the classification part. [open]
    _g.FCOS_CENTERNESS = True


def _add_kd_detr_keys(cfg: CN) -> None:
    """``KD.KD_DETR.*``: KD-DETR (Wang et al., CVPR 2024; METHODS.md section 3).

    Tags: [paper] the paper, [code] the authors' released code, [open] our choice.
    """
    # Losses named loss_kd_kd_detr_{cls, l1, giou}: each summed over the point sets and the
    # distilled student layers.
    _k = cfg.KD.KD_DETR = CN()

    # ---- general sampling: random boxes, redrawn every iteration, the same for both models
    # M_g, random boxes per image [code: 300, which beats 10 and 900 in the paper]. 0 switches
    # general sampling off (ablation "specific only").
    _k.NUM_GENERAL_POINTS = 300
    # How each (cx, cy, w, h) is drawn: "uniform" in (0, 1) [paper] or "sigmoid_normal", the
    # sigmoid of a standard normal [code]. Drawn per image from the global torch RNG, which the
    # trainer checkpoints, so a resumed run draws the same points.
    _k.GENERAL_DISTRIBUTION = "uniform"

    # ---- specific sampling: the teacher's own query anchors (learned anchors, or for two-stage
    # teachers its per-image selected encoder proposals [open])
    # False switches specific sampling off (ablation "general only").
    _k.SPECIFIC_POINTS = True
    # Content query the teacher decodes its anchors with (the student always uses zeros, since
    # its own content queries do not correspond to the teacher's). "zeros": both models answer
    # the identical query, as in the paper's DAB-DETR, whose content queries are zeros [paper];
    # "learned": the teacher's own learned content, i.e. its detection answers. [open]
    # (Spelled as KD.HETERO.DETR_CONTENT's "zeros".)
    _k.SPECIFIC_TEACHER_CONTENT = "zeros"

    # ---- the loss at every point: w_i [cls * KL(c_t || c_s) + l1 * L1 + giou * (1 - GIoU)]
    # w_i = the teacher's top sigmoid class probability at the point [paper]; False: w_i = 1
    # (ablation "without foreground weight").
    _k.FOREGROUND_WEIGHT = True
    # T of the KL (softmax of both models' logits at T, times T^2) [code: 10].
    _k.TEMPERATURE = 10.0
    # lambda_cls, lambda_L1, lambda_GIoU [code: 1, 5, 2].
    _k.CLS_WEIGHT = 1.0
    _k.L1_WEIGHT = 5.0
    _k.GIOU_WEIGHT = 2.0
    # Divisor of each point set's sum: "weight_sum" (sum of w_i: a weighted mean, as the authors'
    # box terms [code]) or "num_queries" (B * M). Most points are background with w_i ~ 0.03, so
    # "num_queries" makes the loss ~30x smaller; on kd_shapes it did not help the student
    # (docs/methods.md, KD-DETR), "weight_sum" did. [measured]
    _k.NORMALIZE = "weight_sum"
    # Student decoder layers distilled, as indices (negative from the end); each is compared
    # with the teacher's TEACHER_LAYER. Empty: every student layer [code].
    _k.STUDENT_LAYERS = []
    # The teacher decoder layer whose answers are the targets [code: the final one, -1].
    _k.TEACHER_LAYER = -1


def _add_hetero_keys(cfg: CN) -> None:
    """``KD.HETERO.*``: heterogeneous distillation through shared box points (DETR <-> Faster
    R-CNN; ``kd.meta_arch.hetero``, ``kd.probes``, ``kd.losses.class_space``).

    Tags: [paper] KD-DETR's paper, [code] its released code, [open] our choice, [measured] chosen
    from the measurement in docs/methods.md "Heterogeneous distillation".
    """
    # Losses named loss_kd_hetero_{cls, l1, giou}: the KD-DETR loss at the shared points, after
    # mapping the teacher's classes into the student's space. A weight of 0 removes its term.
    _h = cfg.KD.HETERO = CN()
    # sigmoid -> softmax (a DETR's K sigmoids as a (K + 1)-way softmax for an R-CNN student): the
    # background probability. "max": 1 - max_k p_k, so the foreground mass is the DETR's own
    # detection score; "prod": prod_k (1 - p_k), where small per-class leaks add up. [open]
    # The other way is exact: p_k = softmax_k, background dropped.
    _h.BACKGROUND = "max"
    # Content query of the points a DETR decodes (teacher or student). "zeros": the box alone asks,
    # read through the anchor-to-query encoding as the positional query of every layer, as
    # KD-DETR decodes anchors [paper]; "anchor": that encoding is the content too. [measured:
    # "zeros" gives the DETR teacher's better boxes and class accuracy at jittered GT boxes]
    _h.DETR_CONTENT = "zeros"
    # Random boxes: each of (cx, cy, w, h) "sigmoid_normal" [code] or "uniform" [paper].
    _h.RANDOM_BOXES = "sigmoid_normal"
    # w_i = the teacher's top class probability at the point (in the student's class space)
    # [paper]; False: w_i = 1.
    _h.FOREGROUND_WEIGHT = True
    # lambda_cls, lambda_L1, lambda_GIoU [code: 1, 5, 2]; L1 and GIoU on boxes normalised to [0, 1].
    _h.CLS_WEIGHT = 1.0
    _h.L1_WEIGHT = 5.0
    _h.GIOU_WEIGHT = 2.0

    # ---- DETR teacher -> Faster R-CNN student (DETRToRCNNDistiller)
    _r = _h.RCNN_STUDENT = CN()
    # Distil at the student's sampled ROI proposals (the boxes its box-head losses use; its box
    # head output there is its answer, at no extra cost).
    _r.PROPOSAL_POINTS = True
    # Extra random boxes per image, answered by both (the student's box head runs on them too).
    # [open]: 0, the proposals already cover objects and background.
    _r.NUM_RANDOM_POINTS = 0
    # T of the KL. Chen et al. found T = 1 best for softmax detectors' box heads [open: 1].
    _r.TEMPERATURE = 1.0
    # "foreground": KD-DETR's KL over the K object classes only (the student's softmax without
    # its background logit against the teacher's K logits), the background left to the student's
    # own loss; "full": the teacher's mapped (K + 1)-way distribution (BACKGROUND) against the
    # student's whole softmax. [measured: on kd_shapes "full" lost 1.3 AP against the baseline,
    # "foreground" gained 2.1: the focal-loss DETR's sigmoids are low even on objects (~0.14 at
    # jittered ground truth), so its mapped distribution calls objects mostly background]
    _r.CLASS_TARGET = "foreground"
    # Divisor of the sums over points: "num_queries" (every point counts 1) or "weight_sum" (a
    # mean weighted by w_i). The focal-loss DETR teacher's sigmoids are low even on objects, so
    # with "num_queries" the terms would nearly vanish. [open: "weight_sum"]
    _r.NORMALIZE = "weight_sum"
    # How the DETR teacher decodes the points: "group": all points of an image in one isolated
    # group (KD-DETR's queries); "point": each point alone. [measured: "group" gives the teacher's
    # better class accuracy]
    _r.DETR_ISOLATION = "group"

    # ---- Faster R-CNN teacher -> DETR student (RCNNToDETRDistiller)
    _d = _h.DETR_STUDENT = CN()
    # Random boxes per image, redrawn every iteration (KD-DETR's general points) [code: 300 for
    # 300 queries; kd_shapes' students have 50 queries, so 100]. 0 switches them off.
    _d.NUM_RANDOM_POINTS = 100
    # The student's own detection anchors as points (its selected proposals for two-stage
    # models), standing in for KD-DETR's specific points, which need a DETR teacher. [open]
    _d.ANCHOR_POINTS = True
    # T of the KL (softmax over the K logits at T, times T^2) [code: 10].
    _d.TEMPERATURE = 10.0
    # As RCNN_STUDENT.NORMALIZE; each point set is averaged over its points [code].
    _d.NORMALIZE = "num_queries"
    # How the student decodes its distillation points. "point": each alone, since the R-CNN
    # teacher answers every box independently (high scores on overlapping boxes alike), which
    # would otherwise teach the student's self-attention to stop suppressing duplicates. [open]
    _d.DETR_ISOLATION = "point"
    # Distil every student decoder layer against the teacher's answer [code]; False: the last.
    _d.ALL_LAYERS = True


def _add_fcos_keys(cfg: CN) -> None:
    """``MODEL.FCOS.*``: detectron2's FCOS (:class:`kd.modeling.fcos.FCOS`) in a yacs config.

    Defaults are detectron2's FCOS (its lazy config ``fcos_R_50_FPN_1x.py``).
    """
    if "FCOS" in cfg.MODEL:
        return
    _f = cfg.MODEL.FCOS = CN()
    # Number of object classes (no background class: sigmoid focal loss).
    _f.NUM_CLASSES = 80
    # Backbone features the head runs on, from the highest resolution to the lowest.
    _f.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convolutions in each of the head's two towers.
    _f.NUM_CONVS = 4
    # Normalisation in the towers: "GN" (FCOS's), "BN" (per-level statistics), or "" (none).
    _f.HEAD_NORM = "GN"
    # Prior probability of the class logits at initialisation.
    _f.PRIOR_PROB = 0.01
    # Initial bias of the box regression outputs (distances to the box edges, in strides).
    # detectron2 starts at 0; its Box2BoxTransformLinear clamps the deltas with a ReLU, so a head
    # that overshoots below 0 early gets no regression gradient again (seen when training from
    # scratch). A positive start (e.g. 1.0) keeps it away from that edge.
    _f.BBOX_REG_BIAS_INIT = 0.0
    # Focal loss parameters.
    _f.FOCAL_LOSS_ALPHA = 0.25
    _f.FOCAL_LOSS_GAMMA = 2.0
    # A location is positive only within this many strides of a ground-truth box's centre.
    _f.CENTER_SAMPLING_RADIUS = 1.5
    # Inference: score threshold (on sqrt(cls * centerness)), candidates per level before NMS,
    # and the NMS IoU threshold. Detections per image: TEST.DETECTIONS_PER_IMAGE.
    _f.TEST_SCORE_THRESH = 0.2
    _f.TOPK_CANDIDATES_TEST = 1000
    _f.NMS_THRESH_TEST = 0.6
