"""PKD: feature imitation through the Pearson correlation coefficient (arXiv 2207.02039)."""
from typing import Dict

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable

from .base import DistillInputs, align_spatial, register_loss

__all__ = ["pkd_loss", "channel_pearson", "PKDLoss"]

_EPS = 1e-6


def _normalize_per_channel(x: Tensor) -> Tensor:
    """(N, C, H, W) -> same shape, each channel standardised over (N, H, W) jointly; the std is
    unbiased (divisor N*H*W - 1) and eps is added to it."""
    std, mean = torch.std_mean(x, dim=(0, 2, 3), keepdim=True, correction=1)
    return (x - mean) / (std + _EPS)


def pkd_loss(student: Tensor, teacher: Tensor, *, resize_student: bool = True) -> Tensor:
    """PKD loss of one level, weight not applied.

    Args:
        student: (N, C, Hs, Ws) student map (gradient flows into it).
        teacher: (N, C, Ht, Wt) teacher map (treated as a constant).
        resize_student: on a size mismatch, resize the student to the teacher's (H, W)
            (bilinear, align_corners=False); False resizes the teacher to the student's.

    Returns:
        scalar: mean((S_hat - T_hat)^2) / 2 over all N*C*H*W elements, computed in fp32;
        equals (1/C) * sum_c (M-1)/M * (1 - r_c), r_c the Pearson correlation of channel c.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"PKD needs equal batch and channel sizes, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}; PKD has no adapter: pair levels with equal channels."
        )
    student, teacher = align_spatial(student.float(), teacher.detach().float(), resize_student)
    with torch.no_grad():  # the target: normalised in place, no autograd buffers kept
        std, mean = torch.std_mean(teacher, dim=(0, 2, 3), keepdim=True, correction=1)
        teacher_hat = (teacher - mean).div_(std + _EPS)
    return F.mse_loss(_normalize_per_channel(student), teacher_hat) / 2


@torch.no_grad()
def channel_pearson(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over channels of the Pearson correlation over (N, H, W) — a diagnostic.

    Args:
        student: (N, C, Hs, Ws); teacher: (N, C, Ht, Wt); the student is resized to the teacher.

    Returns:
        scalar in [-1, 1].
    """
    student, teacher = align_spatial(student.float(), teacher.float(), True)
    s = student - student.mean(dim=(0, 2, 3), keepdim=True)
    t = teacher - teacher.mean(dim=(0, 2, 3), keepdim=True)
    cov = (s * t).sum(dim=(0, 2, 3))
    norm = s.square().sum(dim=(0, 2, 3)).sqrt() * t.square().sum(dim=(0, 2, 3)).sqrt()
    return (cov / norm.clamp_min(1e-12)).mean()


@register_loss("PKD")
class PKDLoss(nn.Module):
    """``loss_pkd_<level> = weight * pkd_loss(S, T)`` for every feature pair."""

    needs_predictions = False

    @configurable
    def __init__(self, *, weight: float = 6.0, resize_student: bool = True):
        """
        Args:
            weight: loss weight of each level (6: R-CNN students, Swin->RetinaNet; 10: other
                one-stage pairs).
            resize_student: see :func:`pkd_loss`.
        """
        super().__init__()
        self.weight = float(weight)
        self.resize_student = bool(resize_student)

    @classmethod
    def from_config(cls, cfg, **_pairing) -> Dict:
        return {
            "weight": cfg.MODEL.DISTILL.PKD.WEIGHT,
            "resize_student": cfg.MODEL.DISTILL.PKD.RESIZE_STUDENT,
        }

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        return {
            f"loss_pkd_{level}": self.weight
            * pkd_loss(s, t, resize_student=self.resize_student)
            for level, s, t in zip(inputs.levels, inputs.student_features, inputs.teacher_features)
        }
