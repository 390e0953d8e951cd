"""Detectron2-PKD: knowledge distillation for Detectron2 detectors.

Importing ``pkd`` registers ``DistillMetaArch`` and the yacs-buildable ``FCOS`` in Detectron2's
META_ARCH_REGISTRY, and the distillation losses in ``pkd.losses.DISTILL_LOSS_REGISTRY``.
"""
from . import losses, modeling
from .config import add_distill_config, add_fcos_config, get_distill_cfg
from .losses import DISTILL_LOSS_REGISTRY, pkd_loss
from .meta_arch import DistillMetaArch, resolve_feature_pairs, student_config
from .teacher import FrozenTeacher, TeacherCheckpointError, build_teacher_model

__all__ = [
    "losses",
    "modeling",
    "add_distill_config",
    "add_fcos_config",
    "get_distill_cfg",
    "DISTILL_LOSS_REGISTRY",
    "pkd_loss",
    "DistillMetaArch",
    "resolve_feature_pairs",
    "student_config",
    "FrozenTeacher",
    "TeacherCheckpointError",
    "build_teacher_model",
]
