from .fcos import FCOS, build_fcos_resnet_fpn_backbone

__all__ = ["FCOS", "build_fcos_resnet_fpn_backbone"]
