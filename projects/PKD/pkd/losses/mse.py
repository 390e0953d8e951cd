"""MSE: plain feature imitation, the baseline every feature-distillation paper compares with."""
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from detectron2.config import configurable

from .base import DistillInputs, align_spatial, channel_adapter, register_loss

__all__ = ["mse_loss", "MSELoss"]


def mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE loss of one level, weight not applied.

    Args:
        student: (N, C, Hs, Ws) student map (gradient flows into it).
        teacher: (N, C, Ht, Wt) teacher map (treated as a constant).

    Returns:
        scalar: mean((S - T)^2) over all N*C*Ht*Wt elements, in fp32. On a spatial-size mismatch
        the student is first resized to the teacher's (H, W) (bilinear, align_corners=False).
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"MSE needs equal batch and channel sizes, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}; map the student's channels with an adapter first."
        )
    student, teacher = align_spatial(student.float(), teacher.detach().float(), True)
    return (student - teacher).square().mean()


@register_loss("MSE")
class MSELoss(nn.Module):
    """``loss_mse_<level> = weight * mse_loss(adapter(S), T)`` for every feature pair.

    A pair whose channel counts differ gets a trainable 1x1 conv adapter C_S -> C_T on the
    student side; it lives in this module, hence in the optimizer and the checkpoints.
    """

    needs_predictions = False
    has_adapter = True

    @configurable
    def __init__(
        self,
        *,
        weight: float = 1.0,
        resize_student: bool = True,
        channels: Optional[List[Tuple[int, int]]] = None,
    ):
        """
        Args:
            weight: loss weight of each level (no published default).
            resize_student: on a spatial-size mismatch, resize the (adapted) student to the
                teacher's (H, W); False resizes the teacher to the student's.
            channels: per feature pair, (student_channels, teacher_channels). None: no adapters,
                every pair must have equal channels.
        """
        super().__init__()
        self.weight = float(weight)
        self.resize_student = bool(resize_student)
        self.channels = None if channels is None else [(int(s), int(t)) for s, t in channels]
        # Identity keeps the adapters indexed by pair, so pair i always uses adapters[i].
        adapters = [channel_adapter(s, t) for s, t in (self.channels or [])]
        self.adapters = nn.ModuleList(nn.Identity() if a is None else a for a in adapters)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, resize_student={self.resize_student}"

    @classmethod
    def from_config(cls, cfg, *, feature_pairs, student_shapes, teacher_shapes) -> Dict:
        return {
            "weight": cfg.MODEL.DISTILL.MSE.WEIGHT,
            "resize_student": cfg.MODEL.DISTILL.MSE.RESIZE_STUDENT,
            "channels": [
                (student_shapes[s].channels, teacher_shapes[t].channels) for s, t in feature_pairs
            ],
        }

    def _adapt(self, index: int, student: Tensor) -> Tensor:
        if self.channels is None:
            return student
        if index >= len(self.adapters):
            raise ValueError(
                f"MSELoss was built for {len(self.adapters)} feature pairs but received more; "
                "build it with the same MODEL.DISTILL.FEATURE_PAIRS as the model."
            )
        return self.adapters[index](student.float())

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        losses = {}
        for i, (level, s, t) in enumerate(
            zip(inputs.levels, inputs.student_features, inputs.teacher_features)
        ):
            s, t = align_spatial(self._adapt(i, s), t, self.resize_student)
            losses[f"loss_mse_{level}"] = self.weight * mse_loss(s, t)
        return losses
