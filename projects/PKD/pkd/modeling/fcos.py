"""FCOS buildable from yacs (``MODEL.META_ARCHITECTURE: FCOS``, ``MODEL.FCOS.*``).

Detectron2 ships FCOS as a LazyConfig model only (``common/models/fcos.py``). This registers the
same class, with the same module tree and parameter names, plus a backbone builder that computes
P6/P7 from P5 as that config does."""
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead

from .fpn import fpn_p3_p7

__all__ = ["FCOS", "build_fcos_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape):
    """ResNet + FPN with P6/P7 computed from P5 (FCOS, arXiv 2006.09214 Sec. 2.2).

    Returns:
        FPN backbone with levels p3..p7 for ``MODEL.FPN.IN_FEATURES = [res3, res4, res5]``.
    """
    return fpn_p3_p7(cfg, build_resnet_backbone(cfg, input_shape))


@META_ARCH_REGISTRY.register()
class FCOS(_D2FCOS):
    """Detectron2's FCOS, constructible from a yacs config as well as from keyword arguments."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        in_features = list(cfg.MODEL.FCOS.IN_FEATURES)
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES {missing} are not produced by the backbone "
                f"(levels {sorted(shapes)}); for P6/P7 use "
                "MODEL.BACKBONE.NAME: build_fcos_resnet_fpn_backbone."
            )
        channels = shapes[in_features[0]].channels
        head = FCOSHead(
            input_shape=[shapes[f] for f in in_features],
            num_classes=cfg.MODEL.FCOS.NUM_CLASSES,
            conv_dims=[channels] * cfg.MODEL.FCOS.NUM_CONVS,
            norm=cfg.MODEL.FCOS.HEAD_NORM,
            prior_prob=cfg.MODEL.FCOS.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "center_sampling_radius": cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA,
            "test_score_thresh": cfg.MODEL.FCOS.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.FCOS.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }
