"""Gradient clipping over the whole model, as the FGD and PGD recipes use it.

MMDetection's ``grad_clip=dict(max_norm=35)`` clips the norm of *all* gradients together.
Detectron2's ``SOLVER.CLIP_GRADIENTS`` clips each parameter separately (``CLIP_TYPE: norm``) and
its LazyConfig has no clipping at all. Here: ``CLIP_TYPE: "full_model"`` in yacs, and
``L(ClippedSGD)(..., max_grad_norm=35.0)`` in LazyConfig, both through :class:`ClippedSGD`.
"""
import torch
from detectron2.solver import build_optimizer as build_d2_optimizer

__all__ = ["ClippedSGD", "build_optimizer", "FULL_MODEL"]

FULL_MODEL = "full_model"


class ClippedSGD(torch.optim.SGD):
    """SGD that scales all gradients so their joint norm is at most ``max_grad_norm`` before
    each step (``torch.nn.utils.clip_grad_norm_`` over every parameter it optimizes)."""

    def __init__(self, params, *, max_grad_norm: float, norm_type: float = 2.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = float(max_grad_norm)
        self.norm_type = float(norm_type)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, self.norm_type)
        return super().step(closure)


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    """Detectron2's ``build_optimizer``, plus ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"``."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL):
        return build_d2_optimizer(cfg, model)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    # Detectron2 builds the parameter groups (lr/weight-decay multipliers); keep them as they are.
    groups = build_d2_optimizer(cfg, model).param_groups
    return ClippedSGD(groups, lr=cfg.SOLVER.BASE_LR, max_grad_norm=clip.CLIP_VALUE,
                      norm_type=clip.NORM_TYPE)
