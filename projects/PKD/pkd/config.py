"""yacs config keys of Detectron2-PKD (``MODEL.DISTILL.*``, ``MODEL.FCOS.*``, ``MODEL.SWIN.*``) and
the config node that resolves a teacher config path relative to the file that names it."""
import os

from detectron2.config import CfgNode as _D2CfgNode
from detectron2.config import get_cfg

from .modeling.swin import add_swin_config

__all__ = ["add_distill_config", "add_fcos_config", "get_distill_cfg", "DistillCfgNode"]


def add_distill_config(cfg: _D2CfgNode) -> None:
    """Adds the ``MODEL.DISTILL`` keys (METHODS.md defaults) to a Detectron2 config, in place."""
    _C = cfg
    _C.MODEL.DISTILL = _D2CfgNode()
    # Meta-architecture of the student, built from this same config (its _BASE_ applies as usual).
    _C.MODEL.DISTILL.STUDENT_ARCH = "RetinaNet"
    # Which losses to apply (names in pkd.losses.DISTILL_LOSS_REGISTRY), e.g. ["PKD"], ["RM", "PFI"].
    _C.MODEL.DISTILL.LOSSES = ["PKD"]
    # [[student_level, teacher_level], ...]; empty: pair the first NUM_LEVELS levels by index.
    _C.MODEL.DISTILL.FEATURE_PAIRS = []
    # With pairing by index: how many leading (finest) levels of each FPN to pair.
    _C.MODEL.DISTILL.NUM_LEVELS = 4
    # Initialise the student's FPN and head from the teacher checkpoint where names/shapes match.
    _C.MODEL.DISTILL.INHERIT = False
    # Distillation weight schedule (pkd.kd_schedule): every KD term ramps linearly from 0 over the
    # first WARMUP_ITERS iterations (0: no warm-up); from iteration STOP_ITER on distillation is
    # off and the teacher does not run (0: never stops). Logged as kd/weight_scale.
    _C.MODEL.DISTILL.WARMUP_ITERS = 0
    _C.MODEL.DISTILL.STOP_ITER = 0
    # Before the first iteration, stop when the teacher detects nothing on a few training images
    # (skipped for TEACHER.WEIGHTS "random").
    _C.MODEL.DISTILL.CHECK_TEACHER = True

    _C.MODEL.DISTILL.TEACHER = _D2CfgNode()
    # Teacher config: .yaml or LazyConfig .py; relative paths resolve against the config file that
    # names them (like _BASE_), then the working directory; model-zoo names are accepted too.
    _C.MODEL.DISTILL.TEACHER.CONFIG = ""
    # Teacher checkpoint (a path or URL). "random" keeps random weights: for tests only.
    _C.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides for the teacher config: ["KEY", "VALUE", ...] (yacs) or ["key=value", ...].
    _C.MODEL.DISTILL.TEACHER.OPTS = []

    # PKD: Pearson correlation feature imitation.
    _C.MODEL.DISTILL.PKD = _D2CfgNode()
    # Loss weight (6 for R-CNN students and Swin->RetinaNet, 10 for other one-stage pairs).
    _C.MODEL.DISTILL.PKD.WEIGHT = 6.0
    # On a spatial-size mismatch: True resizes the student to the teacher, False the reverse.
    _C.MODEL.DISTILL.PKD.RESIZE_STUDENT = True

    # MSE: plain feature imitation, mean((S - T)^2) per level (1x1 adapter if channels differ).
    _C.MODEL.DISTILL.MSE = _D2CfgNode()
    _C.MODEL.DISTILL.MSE.WEIGHT = 1.0
    _C.MODEL.DISTILL.MSE.RESIZE_STUDENT = True

    # FGD: focal (fg/bg, attention) and global distillation. Defaults: the RetinaNet recipe;
    # R-CNN students 0.5, 5e-5, 2.5e-5, 5e-5, 5e-7; FCOS 0.8, 1.6e-3, 8e-4, 8e-4, 8e-6.
    _C.MODEL.DISTILL.FGD = _D2CfgNode()
    _C.MODEL.DISTILL.FGD.TEMPERATURE = 0.5
    _C.MODEL.DISTILL.FGD.ALPHA = 1e-3  # foreground term
    _C.MODEL.DISTILL.FGD.BETA = 5e-4  # background term
    _C.MODEL.DISTILL.FGD.GAMMA = 5e-4  # attention term
    _C.MODEL.DISTILL.FGD.LAMBDA = 5e-6  # global (context block) term

    # PGD: prediction-guided distillation (dense students and teachers).
    _C.MODEL.DISTILL.PGD = _D2CfgNode()
    _C.MODEL.DISTILL.PGD.TEMPERATURE = 0.8
    _C.MODEL.DISTILL.PGD.ALPHA = 0.04  # fg term (0.08 for ATSS-style assignment)
    _C.MODEL.DISTILL.PGD.BETA = 0.02  # bg term, 0.5 * ALPHA
    _C.MODEL.DISTILL.PGD.GAMMA = 0.064  # regression term, 1.6 * ALPHA
    _C.MODEL.DISTILL.PGD.DELTA = 8e-4  # attention terms
    # Key predictive locations per GT over all levels (30 for FCOS/GFL, 9 for ATSS-style).
    _C.MODEL.DISTILL.PGD.TOPK = 30
    # Quality exponent alpha in sigmoid(score)^(1-alpha) * IoU^alpha, for the cls / reg maps.
    _C.MODEL.DISTILL.PGD.QUALITY_ALPHA_CLS = 0.8
    _C.MODEL.DISTILL.PGD.QUALITY_ALPHA_REG = 0.6
    # Per-level weights of the classification-side loss, finest level first.
    _C.MODEL.DISTILL.PGD.LEVEL_WEIGHTS = [1.0, 1.25, 1.5, 1.75, 2.0]

    # RM: rank mimicking (KL between softmaxed scores over each GT's positive anchors).
    _C.MODEL.DISTILL.RM = _D2CfgNode()
    _C.MODEL.DISTILL.RM.WEIGHT = 4.0
    _C.MODEL.DISTILL.RM.TEMPERATURE = 1.0

    # PFI: prediction-guided feature imitation (feature MSE weighted by prediction disagreement).
    _C.MODEL.DISTILL.PFI = _D2CfgNode()
    _C.MODEL.DISTILL.PFI.WEIGHT = 1.5


