"""Distillation losses, registered in :data:`DISTILL_LOSS_REGISTRY`."""
from .base import (
    DISTILL_LOSS_REGISTRY,
    DenseHeadOutputs,
    DensePredictions,
    DistillInputs,
    align_spatial,
    register_loss,
)
from .fgd import FGDLoss, MultiLevelFGDLoss, fgd_attention, fgd_masks
from .mse import MSELoss, mse_loss
from .pgd import (
    PGDLoss,
    gaussian_weights,
    key_location_weights,
    location_centers,
    per_location,
    pgd_cls_loss,
    pgd_reg_loss,
    pgd_value_maps,
)
from .pkd import PKDLoss, channel_pearson, pearson_per_channel, pkd_loss
from .rank_mimic import PFILoss, RankMimicLoss, pfi_loss, rank_mimic_loss

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "DistillInputs",
    "DenseHeadOutputs",
    "DensePredictions",
    "align_spatial",
    "register_loss",
    "registered_loss_names",
    "PKDLoss",
    "pkd_loss",
    "channel_pearson",
    "pearson_per_channel",
    "MSELoss",
    "mse_loss",
    "MultiLevelFGDLoss",
    "FGDLoss",
    "fgd_masks",
    "fgd_attention",
    "PGDLoss",
    "pgd_value_maps",
    "pgd_cls_loss",
    "pgd_reg_loss",
    "gaussian_weights",
    "key_location_weights",
    "location_centers",
    "per_location",
    "RankMimicLoss",
    "PFILoss",
    "rank_mimic_loss",
    "pfi_loss",
    "build_distill_losses",
]


def registered_loss_names():
    """Names accepted in MODEL.DISTILL.LOSSES, e.g. ["FGD", "MSE", "PKD", ...]."""
    return sorted(name for name, _ in DISTILL_LOSS_REGISTRY)


def build_distill_losses(cfg, **pairing):
    """Builds the losses named in ``cfg.MODEL.DISTILL.LOSSES``.

    Args:
        pairing: passed to each loss's ``from_config`` (feature_pairs, student_shapes,
            teacher_shapes), for losses that own per-level modules.

    Returns:
        dict {name: nn.Module}, in config order.
    """
    losses = {}
    for name in cfg.MODEL.DISTILL.LOSSES:
        if name not in DISTILL_LOSS_REGISTRY:
            raise KeyError(
                f"Unknown distillation loss '{name}' in MODEL.DISTILL.LOSSES. Registered losses: "
                f"{registered_loss_names()}."
            )
        if name in losses:
            raise ValueError(f"Loss '{name}' is listed twice in MODEL.DISTILL.LOSSES.")
        losses[name] = DISTILL_LOSS_REGISTRY.get(name)(cfg, **pairing)
    return losses
