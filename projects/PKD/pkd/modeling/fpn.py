"""Detectron2's FPN on any bottom-up backbone, from the yacs ``MODEL.FPN.*`` keys: the one way the
project's backbone builders (FCOS-style ResNet, Swin, torchvision) put an FPN on top."""
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

__all__ = ["fpn_p2_p6", "fpn_p3_p7"]


def _fpn(cfg, bottom_up: Backbone, top_block) -> FPN:
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def fpn_p2_p6(cfg, bottom_up: Backbone) -> FPN:
    """The R-CNN FPN: levels p2..p6 (p6 max-pooled from p5) for ``MODEL.FPN.IN_FEATURES`` of
    strides 4..32."""
    return _fpn(cfg, bottom_up, LastLevelMaxPool())


def fpn_p3_p7(cfg, bottom_up: Backbone) -> FPN:
    """The RetinaNet/FCOS FPN: levels p3..p7, P6/P7 computed from P5 (as FCOS and torchvision's
    RetinaNet v2 do) for ``MODEL.FPN.IN_FEATURES`` of strides 8..32."""
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    return _fpn(cfg, bottom_up, LastLevelP6P7(channels, channels, in_feature="p5"))
