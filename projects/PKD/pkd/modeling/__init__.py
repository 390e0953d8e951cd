from .fcos import FCOS, build_fcos_resnet_fpn_backbone
from .swin import add_swin_config, build_swin_backbone, build_swin_fpn_backbone

__all__ = [
    "FCOS",
    "build_fcos_resnet_fpn_backbone",
    "add_swin_config",
    "build_swin_backbone",
    "build_swin_fpn_backbone",
]
