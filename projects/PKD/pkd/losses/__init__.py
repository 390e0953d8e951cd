"""Distillation losses, registered in :data:`DISTILL_LOSS_REGISTRY`."""
from .base import DISTILL_LOSS_REGISTRY, DensePredictions, DistillInputs, align_spatial
from .pkd import PKDLoss, channel_pearson, pkd_loss

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "DistillInputs",
    "DensePredictions",
    "align_spatial",
    "PKDLoss",
    "pkd_loss",
    "channel_pearson",
    "build_distill_losses",
]


def registered_loss_names():
    """Names accepted in MODEL.DISTILL.LOSSES, e.g. ["PKD", ...] (class names minus "Loss")."""
    return sorted(_name_of(k) for k, _ in DISTILL_LOSS_REGISTRY)


def _name_of(class_name: str) -> str:
    return class_name[: -len("Loss")] if class_name.endswith("Loss") else class_name


def build_distill_losses(cfg, **pairing):
    """Builds the losses named in ``cfg.MODEL.DISTILL.LOSSES``.

    Args:
        pairing: passed to each loss's ``from_config`` (feature_pairs, student_shapes,
            teacher_shapes), for losses that own per-level modules.

    Returns:
        dict {name: nn.Module}, in config order.
    """
    by_name = {_name_of(k): v for k, v in DISTILL_LOSS_REGISTRY}
    losses = {}
    for name in cfg.MODEL.DISTILL.LOSSES:
        if name not in by_name:
            raise KeyError(
                f"Unknown distillation loss '{name}' in MODEL.DISTILL.LOSSES. Registered losses: "
                f"{registered_loss_names()}."
            )
        if name in losses:
            raise ValueError(f"Loss '{name}' is listed twice in MODEL.DISTILL.LOSSES.")
        losses[name] = by_name[name](cfg, **pairing)
    return losses
