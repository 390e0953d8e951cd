"""yacs config keys of Detectron2-PKD (``MODEL.DISTILL.*``, ``MODEL.FCOS.*``, ``MODEL.SWIN.*``,
``MODEL.TORCHVISION.*``).

A user's own script loads any of the project's configs the way every Detectron2 project does::

    cfg = get_cfg()
    add_distill_config(cfg)  # every key group of the project, not only MODEL.DISTILL
    cfg.merge_from_file("configs/PKD-FCOS-R50.yaml")
    model = build_model(cfg)

which is exactly what ``tools/train_net.py`` does (:func:`get_distill_cfg`). Nothing in a config is
rewritten while it is loaded: ``MODEL.DISTILL.TEACHER.CONFIG`` names the teacher's config and is
resolved when the teacher is built (:func:`pkd.teacher.resolve_teacher_config`); the shipped
configs name it relative to the project's ``configs/`` directory (:data:`PROJECT_CONFIGS`), as
Detectron2 names its model-zoo configs relative to the zoo.
"""
import inspect
import os
from typing import Callable, Tuple

from detectron2.config import CfgNode as _D2CfgNode
from detectron2.config import get_cfg

from .losses import MSELoss, MultiLevelFGDLoss, PFILoss, PGDLoss, PKDLoss, RankMimicLoss
from .modeling.swin import add_swin_config
from .modeling.torchvision_backbone import add_torchvision_config

__all__ = ["add_distill_config", "add_fcos_config", "get_distill_cfg", "PROJECT_CONFIGS"]

# The project's configs/ directory (this package is installed from a checkout: pip install -e .).
PROJECT_CONFIGS = os.path.abspath(
    os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir, "configs")
)


def _default(loss_class, argument: str):
    """The default of ``argument`` in ``loss_class.__init__``. Each loss class holds its method's
    defaults (the papers'); its ``MODEL.DISTILL.<NAME>.*`` keys take them from there."""
    value = inspect.signature(loss_class.__init__).parameters[argument].default
    return list(value) if isinstance(value, tuple) else value


def add_distill_config(cfg: _D2CfgNode) -> None:
    """Adds every config key of Detectron2-PKD to a Detectron2 config, in place: ``MODEL.DISTILL``
    and the keys of the models the project makes buildable from yacs (``MODEL.FCOS``,
    ``MODEL.SWIN``; see :data:`CONFIG_GROUPS`).

    Keys ``cfg`` already has keep their values, so calling it twice (or on a config that has some
    of the keys) changes nothing that was set.
    """
    defaults = type(cfg)({"MODEL": type(cfg)()})
    for add_group in CONFIG_GROUPS:
        add_group(defaults)
    _add_missing(cfg, defaults)


def _add_missing(cfg: _D2CfgNode, defaults: _D2CfgNode) -> None:
    for key, value in defaults.items():
        if key not in cfg:
            setattr(cfg, key, value)
        elif isinstance(value, dict) and isinstance(cfg[key], dict):  # CfgNodes are dicts
            _add_missing(cfg[key], value)


