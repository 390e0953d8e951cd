"""RM + PFI: Rank Mimicking and Prediction-guided Feature Imitation (arXiv 2112.04840).

RM makes the student rank each GT's positive anchors the way the teacher does; PFI weights feature
imitation by how much the two models' class predictions disagree. Both compare predictions anchor
by anchor, so the teacher must have the student's anchors per location."""
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from .base import DensePredictions, DistillInputs, align_spatial, channel_adapter, register_loss

__all__ = [
    "check_same_anchors",
    "matched_gt_indices",
    "rank_mimic_loss",
    "pfi_loss",
    "RankMimicLoss",
    "PFILoss",
]


def check_same_anchors(student: nn.Module, teacher: nn.Module) -> None:
    """Raises a ValueError unless two DenseDetectors predict the same classes with the same
    number of anchors per location on every head level."""
    s_anchors = list(student.anchor_generator.num_anchors)
    t_anchors = list(teacher.anchor_generator.num_anchors)
    if s_anchors != t_anchors:
        raise ValueError(
            f"RM and PFI compare predictions anchor by anchor, but the student has {s_anchors} "
            f"anchors per location (per head level) and the teacher {t_anchors}. Use a teacher "
            "with the student's MODEL.ANCHOR_GENERATOR sizes/aspect ratios and head levels."
        )
    if student.num_classes != teacher.num_classes:
        raise ValueError(
            f"RM and PFI: the student predicts {student.num_classes} classes and the teacher "
            f"{teacher.num_classes}; both must be trained on the same classes."
        )


def _class_logits(pred: DensePredictions) -> Tuple[List[Tensor], List[Tensor]]:
    """Both models' per-level class logits (N, A*K, Hl, Wl), checked to share one grid."""
    check_same_anchors(pred.student, pred.teacher)
    student, teacher = pred.student_outputs[0], pred.teacher_outputs[0]
    shapes_s, shapes_t = [tuple(x.shape) for x in student], [tuple(x.shape) for x in teacher]
    if shapes_s != shapes_t:
        raise ValueError(
            f"RM and PFI need the teacher's head on the student's grid: student logits "
            f"{shapes_s}, teacher logits {shapes_t}. Use a teacher with the student's strides."
        )
    return student, teacher


def matched_gt_indices(
    gt_labels: Tensor, matched_boxes: Tensor, instances: Instances, num_classes: int
) -> Tensor:
    """Recovers which GT each positive anchor was assigned to by a Detectron2 ``label_anchors``.

    Args:
        gt_labels: (R,) labels from ``label_anchors``: class, ``num_classes`` (background) or -1.
        matched_boxes: (R, 4) the matched GT box of each anchor.
        instances: the image's GT (``gt_boxes``, ``gt_classes``).

    Returns:
        (R,) long: index of the matched GT for positive anchors, -1 elsewhere. GTs with the same
        box and class are indistinguishable; the first is taken, as Detectron2's matchers do.
    """
    index = torch.full_like(gt_labels, -1)
    positive = (gt_labels >= 0) & (gt_labels < num_classes)
    if len(instances) == 0 or not positive.any():
        return index
    same = (matched_boxes[positive, None, :] == instances.gt_boxes.tensor[None]).all(dim=2)
    same &= gt_labels[positive, None] == instances.gt_classes[None]
    index[positive] = same.float().argmax(dim=1)  # argmax returns the first maximum
    return index


def _group_log_softmax(x: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """log-softmax of (P,) values within each group (P,) in [0, num_groups)."""
    maxima = x.new_full((num_groups,), float("-inf"))
    maxima = maxima.scatter_reduce(0, groups, x.detach(), "amax")
    shifted = x - maxima[groups]  # for stability; the result does not depend on the shift
    sums = x.new_zeros(num_groups).index_add(0, groups, shifted.exp())
    return shifted - sums.log()[groups]


def rank_mimic_loss(
    student: Tensor, teacher: Tensor, groups: Tensor, temperature: float = 1.0
) -> Tuple[Tensor, int]:
    """Rank mimicking over groups of scores (one group = the positive anchors of one GT).

    Args:
        student, teacher: (P,) class logits of each positive anchor for its GT's class.
        groups: (P,) long, the GT (group) of each anchor, in [0, G).
        temperature: softmax temperature.

    Returns:
        (loss, count): mean over the ``count`` groups with at least 2 members of
        KL(softmax(teacher / T) || softmax(student / T)) within the group; 0 if there is none.
    """
    if groups.numel() == 0:
        return student.sum() * 0.0, 0
    num_groups = int(groups.max()) + 1
    log_p_s = _group_log_softmax(student.float() / temperature, groups, num_groups)
    log_p_t = _group_log_softmax(teacher.detach().float() / temperature, groups, num_groups)
    kl = log_p_s.new_zeros(num_groups).index_add(0, groups, log_p_t.exp() * (log_p_t - log_p_s))
    sizes = torch.bincount(groups, minlength=num_groups)
    valid = sizes >= 2
    count = int(valid.sum())
    if count == 0:
        return student.sum() * 0.0, 0
    return kl[valid].mean(), count


def pfi_loss(
    student: Tensor, teacher: Tensor, student_logits: Tensor, teacher_logits: Tensor
) -> Tensor:
    """PFI of one level.

    Args:
        student, teacher: (N, C, H, W) maps of equal shape (the teacher is treated as a constant).
        student_logits, teacher_logits: (N, A*K, H, W) class logits of both heads.

    Returns:
        scalar: mean(D_pred * D_feat), D_pred = mean over channels of
        (sigmoid(P^S) - sigmoid(P^T))^2 (a weight: no grad), D_feat = mean_c (S - T)^2.
    """
    d_pred = (student_logits.detach().float().sigmoid() - teacher_logits.float().sigmoid())
    d_pred = d_pred.square().mean(dim=1)
    d_feat = (student - teacher.detach()).square().mean(dim=1)
    return (d_pred * d_feat).mean()


@register_loss("RM")
class RankMimicLoss(nn.Module):
    """``loss_rm``: KL between the teacher's and the student's score distributions over each GT's
    positive anchors, positives from the student's own label assignment (``label_anchors``)."""

    needs_predictions = True
    check_models = staticmethod(check_same_anchors)

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
        student = pred.student
        logits_s, logits_t = _class_logits(pred)
        logits_s, logits_t = (
            torch.cat(student._transpose_dense_predictions([x], [student.num_classes])[0], dim=1)
            for x in (logits_s, logits_t)
        )  # (N, R, K)
        anchors = student.anchor_generator(pred.student_features)
        gt_labels, matched_boxes = student.label_anchors(anchors, inputs.gt_instances)
        scores_s, scores_t, groups = [], [], []
        offset = 0
        for n, inst in enumerate(inputs.gt_instances):
            index = matched_gt_indices(gt_labels[n], matched_boxes[n], inst, student.num_classes)
            anchor = (index >= 0).nonzero().squeeze(1)
            cls = inst.gt_classes[index[anchor]]
            scores_s.append(logits_s[n, anchor, cls])
            scores_t.append(logits_t[n, anchor, cls])
            groups.append(index[anchor] + offset)
            offset += len(inst)
        loss, count = rank_mimic_loss(
            torch.cat(scores_s), torch.cat(scores_t), torch.cat(groups), self.temperature
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
    has_adapter = True
    check_models = staticmethod(check_same_anchors)

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
        logits_s, logits_t = _class_logits(pred)
        head_levels = list(pred.student.head_in_features)
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
            losses[f"loss_pfi_{level}"] = weight * pfi_loss(s, t, logits_s[i], logits_t[i])
        return losses
