from .fcos import FCOS, build_fcos_resnet_fpn_backbone
from .swin import add_swin_config, build_swin_backbone, build_swin_fpn_backbone
from .torchvision_backbone import (
    TorchvisionBackbone,
    add_torchvision_config,
    build_retinanet_torchvision_fpn_backbone,
    build_torchvision_backbone,
    build_torchvision_fpn_backbone,
)

__all__ = [
    "FCOS",
    "build_fcos_resnet_fpn_backbone",
    "add_swin_config",
    "build_swin_backbone",
    "build_swin_fpn_backbone",
    "TorchvisionBackbone",
    "add_torchvision_config",
    "build_torchvision_backbone",
    "build_torchvision_fpn_backbone",
    "build_retinanet_torchvision_fpn_backbone",
]
