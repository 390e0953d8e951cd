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
    "DenseHeadOutputs",
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
``{"loss_<method>_<student_level>": scalar, ...}``, weights applied; it only reads tensors.
Class attributes, read by DistillMetaArch when it is built:
``needs_predictions = True`` asks for the dense-head material of both models
(:class:`DensePredictions`; both must be dense detectors with one grid of head levels and the
same classes); ``compares_anchors = True`` additionally requires the same anchors per location
(the loss compares predictions anchor by anchor); ``has_adapter = True`` declares that the loss
handles paired levels with different channel counts itself; ``uses_feature_pairs = False`` that
it does not read the paired FPN maps at all (PGD, RM), so their channels need not match.
"""


def register_loss(name: str):
    """Class decorator: registers a loss in DISTILL_LOSS_REGISTRY under ``name`` (the name used in
    MODEL.DISTILL.LOSSES and as the ``MODEL.DISTILL.<name>`` config node)."""

    def deco(cls):
        DISTILL_LOSS_REGISTRY._do_register(name, cls)
        return cls

    return deco


@dataclass
class DenseHeadOutputs:
    """What one dense detector's head produced for one batch, as plain tensors.

    ``R`` = sum over head levels of Hl * Wl * A, in Detectron2's anchor order (level, y, x, anchor).

    Attributes:
        levels: the head levels, finest first (``head_in_features``), e.g. ["p3", ..., "p7"].
        cls_taps, reg_taps: per head level, (N, C, Hl, Wl): the output of the first block
            (conv + norm + ReLU) of the classification / the regression tower.
        logits: per head level, (N, A*K, Hl, Wl): raw class logits.
        flat_logits: (N, R, K): the same logits, one row per anchor.
        flat_deltas: (N, R, 4): box regression deltas.
        anchors: (R, 4) XYXY anchors (FCOS: one stride-sized box per point) in input pixels.
        anchors_per_location: per head level, A.
        boxes: (N, R, 4) XYXY boxes decoded from ``flat_deltas`` with the model's own box
            transform; set for the teacher only (prediction-guided key locations).
    """

    levels: List[str]
    cls_taps: List[Tensor]
    reg_taps: List[Tensor]
    logits: List[Tensor]
    flat_logits: Tensor
    flat_deltas: Tensor
    anchors: Tensor
    anchors_per_location: List[int]
    boxes: Optional[Tensor] = None

    @property
    def grid_sizes(self) -> List[Tuple[int, int]]:
        """Per head level, (Hl, Wl)."""
        return [tuple(x.shape[-2:]) for x in self.logits]

    @property
    def num_classes(self) -> int:
        return self.flat_logits.shape[-1]


@dataclass
class DensePredictions:
    """Dense-head material of both models, for prediction-guided losses (PGD, RM, PFI).

    Computed once per step by DistillMetaArch: the losses get tensors, never the models.

    Attributes:
        student: the student's head outputs (with grad).
        teacher: the teacher's head outputs on its own backbone maps (no grad), with ``boxes``.
        gt_labels: per image, (R,) long: the student's own label assignment
            (``label_anchors``) captured from its training forward: a class in [0, K) for a
            positive anchor, K for background, -1 for ignored.
        matched_gt: per image, (R,) long: index of the GT each positive anchor was assigned to,
            -1 for anchors that are not positive.
    """

    student: DenseHeadOutputs
    teacher: DenseHeadOutputs
    gt_labels: List[Tensor]
    matched_gt: List[Tensor]


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
