"""What every distillation loss receives, the loss registry, and the spatial and channel alignment
of a student map to its teacher's."""
from dataclasses import dataclass
from typing import List, Optional, Tuple

from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.structures import Instances
from detectron2.utils.registry import Registry

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "register_loss",
    "DistillInputs",
    "DensePredictions",
    "align_spatial",
    "channel_adapter",
]

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """
Distillation losses, registered under the names ``MODEL.DISTILL.LOSSES`` uses ("PKD", "FGD", ...)
with :func:`register_loss`. A registered class is an ``nn.Module`` built with
``cls(cfg, feature_pairs=..., student_shapes=..., teacher_shapes=...)`` (``@configurable``, so it
also builds from keyword arguments in LazyConfig). Its ``forward(inputs: DistillInputs)`` returns
``{"loss_<method>_<student_level>": scalar, ...}``, weights applied. Class attributes:
``needs_predictions = True`` asks DistillMetaArch for the dense head outputs of both models
(:class:`DensePredictions`); ``has_adapter = True`` declares that the loss handles paired levels
with different channel counts itself; an optional ``check_models(student, teacher)`` is called at
construction to reject incompatible detector pairs early.
"""


def register_loss(name: str):
    """Class decorator: registers a loss in DISTILL_LOSS_REGISTRY under ``name`` (the name used in
    MODEL.DISTILL.LOSSES and as the ``MODEL.DISTILL.<name>`` config node)."""

    def deco(cls):
        DISTILL_LOSS_REGISTRY._do_register(name, cls)
        return cls

    return deco


@dataclass
class DensePredictions:
    """Dense-head material of both models, for prediction-guided losses (PGD, RM, PFI).

    Attributes:
        student, teacher: the two dense detectors (``DenseDetector``: RetinaNet, FCOS, ...). Use
            their own Detectron2 code for anchors and assignment (``student.anchor_generator``,
            ``student.label_anchors``, ``box2box_transform``), never a copy.
        student_features, teacher_features: the maps each head consumed, one per level in the
            order of ``<model>.head_in_features``: (N, C, Hl, Wl).
        student_outputs, teacher_outputs: what each ``head`` returned: a list of per-level lists,
            e.g. RetinaNet ``[logits (N, A*K, Hl, Wl), deltas (N, A*4, Hl, Wl)]``, FCOS adds
            ``ctrness (N, 1, Hl, Wl)``. Teacher outputs carry no grad.
    """

    student: nn.Module
    teacher: nn.Module
    student_features: List[Tensor]
    teacher_features: List[Tensor]
    student_outputs: List[List[Tensor]]
    teacher_outputs: List[List[Tensor]]


@dataclass
class DistillInputs:
    """One training step's material, shared by all configured losses.

    Attributes:
        levels: the paired student level names, e.g. ["p3", "p4", "p5", "p6"].
        student_features: per pair, (N, Cs, Hs, Ws) maps of the student (with grad).
        teacher_features: per pair, (N, Ct, Ht, Wt) maps of the teacher (no grad).
        gt_instances: per image, ground truth (``gt_boxes`` XYXY in input pixels, ``gt_classes``).
        image_size: (H, W) of the padded input batch.
        predictions: dense-head material of both models; None unless a configured loss sets
            ``needs_predictions``.
    """

    levels: List[str]
    student_features: List[Tensor]
    teacher_features: List[Tensor]
    gt_instances: List[Instances]
    image_size: Tuple[int, int]
    predictions: Optional[DensePredictions] = None


def align_spatial(student: Tensor, teacher: Tensor, resize_student: bool = True):
    """Brings two maps of one pair to a common (H, W) by bilinear resizing (align_corners=False).

    Args:
        student: (N, C, Hs, Ws); teacher: (N, C', Ht, Wt).
        resize_student: resize the student to the teacher's size (True) or the reverse.

    Returns:
        (student, teacher), same spatial size.
    """
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if resize_student:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    else:
        teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
    return student, teacher


def channel_adapter(student_channels: int, teacher_channels: int) -> Optional[nn.Conv2d]:
    """The trainable adapter of a feature pair whose channel counts differ: a 1x1 conv
    (N, C_S, H, W) -> (N, C_T, H, W) with PyTorch's default init, applied to the student's map.
    None when the counts are equal (no adapter)."""
    if student_channels == teacher_channels:
        return None
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