def add_fcos_config(cfg: _D2CfgNode) -> None:
    """Adds ``MODEL.FCOS`` keys so that FCOS (LazyConfig-only in Detectron2) builds from yacs."""
    _C = cfg
    _C.MODEL.FCOS = _D2CfgNode()
    _C.MODEL.FCOS.NUM_CLASSES = 80
    # Backbone levels fed to the head, finest first.
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    _C.MODEL.FCOS.NUM_CONVS = 4
    # Norm of the head towers ("GN" as in the paper; "" for none).
    _C.MODEL.FCOS.HEAD_NORM = "GN"
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6


_TEACHER_CONFIG_KEYS = ("MODEL", "DISTILL", "TEACHER", "CONFIG")


class DistillCfgNode(_D2CfgNode):
    """Detectron2's CfgNode, plus: a relative ``MODEL.DISTILL.TEACHER.CONFIG`` is resolved against
    the directory of the yaml file that sets it, the way ``_BASE_`` is."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        loaded = super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)
        node = loaded
        for key in _TEACHER_CONFIG_KEYS[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            value = node.get(_TEACHER_CONFIG_KEYS[-1])
            # Bases were resolved (made absolute) when they were loaded, so a relative path left
            # here was written in this very file.
            if value and not os.path.isabs(value) and "://" not in value:
                candidate = os.path.join(os.path.dirname(filename), value)
                if os.path.exists(candidate):
                    node[_TEACHER_CONFIG_KEYS[-1]] = os.path.abspath(candidate)
        return loaded


def get_distill_cfg() -> DistillCfgNode:
    """Detectron2's default config with the distillation, FCOS and Swin keys added."""
    cfg = get_cfg()
    add_distill_config(cfg)
    add_fcos_config(cfg)
    add_swin_config(cfg)
    return DistillCfgNode(cfg)
