"""Swin Transformer + FPN buildable from yacs (``MODEL.BACKBONE.NAME: build_swin_fpn_backbone``,
``MODEL.SWIN.*``), for the paper's Mask R-CNN Swin-S teacher.

Detectron2 ships :class:`~detectron2.modeling.backbone.SwinTransformer` (a port of the official
Swin detection code) for LazyConfig only. This builds that same module under the same FPN, so a
yacs config and a LazyConfig (``L(FPN)(bottom_up=L(SwinTransformer)(...), ...)``) give identical
parameter names. Swin's stage ``i`` (stride ``4 * 2**i``) is named ``p{i}`` by Detectron2, so the
FPN reads ``p0..p3`` and outputs ``p2..p5`` (+ ``p6`` by max-pooling, as Mask R-CNN's FPN does).
"""
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, SwinTransformer

from .fpn import fpn_p2_p6

__all__ = ["add_swin_config", "build_swin_backbone", "build_swin_fpn_backbone"]


def add_swin_config(cfg: CN) -> None:
    """Adds the ``MODEL.SWIN`` keys, in place; defaults: Swin-T as Detectron2's SwinTransformer."""
    _C = cfg
    _C.MODEL.SWIN = type(cfg)()  # the config's own CfgNode class, so that merging type-checks
    _C.MODEL.SWIN.PATCH_SIZE = 4
    _C.MODEL.SWIN.EMBED_DIM = 96
    # Blocks per stage: Swin-T [2, 2, 6, 2], Swin-S/B [2, 2, 18, 2].
    _C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    # Attention heads per stage: Swin-T/S [3, 6, 12, 24], Swin-B [4, 8, 16, 32].
    _C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    _C.MODEL.SWIN.WINDOW_SIZE = 7
    _C.MODEL.SWIN.MLP_RATIO = 4.0
    _C.MODEL.SWIN.QKV_BIAS = True
    # Stochastic depth (timm's DropPath when > 0); only active in training.
    _C.MODEL.SWIN.DROP_PATH_RATE = 0.2
    # Absolute position embedding (off in the detection models).
    _C.MODEL.SWIN.APE = False
    # Stages to output, named by Detectron2 "p{stage}" (p0: stride 4 ... p3: stride 32).
    _C.MODEL.SWIN.OUT_FEATURES = ["p0", "p1", "p2", "p3"]
    # Activation checkpointing inside the blocks (saves memory when training the Swin itself).
    _C.MODEL.SWIN.USE_CHECKPOINT = False


def build_swin_backbone(cfg, input_shape: ShapeSpec) -> SwinTransformer:
    """Detectron2's SwinTransformer from ``MODEL.SWIN``; outputs ``MODEL.SWIN.OUT_FEATURES``."""
    swin = cfg.MODEL.SWIN
    names = [f"p{i}" for i in range(len(swin.DEPTHS))]
    unknown = [f for f in swin.OUT_FEATURES if f not in names]
    if unknown:
        raise ValueError(
            f"MODEL.SWIN.OUT_FEATURES {unknown} do not exist: a Swin with "
            f"{len(swin.DEPTHS)} stages outputs {names} (p<i> is stage i, stride 4 * 2**i)."
        )
    return SwinTransformer(
        patch_size=swin.PATCH_SIZE,
        in_chans=input_shape.channels,
        embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        qkv_bias=swin.QKV_BIAS,
        drop_path_rate=swin.DROP_PATH_RATE,
        ape=swin.APE,
        out_indices=tuple(names.index(f) for f in swin.OUT_FEATURES),
        use_checkpoint=swin.USE_CHECKPOINT,
    )


@BACKBONE_REGISTRY.register()
def build_swin_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Swin + FPN, the Mask R-CNN Swin backbone (arXiv 2103.14030, Sec. 4.1).

    Returns:
        FPN backbone with levels p2..p6 for ``MODEL.FPN.IN_FEATURES = [p0, p1, p2, p3]``.
    """
    return fpn_p2_p6(cfg, build_swin_backbone(cfg, input_shape))
