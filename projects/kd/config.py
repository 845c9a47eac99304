"""Every ``KD.*`` config key (and the few ``SOLVER.*`` keys the trainer adds), with its default.

A KD config is a student config (``MODEL.*`` describes the student) whose
``MODEL.META_ARCHITECTURE`` names a distiller; the student's own meta-architecture moves to
``KD.STUDENT.META_ARCHITECTURE`` and the teacher comes from its own config file and weights.
"""
from detectron2.config import CfgNode as CN


def add_kd_config(cfg: CN) -> None:
    """Add the knowledge-distillation keys (and the DETR family's ``MODEL.DETR.*``) to ``cfg``.

    Args:
        cfg: a detectron2 config, modified in place. Calling it twice is harmless.
    """
    from kd.modeling.detr.config import add_detr_config

    add_detr_config(cfg)
    _add_solver_keys(cfg)
    if "KD" in cfg:
        return
    cfg.KD = CN()

    # ---------------------------------------------------------------- teacher
    cfg.KD.TEACHER = CN()
    # The teacher's own detectron2 config (any model the student could be: it is built with it).
    cfg.KD.TEACHER.CONFIG_FILE = ""
    # Trained weights of the teacher (.pth / .pkl). Required: a teacher without weights is refused.
    cfg.KD.TEACHER.WEIGHTS = ""
    # Extra "KEY VALUE" overrides applied to the teacher's config, e.g. ["MODEL.DEVICE", "cpu"].
    cfg.KD.TEACHER.OPTS = []

    # ---------------------------------------------------------------- student
    cfg.KD.STUDENT = CN()
    # The student's own meta-architecture; MODEL.* describes it. An exported student is a plain
    # model of this architecture.
    cfg.KD.STUDENT.META_ARCHITECTURE = "GeneralizedRCNN"
    # Low-resolution student (Chen et al. 2017, Table 2): the student sees its input resized by
    # this factor while the teacher keeps full size; points are mapped between the two.
    cfg.KD.STUDENT.INPUT_SCALE = 1.0

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
    # "l2" (the paper's main choice) or "l1".
    _c.HINT.NORM = "l2"


def _add_solver_keys(cfg: CN) -> None:
    if "OPTIMIZER" not in cfg.SOLVER:
        # "SGD" (detectron2's default) or "ADAMW" (DETR family).
        cfg.SOLVER.OPTIMIZER = "SGD"
    if "BACKBONE_MULTIPLIER" not in cfg.SOLVER:
        # LR multiplier for parameters under "backbone." (DETR family trains it at 0.1x).
        cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