def _add_distill_keys(cfg: _D2CfgNode) -> None:
    """``MODEL.DISTILL.*``; each loss's defaults are its class's own (the papers')."""
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
    # Teacher config (.yaml or LazyConfig .py), resolved when the teacher is built: an absolute
    # path; a path relative to the working directory or to the project's configs/ directory (the
    # shipped configs write e.g. "teachers/MaskRCNN-SwinS-FPN-3x.yaml"); or a Detectron2
    # model-zoo name. A relative path found in both directories is an error (ambiguous).
    _C.MODEL.DISTILL.TEACHER.CONFIG = ""
    # Teacher checkpoint (a path or URL). "random" keeps random weights: for tests only.
    _C.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides for the teacher config: ["KEY", "VALUE", ...] (yacs) or ["key=value", ...].
    _C.MODEL.DISTILL.TEACHER.OPTS = []

    # PKD: Pearson correlation feature imitation.
    _C.MODEL.DISTILL.PKD = _D2CfgNode()
    # Loss weight (6 for R-CNN students and Swin->RetinaNet, 10 for other one-stage pairs).
    _C.MODEL.DISTILL.PKD.WEIGHT = _default(PKDLoss, "weight")
    # On a spatial-size mismatch: True resizes the student to the teacher, False the reverse.
    _C.MODEL.DISTILL.PKD.RESIZE_STUDENT = _default(PKDLoss, "resize_student")

    # MSE: plain feature imitation, mean((S - T)^2) per level (1x1 adapter if channels differ).
    _C.MODEL.DISTILL.MSE = _D2CfgNode()
    _C.MODEL.DISTILL.MSE.WEIGHT = _default(MSELoss, "weight")
    _C.MODEL.DISTILL.MSE.RESIZE_STUDENT = _default(MSELoss, "resize_student")

    # FGD: focal (fg/bg, attention) and global distillation. Defaults: the RetinaNet recipe (the
    # R-CNN and FCOS recipes: MultiLevelFGDLoss's docstring).
    _C.MODEL.DISTILL.FGD = _D2CfgNode()
    _C.MODEL.DISTILL.FGD.TEMPERATURE = _default(MultiLevelFGDLoss, "temperature")
    _C.MODEL.DISTILL.FGD.ALPHA = _default(MultiLevelFGDLoss, "alpha")  # foreground term
    _C.MODEL.DISTILL.FGD.BETA = _default(MultiLevelFGDLoss, "beta")  # background term
    _C.MODEL.DISTILL.FGD.GAMMA = _default(MultiLevelFGDLoss, "gamma")  # attention term
    _C.MODEL.DISTILL.FGD.LAMBDA = _default(MultiLevelFGDLoss, "lambda_")  # global (context) term

    # PGD: prediction-guided distillation (dense students and teachers).
    _C.MODEL.DISTILL.PGD = _D2CfgNode()
    _C.MODEL.DISTILL.PGD.TEMPERATURE = _default(PGDLoss, "temperature")
    _C.MODEL.DISTILL.PGD.ALPHA = _default(PGDLoss, "alpha")  # fg term (0.08 for ATSS-style)
    _C.MODEL.DISTILL.PGD.BETA = _default(PGDLoss, "beta")  # bg term, 0.5 * ALPHA
    _C.MODEL.DISTILL.PGD.GAMMA = _default(PGDLoss, "gamma")  # regression term, 1.6 * ALPHA
    _C.MODEL.DISTILL.PGD.DELTA = _default(PGDLoss, "delta")  # attention terms
    # Key predictive locations per GT over all levels (30 for FCOS/GFL, 9 for ATSS-style).
    _C.MODEL.DISTILL.PGD.TOPK = _default(PGDLoss, "topk")
    # Quality exponent alpha in sigmoid(score)^(1-alpha) * IoU^alpha, for the cls / reg maps.
    _C.MODEL.DISTILL.PGD.QUALITY_ALPHA_CLS = _default(PGDLoss, "quality_alpha_cls")
    _C.MODEL.DISTILL.PGD.QUALITY_ALPHA_REG = _default(PGDLoss, "quality_alpha_reg")
    # Per-level weights of the classification-side loss, finest level first.
    _C.MODEL.DISTILL.PGD.LEVEL_WEIGHTS = _default(PGDLoss, "level_weights")

    # RM: rank mimicking (KL between softmaxed scores over each GT's positive anchors).
    _C.MODEL.DISTILL.RM = _D2CfgNode()
    _C.MODEL.DISTILL.RM.WEIGHT = _default(RankMimicLoss, "weight")
    _C.MODEL.DISTILL.RM.TEMPERATURE = _default(RankMimicLoss, "temperature")

    # PFI: prediction-guided feature imitation (feature MSE weighted by prediction disagreement).
    _C.MODEL.DISTILL.PFI = _D2CfgNode()
    _C.MODEL.DISTILL.PFI.WEIGHT = _default(PFILoss, "weight")


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


# Every key group of the project, each added by its own function (a model's keys live beside the
# model). add_distill_config applies them all; a new group is one more entry here, and
# tests/test_config.py fails for any pkd function named add_*_config that is missing.
CONFIG_GROUPS: Tuple[Callable[[_D2CfgNode], None], ...] = (
    _add_distill_keys,
    add_fcos_config,
    add_swin_config,
    add_torchvision_config,
)


def get_distill_cfg() -> _D2CfgNode:
    """Detectron2's default config with every key of the project added: ``get_cfg()`` followed by
    :func:`add_distill_config`, nothing else (``tools/train_net.py`` loads configs with it)."""
    cfg = get_cfg()
    add_distill_config(cfg)
    return cfg
