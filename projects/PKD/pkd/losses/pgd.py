"""PGD: Prediction-Guided Distillation (arXiv 2203.05469).

The teacher's own head predictions pick a few key predictive locations inside every GT box; at
every head level, the output of the first block of the student's classification tower imitates
the teacher's there (and, more weakly, on the background), and the first block of the regression
tower imitates the teacher's at the regression key locations. As the authors' code does, the FPN
maps themselves are not compared."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from .base import DenseHeadOutputs, DistillInputs, register_loss

__all__ = [
    "gaussian_weights",
    "inside_boxes",
    "key_location_weights",
    "per_location",
    "location_centers",
    "pgd_value_maps",
    "pgd_cls_loss",
    "pgd_reg_loss",
    "PGDLoss",
]


def gaussian_weights(points: Tensor, noise: float = 0.05) -> Tensor:
    """Fits one 2-D Gaussian per group of candidate points and weighs each point by it.

    Args:
        points: (G, K, 2) candidate centres (x, y) of G groups.
        noise: half-width of the uniform noise added before fitting (drawn from torch's global
            RNG), so that collinear or coincident candidates still give an invertible covariance.

    Returns:
        (G, K): exp(-1/2 d^T Sigma^-1 d), d = noise-free point - fitted mean; Sigma is the biased
        (divisor K) covariance. A single candidate (K = 1) gets weight 1.
    """
    points = points.double()
    noisy = points + (torch.rand_like(points) * 2 - 1) * noise
    mean = noisy.mean(dim=1, keepdim=True)
    centred = noisy - mean
    cov = centred.transpose(1, 2) @ centred / points.shape[1]  # (G, 2, 2)
    a, b, c, d = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 0], cov[:, 1, 1]
    adjugate = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    # A zero covariance (one candidate) gives a zero inverse, hence weight 1.
    inverse = adjugate / (a * d - b * c).clamp_min(1e-12)[:, None, None]
    diff = points - mean
    mahalanobis = torch.einsum("gki,gij,gkj->gk", diff, inverse, diff)
    return torch.exp(-0.5 * mahalanobis).float()


def inside_boxes(centers: Tensor, boxes: Tensor) -> Tensor:
    """(R, 2) points (x, y) and (G, 4) XYXY boxes -> (R, G) bool: point strictly inside box."""
    x, y = centers[:, 0:1], centers[:, 1:2]
    return (x > boxes[:, 0]) & (y > boxes[:, 1]) & (x < boxes[:, 2]) & (y < boxes[:, 3])


def key_location_weights(
    centers: Tensor, quality: Tensor, gt_boxes: Tensor, topk: int, noise: float = 0.05
) -> Tensor:
    """PGD's value of every location of one image.

    Args:
        centers: (L, 2) location centres (x, y) over all levels.
        quality: (L, G) prediction quality of each location for each GT.
        gt_boxes: (G, 4) XYXY.
        topk: candidates per GT (fewer when L is smaller).
        noise: see :func:`gaussian_weights`.

    Returns:
        (L,): max over GTs of the Gaussian weight of the locations that are among a GT's top-k and
        whose centre lies strictly inside that GT; 0 elsewhere.
    """
    if gt_boxes.shape[0] == 0:
        return centers.new_zeros(centers.shape[0])
    k = min(topk, centers.shape[0])
    candidates = quality.topk(k, dim=0).indices  # (k, G)
    weights = gaussian_weights(centers[candidates].transpose(0, 1), noise)  # (G, k)
    per_gt = quality.new_zeros(quality.shape).scatter_(0, candidates, weights.t())
    per_gt = per_gt * inside_boxes(centers, gt_boxes)
    return per_gt.amax(dim=1)


def per_location(
    values: Tensor, grid_sizes: Sequence[Tuple[int, int]], anchors_per_location: Sequence[int]
) -> Tensor:
    """(R, ...) per-anchor values in Detectron2's (level, y, x, anchor) order -> (L, ...) per
    location, the max over the anchors of each location."""
    chunks = values.split([h * w * a for (h, w), a in zip(grid_sizes, anchors_per_location)])
    return torch.cat(
        [c.view(h * w, a, *c.shape[1:]).amax(dim=1)
         for c, (h, w), a in zip(chunks, grid_sizes, anchors_per_location)]
    )


def location_centers(
    anchors: Tensor, grid_sizes: Sequence[Tuple[int, int]], anchors_per_location: Sequence[int]
) -> Tensor:
    """(R, 4) XYXY anchors -> (L, 2) centre (x, y) of every location (its first anchor's: the
    anchors of one location share their centre)."""
    chunks = anchors.split([h * w * a for (h, w), a in zip(grid_sizes, anchors_per_location)])
    boxes = torch.cat(
        [c.view(h * w, a, 4)[:, 0] for c, (h, w), a in zip(chunks, grid_sizes, anchors_per_location)]
    )
    return Boxes(boxes).get_centers()


def _level_maps(values: Tensor, grid_sizes: Sequence[Tuple[int, int]]) -> List[Tensor]:
    """(L,) per-location values -> per level (Hl, Wl)."""
    return [c.view(h, w) for c, (h, w) in zip(values.split([h * w for h, w in grid_sizes]), grid_sizes)]


@torch.no_grad()
def pgd_value_maps(
    teacher: DenseHeadOutputs,
    gt_instances: List[Instances],
    *,
    topk: int,
    quality_alphas: Sequence[float],
    noise: float = 0.05,
) -> Tuple[List[List[Tensor]], List[Tensor]]:
    """Key-location maps from a dense teacher's own predictions.

    The quality of an anchor for GT g is sigmoid(logit of g's class)^(1 - alpha) * IoU(decoded
    box, g)^alpha; a location scores the max over its anchors, and the top-k *locations* per GT
    (over all levels) are the candidates, so a multi-anchor head still keeps k distinct locations.

    Args:
        teacher: the teacher's head material, with ``boxes``.
        gt_instances: per image, ``gt_boxes`` and ``gt_classes``.
        topk: candidate locations per GT over all levels.
        quality_alphas: one map is made per alpha.

    Returns:
        (value_maps, background_maps): value_maps[j][l] is (N, Hl, Wl) for quality_alphas[j];
        background_maps[l] is (N, Hl, Wl), 1 where the location's centre is inside no GT.
    """
    grids, anchors_per_location = teacher.grid_sizes, teacher.anchors_per_location
    centers = location_centers(teacher.anchors, grids, anchors_per_location)
    scores = teacher.flat_logits.float().sigmoid()  # (N, R, K)
    values = [[] for _ in quality_alphas]
    background = []
    for n, inst in enumerate(gt_instances):
        gt_boxes = inst.gt_boxes.tensor.float()
        # Decoded boxes of an untrained head can be inverted: their IoU is 0, never negative.
        iou = pairwise_iou(Boxes(teacher.boxes[n].float()), Boxes(gt_boxes)).clamp_min(0)
        score = scores[n][:, inst.gt_classes]  # (R, G)
        for j, alpha in enumerate(quality_alphas):
            quality = per_location(score ** (1 - alpha) * iou**alpha, grids, anchors_per_location)
            weights = key_location_weights(centers, quality, gt_boxes, topk, noise)
            values[j].append(_level_maps(weights, grids))
        outside = ~inside_boxes(centers, gt_boxes).any(dim=1)
        background.append(_level_maps(outside.float(), grids))
    return [_stack_images(v) for v in values], _stack_images(background)


def _stack_images(per_image: List[List[Tensor]]) -> List[Tensor]:
    """Per image, per level (H, W) -> per level (N, H, W)."""
    return [torch.stack(level) for level in zip(*per_image)]


def _spatial_attention(x: Tensor, temperature: float) -> Tensor:
    """(N, C, H, W) -> (N, H, W): H*W * softmax over locations of mean_c |x| / temperature."""
    n, _, h, w = x.shape
    logits = x.abs().mean(dim=1).view(n, -1) / temperature
    return (h * w * F.softmax(logits, dim=1)).view(n, h, w)


def _channel_attention(x: Tensor, temperature: float) -> Tensor:
    """(N, C, ...) -> same shape: C * softmax over channels of |x| / temperature, separately at
    every location."""
    return x.shape[1] * F.softmax(x.abs() / temperature, dim=1)


def _normalize_mask(mask: Tensor) -> Tensor:
    """(N, H, W) -> mask divided, per image, by its number of non-zero entries."""
    return mask / (mask != 0).sum(dim=(1, 2), keepdim=True).clamp_min(1)


def pgd_cls_loss(
    student: Tensor,
    teacher: Tensor,
    value_map: Tensor,
    background_map: Tensor,
    *,
    temperature: float = 0.8,
    alpha: float = 0.04,
    beta: float = 0.02,
    delta: float = 8e-4,
    level_weight: float = 1.0,
) -> Tensor:
    """Classification-side PGD loss of one level.

    Args:
        student, teacher: (N, C, H, W) maps of equal size (the teacher is treated as a constant).
        value_map, background_map: (N, H, W) masks (see :func:`pgd_value_maps`).

    Returns:
        scalar: level_weight * (alpha * fg + beta * bg) + delta * attention, where fg/bg =
        sum(mask * A_S^T * A_C^T * (S - T)^2) / N with each mask divided by its non-zero count,
        and attention = sum|A_C^S - A_C^T| / (N*H*W) + sum|A_S^S - A_S^T| / N.
    """
    teacher = teacher.detach()
    n, _, h, w = student.shape
    spatial_s, spatial_t = (_spatial_attention(x, temperature) for x in (student, teacher))
    channel_s, channel_t = (_channel_attention(x, temperature) for x in (student, teacher))
    error = (student - teacher).square() * channel_t * spatial_t[:, None]
    fg = (error * _normalize_mask(value_map)[:, None]).sum() / n
    bg = (error * _normalize_mask(background_map)[:, None]).sum() / n
    attention = (channel_s - channel_t).abs().sum() / (n * h * w)
    attention = attention + (spatial_s - spatial_t).abs().sum() / n
    return level_weight * (alpha * fg + beta * bg) + delta * attention


def pgd_reg_loss(
    student: Tensor,
    teacher: Tensor,
    value_map: Tensor,
    *,
    temperature: float = 0.8,
    gamma: float = 0.064,
    delta: float = 8e-4,
) -> Tensor:
    """Regression-side PGD loss of one level, over the P locations where ``value_map > 0``.

    Args:
        student, teacher: (N, C, H, W) maps of equal size (the teacher is treated as a constant).
        value_map: (N, H, W) regression key-location weights.

    Returns:
        scalar: gamma * mean_P(mean_c((S - T)^2 * A_C^T) * value) + delta * sum|A_C^S - A_C^T| / P;
        0 (still connected to the student's graph) when no location is selected.
    """
    keep = value_map > 0
    if not keep.any():
        return student.sum() * 0.0
    s = student.permute(0, 2, 3, 1)[keep]  # (P, C)
    t = teacher.detach().permute(0, 2, 3, 1)[keep]
    channel_s, channel_t = (_channel_attention(x, temperature) for x in (s, t))
    imitation = ((s - t).square() * channel_t).mean(dim=1) * value_map[keep]
    attention = (channel_s - channel_t).abs().sum() / s.shape[0]
    return gamma * imitation.mean() + delta * attention


@register_loss("PGD")
class PGDLoss(nn.Module):
    """``loss_pgd_cls_<level>`` and ``loss_pgd_reg_<level>`` for every head level: the first block
    of each of the student's head towers imitates the teacher's, weighted by key-location maps made
    from the teacher's own dense head predictions. The feature pairs are not used; the two heads
    must share their grid and their tower width (there is no adapter)."""

    needs_predictions = True
    uses_feature_pairs = False

    @configurable
    def __init__(
        self,
        *,
        temperature: float = 0.8,
        alpha: float = 0.04,
        beta: float = 0.02,
        gamma: float = 0.064,
        delta: float = 8e-4,
        topk: int = 30,
        quality_alpha_cls: float = 0.8,
        quality_alpha_reg: float = 0.6,
        level_weights: Sequence[float] = (1.0, 1.25, 1.5, 1.75, 2.0),
    ):
        """
        Args:
            temperature: of the spatial and channel attention.
            alpha, beta, gamma, delta: weights of the fg, bg, regression and attention terms.
            topk: key-location candidates per GT over all levels (30 FCOS/GFL, 9 ATSS-style).
            quality_alpha_cls, quality_alpha_reg: quality exponents of the two value maps.
            level_weights: classification-side weight of each head level, finest first.
        """
        super().__init__()
        self.temperature = float(temperature)
        self.alpha, self.beta = float(alpha), float(beta)
        self.gamma, self.delta = float(gamma), float(delta)
        self.topk = int(topk)
        self.quality_alphas = (float(quality_alpha_cls), float(quality_alpha_reg))
        self.level_weights = [float(w) for w in level_weights]

    @classmethod
    def from_config(cls, cfg, **_pairing) -> Dict:
        pgd = cfg.MODEL.DISTILL.PGD
        return {
            "temperature": pgd.TEMPERATURE,
            "alpha": pgd.ALPHA,
            "beta": pgd.BETA,
            "gamma": pgd.GAMMA,
            "delta": pgd.DELTA,
            "topk": pgd.TOPK,
            "quality_alpha_cls": pgd.QUALITY_ALPHA_CLS,
            "quality_alpha_reg": pgd.QUALITY_ALPHA_REG,
            "level_weights": pgd.LEVEL_WEIGHTS,
        }

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        pred = inputs.predictions
        if pred is None:
            raise RuntimeError("PGD needs dense predictions (DistillInputs.predictions is None).")
        student, teacher = pred.student, pred.teacher
        if len(student.levels) > len(self.level_weights):
            raise ValueError(
                f"MODEL.DISTILL.PGD.LEVEL_WEIGHTS has {len(self.level_weights)} entries but the "
                f"student's head has {len(student.levels)} levels {student.levels}: give one weight "
                "per head level, finest first."
            )
        (cls_maps, reg_maps), background = pgd_value_maps(
            teacher, inputs.gt_instances, topk=self.topk, quality_alphas=self.quality_alphas
        )
        self._log_key_locations(cls_maps, inputs.gt_instances)
        losses = {}
        for i, level in enumerate(student.levels):
            s_cls, t_cls = _tap_pair(student.cls_taps[i], teacher.cls_taps[i], level, "cls")
            s_reg, t_reg = _tap_pair(student.reg_taps[i], teacher.reg_taps[i], level, "bbox")
            losses[f"loss_pgd_cls_{level}"] = pgd_cls_loss(
                s_cls,
                t_cls,
                cls_maps[i],
                background[i],
                temperature=self.temperature,
                alpha=self.alpha,
                beta=self.beta,
                delta=self.delta,
                level_weight=self.level_weights[i],
            )
            losses[f"loss_pgd_reg_{level}"] = pgd_reg_loss(
                s_reg, t_reg, reg_maps[i], temperature=self.temperature, gamma=self.gamma,
                delta=self.delta,
            )
        return losses

    @staticmethod
    def _log_key_locations(cls_maps: List[Tensor], gt_instances: List[Instances]) -> None:
        num_gts = sum(len(x) for x in gt_instances)
        if num_gts:
            selected = sum(int((m > 0).sum()) for m in cls_maps)
            get_event_storage().put_scalar("kd/pgd_key_locations_per_gt", selected / num_gts)


def _tap_pair(student: Tensor, teacher: Tensor, level: str, tower: str) -> Tuple[Tensor, Tensor]:
    """fp32 student and teacher taps of one level, checked to have one shape."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"PGD imitates the first block of the teacher's {tower} tower at {level}, but the "
            f"student's is {tuple(student.shape)} and the teacher's {tuple(teacher.shape)}: PGD "
            "has no adapter, so both heads need the same tower width (FPN channels / conv_dims) "
            "and the same head levels."
        )
    return student.float(), teacher.float()
