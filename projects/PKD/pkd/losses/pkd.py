"""PKD: feature imitation through the Pearson correlation coefficient (arXiv 2207.02039)."""
import math
from typing import Dict, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from detectron2.config import configurable

from .base import DistillInputs, align_spatial, register_loss

__all__ = ["pkd_loss", "channel_pearson", "pearson_per_channel", "PKDLoss"]

_EPS = 1e-6
_CHANNEL_DIMS = (0, 2, 3)


def _values_per_channel(x: Tensor) -> int:
    """M = N*H*W of an (N, C, H, W) map."""
    return x.numel() // x.shape[1]


def _centered(x: Tensor) -> Tensor:
    """(N, C, H, W) -> a new contiguous tensor, each channel minus its mean over (N, H, W)."""
    x = x.contiguous()
    mean = x.sum(dim=_CHANNEL_DIMS, keepdim=True) / _values_per_channel(x)
    return x - mean


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum over (N, H, W) of a * b, per channel, without materialising a * b.

    Args:
        a, b: (N, C, H, W) contiguous maps of one shape.

    Returns:
        (1, C, 1, 1).
    """
    n, c = a.shape[:2]
    dots = torch.bmm(a.view(n * c, 1, -1), b.view(n * c, -1, 1))
    return dots.view(n, c).sum(dim=0).view(1, c, 1, 1)


def _standardized(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(N, C, H, W) -> (x_hat, std): a new tensor standardised per channel over (N, H, W),
    (x - mean) / (std + eps) with the unbiased std (divisor M - 1); std is (1, C, 1, 1)."""
    x_hat = _centered(x)
    std = torch.linalg.vector_norm(x_hat, dim=_CHANNEL_DIMS, keepdim=True)
    std = std / math.sqrt(_values_per_channel(x) - 1)
    return x_hat.div_(std + _EPS), std


class _PearsonImitation(torch.autograd.Function):
    """mean((S_hat - T_hat)^2) / 2 of two maps of one shape, with a hand-written backward.

    Autograd's generic graph of the same formula allocates over a dozen full-size buffers per
    level (sub/div/std_mean/mse and their backwards); on the finest pair (the student upsampled
    to the teacher's stride-4 map) fresh allocations cost more than the arithmetic. This keeps
    two buffers for backward (S_hat and S_hat - T_hat) and allocates one more there.

    With g = (S_hat - T_hat) / numel (upstream gradient folded in), d = std + eps and M values
    per channel, the gradient of channel c is
        dL/dS = (g - mean(g)) / d - S_hat * sum(g * S_hat) / ((M - 1) * std).
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor) -> Tensor:
        student_hat, student_std = _standardized(student)
        teacher_hat, _ = _standardized(teacher)
        diff = torch.sub(student_hat, teacher_hat, out=teacher_hat)
        ctx.save_for_backward(student_hat, diff, student_std)
        return torch.linalg.vector_norm(diff).square() / (2 * diff.numel())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        student_hat, diff, std = ctx.saved_tensors
        m = _values_per_channel(diff)
        scale = grad_loss / diff.numel()  # g = scale * diff
        denom = std + _EPS
        # A constant channel (std 0) has student_hat == 0, so its dot is 0: clamp only avoids 0/0.
        slope = scale * _channel_dot(student_hat, diff) / ((m - 1) * std.clamp_min(1e-30))
        shift = scale * diff.sum(dim=_CHANNEL_DIMS, keepdim=True) / (m * denom)
        grad = torch.mul(diff, scale / denom)
        grad.addcmul_(student_hat, slope, value=-1).sub_(shift)
        return grad, None


def pkd_loss(student: Tensor, teacher: Tensor, *, resize_student: bool = True) -> Tensor:
    """PKD loss of one level, weight not applied.

    Args:
        student: (N, C, Hs, Ws) student map (gradient flows into it).
        teacher: (N, C, Ht, Wt) teacher map (treated as a constant).
        resize_student: on a size mismatch, resize the student to the teacher's (H, W)
            (bilinear, align_corners=False); False resizes the teacher to the student's.

    Returns:
        scalar: mean((S_hat - T_hat)^2) / 2 over all N*C*H*W elements, computed in fp32, with
        x_hat = (x - mean_c) / (std_c + 1e-6) per channel over (N, H, W), std unbiased;
        equals (1/C) * sum_c (M-1)/M * (1 - r_c), r_c the Pearson correlation of channel c.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"PKD needs equal batch and channel sizes, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}; PKD has no adapter: pair levels with equal channels."
        )
    student, teacher = align_spatial(student.float(), teacher.detach().float(), resize_student)
    if _values_per_channel(teacher) < 2:
        raise ValueError(
            f"PKD standardises each channel over N*H*W values and needs at least 2, got maps of "
            f"shape {tuple(teacher.shape)}: pair a finer level or use more images per batch."
        )
    return _PearsonImitation.apply(student, teacher)


@torch.no_grad()
def pearson_per_channel(student: Tensor, teacher: Tensor) -> Tensor:
    """Pearson correlation of each channel pair over (N, H, W) — a diagnostic.

    Args:
        student: (N, C, Hs, Ws); teacher: (N, C, Ht, Wt); the student is resized to the teacher.

    Returns:
        (C,) in [-1, 1]; 0 for a constant channel.
    """
    student, teacher = align_spatial(student.float(), teacher.float(), True)
    s, t = _centered(student), _centered(teacher)
    norms = torch.linalg.vector_norm(s, dim=_CHANNEL_DIMS, keepdim=True) * torch.linalg.vector_norm(
        t, dim=_CHANNEL_DIMS, keepdim=True
    )
    return (_channel_dot(s, t) / norms.clamp_min(1e-12)).flatten()


def channel_pearson(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over channels of :func:`pearson_per_channel`: a scalar in [-1, 1]."""
    return pearson_per_channel(student, teacher).mean()


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
