"""RM + PFI: Rank Mimicking and Prediction-guided Feature Imitation (arXiv 2112.04840).

RM makes the student rank each GT's positive anchors the way the teacher does; PFI weights feature
imitation by how much the two models' class predictions disagree. Both compare predictions anchor
by anchor, so the teacher must have the student's anchors per location (DistillMetaArch checks it
when it is built: ``compares_anchors``)."""
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.utils.events import get_event_storage

from .base import DistillInputs, align_spatial, channel_adapter, register_loss

__all__ = ["rank_mimic_loss", "pfi_loss", "RankMimicLoss", "PFILoss"]


def _group_log_softmax(x: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """log-softmax of (P,) values within each group (P,) in [0, num_groups)."""
    maxima = x.new_full((num_groups,), float("-inf"))
    maxima = maxima.scatter_reduce(0, groups, x.detach(), "amax")
    shifted = x - maxima[groups]  # for stability; the result does not depend on the shift
    sums = x.new_zeros(num_groups).index_add(0, groups, shifted.exp())
    return shifted - sums.log()[groups]


def rank_mimic_loss(
    student: Tensor,
    teacher: Tensor,
    groups: Tensor,
    group_images: Optional[Tensor] = None,
    temperature: float = 1.0,
) -> Tuple[Tensor, int]:
    """Rank mimicking over groups of scores (one group = the positive anchors of one GT).

    Args:
        student, teacher: (P,) sigmoid probability of each positive anchor for its GT's class
            (the teacher is treated as a constant). Not sorted: anchor i of the student is
            compared with anchor i of the teacher.
        groups: (P,) long, the GT (group) of each anchor, in [0, G).
        group_images: (G,) long, the image of each GT; None: all from one image.
        temperature: of the softmax over a group's anchors.

    Returns:
        (loss, count): for every GT with at least 2 anchors, KL(p_T || p_S) summed over its
        anchors, p = softmax(score / temperature) over the group; the mean over an image's such
        GTs, then over the images that have any; ``count`` such GTs. (0, 0) if there is none.
    """
    if groups.numel() == 0:
        return student.sum() * 0.0, 0
    num_groups = int(groups.max()) + 1
    log_p_s = _group_log_softmax(student.float() / temperature, groups, num_groups)
    log_p_t = _group_log_softmax(teacher.detach().float() / temperature, groups, num_groups)
    kl = log_p_s.new_zeros(num_groups).index_add(0, groups, log_p_t.exp() * (log_p_t - log_p_s))
    valid = torch.bincount(groups, minlength=num_groups) >= 2
    count = int(valid.sum())
    if count == 0:
        return student.sum() * 0.0, 0
    if group_images is None:
        group_images = groups.new_zeros(num_groups)
    images = group_images[:num_groups][valid]
    num_images = int(images.max()) + 1
    per_image = kl.new_zeros(num_images).index_add(0, images, kl[valid])
    gts_per_image = torch.bincount(images, minlength=num_images)
    has_gts = gts_per_image > 0
    return (per_image[has_gts] / gts_per_image[has_gts]).mean(), count


def pfi_loss(
    student: Tensor, teacher: Tensor, student_logits: Tensor, teacher_logits: Tensor
) -> Tensor:
    """PFI of one level.

    Args:
        student, teacher: (N, C, H, W) FPN maps of equal shape (the teacher is a constant).
        student_logits, teacher_logits: (N, A*K, H, W) raw class logits of both heads; gradient
            flows into the student's logits too.

    Returns:
        scalar: the mean over images of ||D_pred * D_feat||_2 / (H*W), the norm over the H*W
        locations, with D_pred = mean over the A*K channels of (P^T - P^S)^2 and
        D_feat = mean over the C channels of (S - T)^2.
    """
    n, _, h, w = student.shape
    d_pred = (teacher_logits.detach().float() - student_logits.float()).square().mean(dim=1)
    d_feat = (student.float() - teacher.detach().float()).square().mean(dim=1)
    per_image = torch.linalg.vector_norm((d_pred * d_feat).reshape(n, -1), dim=1) / (h * w)
    return per_image.mean()


@register_loss("RM")
class RankMimicLoss(nn.Module):
    """``loss_rm``: KL between the teacher's and the student's score distributions over each GT's
    positive anchors, positives from the student's own label assignment (``label_anchors``)."""

    needs_predictions = True
    compares_anchors = True
    uses_feature_pairs = False

    @configurable
    def __init__(self, *, weight: float = 4.0, temperature: float = 1.0):
        """
        Args:
            weight: loss weight.
            temperature: softmax temperature over each GT's positive anchors.
        """
        super().__init__()
        self.weight = float(weight)
        self.temperature = float(temperature)

    @classmethod
    def from_config(cls, cfg, **_pairing) -> Dict:
        rm = cfg.MODEL.DISTILL.RM
        return {"weight": rm.WEIGHT, "temperature": rm.TEMPERATURE}

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        pred = inputs.predictions
        if pred is None:
            raise RuntimeError("RM needs dense predictions (DistillInputs.predictions is None).")
        logits_s, logits_t = pred.student.flat_logits, pred.teacher.flat_logits  # (N, R, K)
        scores_s, scores_t, groups, group_images = [], [], [], []
        offset = 0
        for n, (inst, index) in enumerate(zip(inputs.gt_instances, pred.matched_gt)):
            anchor = (index >= 0).nonzero().squeeze(1)
            cls = inst.gt_classes[index[anchor]]
            scores_s.append(logits_s[n, anchor, cls])
            scores_t.append(logits_t[n, anchor, cls])
            groups.append(index[anchor] + offset)
            group_images.append(torch.full_like(inst.gt_classes, n))
            offset += len(inst)
        loss, count = rank_mimic_loss(
            torch.cat(scores_s).float().sigmoid(),
            torch.cat(scores_t).float().sigmoid(),
            torch.cat(groups),
            torch.cat(group_images),
            self.temperature,
        )
        get_event_storage().put_scalar("kd/rm_num_gts", count)
        return {"loss_rm": self.weight * loss}


@register_loss("PFI")
class PFILoss(nn.Module):
    """``loss_pfi_<level>`` for every feature pair: feature imitation weighted by the disagreement
    of the two models' class predictions at the same level. The per-level terms sum to
    ``weight`` times their mean over levels. A 1x1 conv adapts the student's channels to the
    teacher's where they differ; the teacher's map is resized to the student's if needed."""

    needs_predictions = True
    compares_anchors = True
    has_adapter = True

    @configurable
    def __init__(
        self, *, weight: float = 1.5, channels: Optional[Mapping[str, Tuple[int, int]]] = None
    ):
        """
        Args:
            weight: loss weight.
            channels: {student_level: (student_channels, teacher_channels)} of the pairs; a 1x1
                adapter is made for each pair whose counts differ.
        """
        super().__init__()
        self.weight = float(weight)
        adapters = {level: channel_adapter(cs, ct) for level, (cs, ct) in (channels or {}).items()}
        self.adapters = nn.ModuleDict({k: a for k, a in adapters.items() if a is not None})

    @classmethod
    def from_config(cls, cfg, *, feature_pairs, student_shapes, teacher_shapes) -> Dict:
        channels = {
            s: (student_shapes[s].channels, teacher_shapes[t].channels) for s, t in feature_pairs
        }
        return {"weight": cfg.MODEL.DISTILL.PFI.WEIGHT, "channels": channels}

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        pred = inputs.predictions
        if pred is None:
            raise RuntimeError("PFI needs dense predictions (DistillInputs.predictions is None).")
        head_levels = pred.student.levels
        weight = self.weight / len(inputs.levels)
        losses = {}
        for level, s, t in zip(inputs.levels, inputs.student_features, inputs.teacher_features):
            if level not in head_levels:
                raise ValueError(
                    f"PFI distils student level {level}, which the student's head does not use "
                    f"(head levels {head_levels}): pair only head levels."
                )
            i = head_levels.index(level)
            s = s.float()
            if level in self.adapters:
                s = self.adapters[level](s)
            s, t = align_spatial(s, t.float(), resize_student=False)
            losses[f"loss_pfi_{level}"] = weight * pfi_loss(
                s, t, pred.student.logits[i], pred.teacher.logits[i]
            )
        return losses
